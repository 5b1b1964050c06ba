"""Watching an MoE model's routers: router logits for the load-balancing loss, and per-expert load for logging.

transformers' MoE causal LMs return ``aux_loss`` only when asked, and LLaVA-style wrappers never return it, so the
trainers record the router logits with forward hooks on the routers themselves (any sparse block with a ``gate``
and ``experts``: Qwen2-MoE, Qwen3-MoE, Mixtral, ...). This works through DDP/DeepSpeed wrappers and inside a VLM.
For the same reason a VLM student's language model is told not to return its router logits through the wrapper
(transformers >= 5.24's LLaVA cannot pass them on: :func:`stop_router_outputs_through_vlm_wrapper`).
"""

from __future__ import annotations

from collections import defaultdict

import logging

import torch
from torch import nn

from ..losses.load_balancing import AUX_LOSS_TYPES, expert_assignment_counts, router_aux_loss
from .top2_gating import Top2RoutingHooks

logger = logging.getLogger(__name__)


def find_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, router)`` pairs of ``model``'s sparse blocks (modules with ``gate`` and ``experts``)."""
    routers = []
    for name, module in model.named_modules():
        gate = getattr(module, "gate", None)
        if isinstance(gate, nn.Module) and isinstance(getattr(module, "experts", None), nn.Module):
            routers.append((f"{name}.gate", gate))
    return routers


def sparse_blocks(model: nn.Module) -> list[nn.Module]:
    """The sparse MoE blocks of ``model`` (the modules holding a ``gate`` router and ``experts``)."""
    return [module for module in model.modules()
            if isinstance(getattr(module, "gate", None), nn.Module)
            and isinstance(getattr(module, "experts", None), nn.Module)]


def prepare_sparse_blocks_for_zero3(model: nn.Module, args) -> int:
    """Make ``model``'s sparse blocks trainable under DeepSpeed ZeRO-3; returns the number of blocks.

    transformers' experts hold fused 3D weights and take per-expert *views* of them in the forward (``W[e]``, or a
    transposed view for ``grouped_mm``); autograd saves those views for the backward, but ZeRO-3 releases the
    weights' storage after the forward, so the backward fails ("The size of tensor a (0) must match ...", found by
    the 2-process ZeRO-3 test). With gradient checkpointing the decoder layers' forward is recomputed in the
    backward after ZeRO-3 has gathered their weights again, so the saved views are valid: it is switched on
    (``args.gradient_checkpointing = True``, logged) when the run has not asked for it. Each sparse block also
    becomes a ZeRO-3 leaf (``set_z3_leaf_modules``), as DeepSpeed recommends for MoE models, whose data-dependent
    expert order defeats ZeRO-3's prefetching.
    """
    blocks = sparse_blocks(model)
    if blocks:
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(model, sorted({type(block) for block in blocks}, key=lambda cls: cls.__name__))
        if not (args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)):
            logger.warning("DeepSpeed ZeRO-3 with an MoE student: turning gradient checkpointing on (the experts' "
                           "fused weights must be gathered again for the backward; see "
                           "llmkd.models.routing.prepare_sparse_blocks_for_zero3).")
            args.gradient_checkpointing = True
            if hasattr(args, "activation_checkpointing"):  # the field transformers >= 5.20 reads in train()
                args.activation_checkpointing = True
    return len(blocks)


def is_moe_model(model: nn.Module) -> bool:
    return bool(find_routers(model))


def routing_shape(model: nn.Module) -> tuple[int, int]:
    """``(num_experts, top_k)`` from the (text) config of ``model`` (a PreTrainedModel or a peft/DDP wrapper)."""
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "module"):
        model = model.module
        config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
    top_k = getattr(text, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        raise ValueError(f"{type(model).__name__}'s config names no num_experts / num_experts_per_tok: not an MoE.")
    return int(num_experts), int(top_k)


class RouterMonitor:
    """Records the router logits of ``model``'s forward passes while :meth:`recording` is active.

    Usage, per micro-batch (the recorded logits are released when the ``with`` block ends)::

        with monitor.recording():
            outputs = model(**inputs)
            aux = monitor.aux_loss(attention_mask)        # scalar, differentiable in the routers
            monitor.accumulate_load(attention_mask, aux, training=model.training)

    and, when logging, ``monitor.reduced_metrics(training, accelerator)`` -> ``moe_aux_loss`` and
    ``moe_load_e{i}`` (the share of top-k assignments that expert i received, mean over sparse layers; 1/E each
    when balanced) and ``moe_load_max`` (the busiest expert's share).
    """

    def __init__(self, model: nn.Module, aux_loss_type: str = "switch", aux_loss_mask_padding: bool = True,
                 routing: Top2RoutingHooks | None = None):
        """``aux_loss_type``: ``switch`` or ``deepspeed_top2`` (:func:`~llmkd.losses.load_balancing.router_aux_loss`);
        ``aux_loss_mask_padding``: leave padding rows out of the aux loss; ``routing``: the official top-2 routing
        installed on these routers (before this monitor, so that its hooks run first), if any: the load logs then
        count the experts the routers actually used (sampled, not dropped) instead of the logits' top-k, and
        ``moe_dropped`` (the share of assignments dropped) is logged."""
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE router (no module with 'gate' and 'experts').")
        if aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(f"aux_loss_type must be one of {AUX_LOSS_TYPES}, got {aux_loss_type!r}.")
        self.num_experts, self.top_k = routing_shape(model)
        self.aux_loss_type = aux_loss_type
        self.aux_loss_mask_padding = aux_loss_mask_padding
        self.routing = routing
        self.count_routed = routing is not None
        self._logits: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []
        self._active = False
        self._sums = {True: defaultdict(float), False: defaultdict(float)}
        for _, router in self.routers:
            router.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self._active:  # not during the teacher's forward, nor a gradient-checkpointing recomputation
            logits = output[0] if isinstance(output, (tuple, list)) else output
            self._logits.append(logits.reshape(-1, logits.shape[-1]))
            if self.count_routed:
                indices = output[2].detach().reshape(-1, output[2].shape[-1])  # (n, k)
                kept = self.routing.last_kept.pop(module, None) if self.routing is not None else None
                if kept is not None:  # a dropped assignment is written as the "no expert" index E here
                    indices = indices.masked_fill(~kept, self.num_experts)
                self._indices.append(indices)

    def recording(self):
        monitor = self

        class _Recording:
            def __enter__(self):
                monitor._logits = []
                monitor._indices = []
                monitor._active = True
                return monitor

            def __exit__(self, *exc):
                monitor._active = False
                monitor._logits = []  # release the router logits (and their graph) once the step has used them
                monitor._indices = []
                return False

        return _Recording()

    @property
    def router_logits(self) -> list[torch.Tensor]:
        """The ``(n, E)`` logits of each router call of the last recorded forward (one per sparse layer)."""
        return self._logits

    def aux_loss(self, token_mask: torch.Tensor | None) -> torch.Tensor:
        """The ``aux_loss_type`` load-balancing loss of the last recorded forward (``token_mask``: ``(B, S)``,
        ignored when ``aux_loss_mask_padding`` is False)."""
        mask = token_mask if self.aux_loss_mask_padding else None
        if mask is not None and self._logits and mask.numel() != self._logits[0].shape[0]:
            mask = None  # the model routed a different token set (e.g. image tokens merged in): count all
        return router_aux_loss(self.aux_loss_type, self._logits, self.top_k, mask)

    def accumulate_load(self, token_mask: torch.Tensor | None, aux: torch.Tensor, training: bool) -> None:
        """Add the last forward's per-expert assignment counts and its aux loss to the logging sums."""
        mask = token_mask
        if mask is not None and self._logits and mask.numel() != self._logits[0].shape[0]:
            mask = None
        sums = self._sums[training]
        if self.count_routed and len(self._indices) == len(self._logits):
            counts = torch.zeros(self.num_experts, dtype=torch.float64)
            dropped = routed = 0.0
            for indices in self._indices:  # (n, k); index E = dropped
                weights = torch.ones(indices.shape, dtype=torch.float64, device=indices.device)
                if mask is not None:
                    weights = weights * mask.reshape(-1, 1).to(device=indices.device, dtype=torch.float64)
                used = indices < self.num_experts
                counts = counts + torch.zeros(self.num_experts + 1, dtype=torch.float64, device=indices.device
                                              ).scatter_add_(0, indices.reshape(-1).long(),
                                                             weights.reshape(-1))[:-1].cpu()
                dropped += float((weights * ~used).sum())
                routed += float(weights.sum())
            sums["dropped"] = sums["dropped"] + dropped
            sums["routed"] = sums["routed"] + routed
        else:
            counts = sum(expert_assignment_counts(logits, self.top_k, mask) for logits in self._logits)
        sums["counts"] = sums["counts"] + counts.double()
        sums["aux"] = sums["aux"] + aux.detach().double()
        sums["calls"] = sums["calls"] + 1.0

    def log_into(self, logs: dict[str, float], accelerator=None) -> None:
        """Add the interval's metrics to a Trainer ``logs`` dict (``eval_``-prefixed when the logs are)."""
        training = not any(key.startswith("eval_") for key in logs)
        prefix = "" if training else "eval_"
        for key, value in self.reduced_metrics(training, accelerator).items():
            logs[prefix + key] = round(value, 6)

    def reduced_metrics(self, training: bool, accelerator=None) -> dict[str, float]:
        """The logging-interval means (summed over data-parallel ranks), then reset."""
        sums = self._sums[training]
        if not sums:
            return {}
        counts = torch.as_tensor(sums["counts"], dtype=torch.float64)
        names = ["aux", "calls"] + (["dropped", "routed"] if self.count_routed else [])
        scalars = torch.stack([torch.as_tensor(sums[name], dtype=torch.float64).reshape(()).cpu() for name in names])
        if accelerator is not None and accelerator.num_processes > 1:
            device = accelerator.device
            counts = accelerator.reduce(counts.to(device), reduction="sum")
            scalars = accelerator.reduce(scalars.to(device), reduction="sum")
        sums.clear()
        share = (counts / counts.sum().clamp_min(1.0)).tolist()
        metrics = {"moe_aux_loss": float(scalars[0] / scalars[1].clamp_min(1.0)), "moe_load_max": max(share)}
        metrics.update({f"moe_load_e{i}": value for i, value in enumerate(share)})
        if self.count_routed:
            metrics["moe_dropped"] = float(scalars[2] / scalars[3].clamp_min(1.0))
        return metrics


def stop_router_outputs_through_vlm_wrapper(model: nn.Module) -> bool:
    """Set ``output_router_logits=False`` on the language model of a VLM (e.g. a LLaVA whose text model is an MoE);
    returns whether it was on.

    transformers 5.24's ``LlavaModel.forward`` builds its output with ``LlavaModelOutputWithPast(**outputs, ...)``
    from the language model's output, so a language model that returns ``router_logits`` makes it raise
    ``TypeError: ... unexpected keyword argument 'router_logits'`` (5.23 listed the fields and dropped them). The
    wrapper never returned them or the aux loss anyway; llmkd records the router logits with hooks instead.
    A causal LM (no wrapper) is left as it is.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    if text is None or text is config or not getattr(text, "output_router_logits", False):
        return False
    text.output_router_logits = False
    logger.info("%s: output_router_logits turned off in the language model's config (the VLM wrapper cannot return "
                "router logits; llmkd records them with hooks).", type(model).__name__)
    return True


def install_official_routing(student: nn.Module, args) -> Top2RoutingHooks | None:
    """:class:`Top2RoutingHooks` on ``student``'s routers when ``args`` asks for the official routing
    (``second_expert_sampling`` or ``capacity_factor``), else None (the routers stay as their class routes)."""
    sampling = bool(getattr(args, "second_expert_sampling", False))
    capacity_factor = getattr(args, "capacity_factor", None)
    if not sampling and capacity_factor is None:
        return None
    routers = [router for _, router in find_routers(student)]
    hooks = Top2RoutingHooks(routers, second_expert_sampling=sampling, capacity_factor=capacity_factor,
                             min_capacity=int(getattr(args, "min_capacity", 0)))
    logger.info("Training-time top-2 routing on %d routers: second expert %s, capacity factor %s (min %d).",
                len(routers), "sampled (Gumbel)" if sampling else "deterministic", capacity_factor,
                hooks.min_capacity)
    return hooks


def monitor_student_routers(student: nn.Module, args) -> RouterMonitor | None:
    """The trainers' set-up for an MoE student (None for a dense student): the official top-2 routing when asked
    (:func:`install_official_routing`, whose hooks run before the monitor's so that the monitor sees the routing
    used), a :class:`RouterMonitor` with ``args.aux_loss_type`` / ``args.aux_loss_mask_padding``, router logits
    kept out of a VLM wrapper's output (:func:`stop_router_outputs_through_vlm_wrapper`) and, under DeepSpeed
    ZeRO-3, :func:`prepare_sparse_blocks_for_zero3` (before the engine is built in ``train()``)."""
    if not is_moe_model(student):
        return None
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        prepare_sparse_blocks_for_zero3(student, args)
    stop_router_outputs_through_vlm_wrapper(student)
    routing = install_official_routing(student, args)
    monitor = RouterMonitor(student, aux_loss_type=getattr(args, "aux_loss_type", "switch"),
                            aux_loss_mask_padding=getattr(args, "aux_loss_mask_padding", True),
                            routing=routing)
    return monitor
