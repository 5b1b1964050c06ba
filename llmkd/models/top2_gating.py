"""LLaVA-MoD's training-time top-2 routing (DeepSpeed's GShard-style ``top2gating``), as pure tensor functions.

The official LLaVA-MoD code (shufangxun/LLaVA-MoD, DeepSpeed 0.9.5's ``deepspeed.moe``) routes the ``n`` token rows
of a sparse layer (the micro-batch's ``(batch, sequence)`` rows flattened, padding included) like this, in fp32:

    gates  = softmax(logits)                                          (n, E)
    first  = argmax_e gates                                           the first expert, deterministic
    second = argmax_{e != first} (logits + g),  g ~ Gumbel(0, 1)      the second expert is SAMPLED: with
             probability softmax(logits without ``first``) (the Gumbel-max trick), not the second largest gate
    C      = max(ceil(n / E * 2 * capacity_factor), min_capacity)    slots per expert (top-2: twice the factor)
    slots  : expert e fills its slots with its first-choice assignments in token order, then with its
             second-choice assignments in token order; an assignment that lands on slot >= C is dropped
    weights: the kept experts' gates divided by their sum (clamped at float eps): both kept -> g1/(g1+g2) and g2/(g1+g2);
             one kept -> 1 on it; none kept -> 0, i.e. the sparse layer adds nothing and only the residual remains

:func:`top2_route` implements exactly this (tests compare it to DeepSpeed's own ``top2gating`` given the same
noise); :class:`Top2RoutingHooks` applies it to a transformers MoE's routers while they are in training mode, with
forward hooks, so the model stays a standard transformers model (nothing is saved with it, and at evaluation and
inference it routes deterministically top-2 as its class does).
A dropped assignment keeps its expert index with weight 0: the expert still computes it (official DeepSpeed
skips it) but adds exactly 0 to the output and nothing to any gradient. (transformers' "no expert" index ``E`` is
not used: its grouped_mm / batched_mm implementations mask it only under expert parallelism and otherwise leave
uninitialised rows in the backward, which gave garbage gradients in our tests.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float, min_capacity: int = 0) -> int:
    """Slots per expert for top-2 routing: ``max(ceil(num_tokens / num_experts * 2 * capacity_factor), min_capacity)``.

    Computed as DeepSpeed does (the product in float32, then ``ceil``), so the rounding at exact multiples is the
    same as the official code's.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 (1.5 in LLaVA-MoD), got {capacity_factor}.")
    if min_capacity < 0:
        raise ValueError(f"min_capacity must be >= 0, got {min_capacity}.")
    scaled = torch.tensor(num_tokens / num_experts, dtype=torch.float32) * torch.tensor(2 * capacity_factor,
                                                                                      dtype=torch.float32)
    return max(int(torch.ceil(scaled).item()), int(min_capacity))


def gumbel_noise(shape: tuple[int, ...], device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel(0, 1) samples ``-log(-log(u))`` in fp32, ``u`` uniform in ``[tiny, 1 - eps]`` (the support
    ``torch.distributions.Gumbel`` uses). ``generator=None`` draws from torch's global generator, which the
    Trainer seeds and gradient checkpointing restores before recomputing a layer (so a recomputed layer samples
    the same second experts as the forward did)."""
    finfo = torch.finfo(torch.float32)
    uniform = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    uniform = uniform.clamp(min=finfo.tiny, max=1.0 - finfo.eps)
    return -torch.log(-torch.log(uniform))


@dataclass
class Top2Routing:
    """The routing of ``n`` token rows over ``E`` experts (see the module docstring).

    Attributes:
        weights: ``(n, 2)`` fp32 combine weights of (first, second), differentiable in the logits; 0 where dropped.
        experts: ``(n, 2)`` int64 expert indices of (first, second) (dropped ones too, with weight 0).
        first / second: ``(n,)`` int64 chosen experts before dropping.
        kept: ``(n, 2)`` bool, whether each assignment fitted in its expert's capacity.
        capacity: slots per expert (``n`` when nothing can be dropped, i.e. ``capacity_factor=None``).
    """

    weights: torch.Tensor
    experts: torch.Tensor
    first: torch.Tensor
    second: torch.Tensor
    kept: torch.Tensor
    capacity: int


def top2_route(logits: torch.Tensor, second_expert_sampling: bool = True, capacity_factor: float | None = 1.5,
               min_capacity: int = 0, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> Top2Routing:
    """Route ``logits`` (``(n, E)``, any float dtype; computed in fp32) with LLaVA-MoD's top-2 gating.

    Args:
        logits: router logits, one row per token in the order that decides who is dropped first.
        second_expert_sampling: sample the second expert with Gumbel noise (official) instead of taking the
            second-largest gate.
        capacity_factor: slots per expert as a multiple of the balanced share (official 1.5); None: no dropping.
        min_capacity: the smallest capacity (official 0).
        generator: the generator of the Gumbel noise (None: torch's global one).
        noise: ``(n, E)`` Gumbel noise to use instead of drawing it (tests; it replaces ``generator``).

    Returns:
        A :class:`Top2Routing`.
    """
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(f"logits must be (tokens, experts) with at least 2 experts, got shape {tuple(logits.shape)}.")
    logits = logits.float()
    num_tokens, num_experts = logits.shape
    gates = torch.softmax(logits, dim=-1)
    first = gates.argmax(dim=-1)
    first_mask = torch.nn.functional.one_hot(first, num_experts).bool()
    scores = logits.detach()
    if second_expert_sampling:
        if noise is None:
            noise = gumbel_noise((num_tokens, num_experts), logits.device, generator)
        elif noise.shape != logits.shape:
            raise ValueError(f"noise must have the logits' shape {tuple(logits.shape)}, got {tuple(noise.shape)}.")
        scores = scores + noise.to(scores.dtype)
    second = scores.masked_fill(first_mask, float("-inf")).argmax(dim=-1)
    if capacity_factor is None:
        capacity = num_tokens
        kept = torch.ones(num_tokens, 2, dtype=torch.bool, device=logits.device)
    else:
        capacity = expert_capacity(num_tokens, num_experts, capacity_factor, min_capacity)
        first_onehot = first_mask.long()
        second_onehot = torch.nn.functional.one_hot(second, num_experts)
        # each expert's slot of every assignment: first choices in token order, then second choices after all of
        # that expert's first choices, also in token order
        first_slot = (first_onehot.cumsum(0) - 1).gather(1, first[:, None]).squeeze(1)
        second_slot = (second_onehot.cumsum(0) - 1 + first_onehot.sum(0, keepdim=True)).gather(
            1, second[:, None]).squeeze(1)
        kept = torch.stack([first_slot < capacity, second_slot < capacity], dim=1)
    chosen = torch.stack([first, second], dim=1)
    kept_gates = gates.gather(1, chosen) * kept.to(gates.dtype)
    denominator = kept_gates.sum(dim=1, keepdim=True).clamp(min=torch.finfo(gates.dtype).eps)
    weights = kept_gates / denominator
    return Top2Routing(weights=weights, experts=chosen, first=first, second=second, kept=kept, capacity=capacity)


class Top2RoutingHooks:
    """Forward hooks that make transformers top-2 routers route as LLaVA-MoD's official code while training.

    A transformers router (Qwen2-MoE, Qwen3-MoE, Mixtral: ``gate`` of a sparse block, a ``weight`` of shape
    ``(E, d)`` and no bias) returns ``(router_logits, routing_weights, expert_indices)``; the experts then combine
    ``routing_weights[:, j] * expert[expert_indices[:, j]](x)``. In training mode the hook replaces that output with
    :func:`top2_route` of fp32 logits recomputed from the router's input with autocast off (the official gate runs
    in fp32 whatever the model's dtype): the sampled second expert, the capacity drops (index ``E``, weight 0) and
    the renormalised weights. In eval mode (``model.eval()``) the router's own output is kept. The last
    training-mode routing's ``kept`` mask of each router waits in :attr:`last_kept` (keyed by the router) for the
    load logs (:class:`llmkd.models.routing.RouterMonitor` takes it).

    The Gumbel noise comes from torch's global generator (seeded by the Trainer's ``seed``; restored by gradient
    checkpointing before a layer is recomputed, so the recomputed routing equals the forward's).

    Args:
        routers: the router modules (``llmkd.models.routing.find_routers``).
        second_expert_sampling / capacity_factor / min_capacity: as in :func:`top2_route`.
    """

    def __init__(self, routers: list[nn.Module], second_expert_sampling: bool = True,
                 capacity_factor: float | None = 1.5, min_capacity: int = 0):
        if not routers:
            raise ValueError("No router to install the top-2 routing on (the model has no sparse block).")
        if capacity_factor is not None:
            expert_capacity(1, 2, capacity_factor, min_capacity)  # validates the two numbers
        for router in routers:
            weight = getattr(router, "weight", None)
            top_k = getattr(router, "top_k", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                raise ValueError(f"{type(router).__name__} has no (experts, hidden) 'weight'; the official top-2 "
                                 "routing supports transformers' linear routers (Qwen2-MoE, Qwen3-MoE, Mixtral).")
            if getattr(router, "bias", None) is not None:
                raise ValueError(f"{type(router).__name__} has a bias; the official top-2 gate has none.")
            if top_k != 2:
                raise ValueError(f"The official routing is top-2 (DeepSpeed's top2gating); this router is top-{top_k}. "
                                 "Upcycle with num_experts_per_tok=2, or turn second_expert_sampling and "
                                 "capacity_factor off.")
            if getattr(router, "norm_topk_prob", True) is False:
                raise ValueError(f"{type(router).__name__} does not renormalise its top-2 gates "
                                 "(norm_topk_prob=False) but the official top-2 gating does; upcycled llmkd models "
                                 "renormalise. Turn second_expert_sampling and capacity_factor off for this model.")
        self.second_expert_sampling = second_expert_sampling
        self.capacity_factor = capacity_factor
        self.min_capacity = min_capacity
        self.last_kept: dict[nn.Module, torch.Tensor] = {}
        self.handles = [router.register_forward_hook(self._route, with_kwargs=True) for router in routers]

    def _route(self, module, args, kwargs, output):
        if not module.training:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if not (isinstance(output, tuple) and len(output) == 3):
            raise TypeError(f"{type(module).__name__} returned {type(output).__name__}, not (logits, weights, "
                            "indices): this transformers version's router is not supported by the official routing.")
        weight = module.weight
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            logits = F.linear(hidden.reshape(-1, weight.shape[-1]).float(), weight.float())  # (n, E)
        routing = top2_route(logits, self.second_expert_sampling, self.capacity_factor, self.min_capacity)
        self.last_kept[module] = routing.kept
        return logits, routing.weights.to(output[1].dtype), routing.experts.to(output[2].dtype)

    def remove(self) -> None:
        """Uninstall the hooks (the routers route as their class does again)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
