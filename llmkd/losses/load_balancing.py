"""The Switch/GShard load-balancing auxiliary loss of an MoE model, from its routers' logits.

For router logits ``r_l`` of layer ``l`` (``(n, E)``, one row per token), probabilities ``p = softmax(r_l)`` and
the top-k experts of each token, over all sparse layers and the (non-padding) tokens together:

    f_e = (number of top-k assignments to expert e) / (number of token rows)      (sums to k)
    P_e = (sum of p_e over the token rows) / (number of token rows)
    aux = E * sum_e f_e * P_e

This is transformers' ``load_balancing_loss_func`` (what ``outputs.aux_loss`` of Qwen2-MoE / Qwen3-MoE / Mixtral
holds), so the value equals the model's own when the model returns it; llmkd computes it from router logits
captured with hooks because LLaVA-style wrappers do not return it. Only ``P`` carries gradient (``f`` is a count).

LLaVA-MoD's official code uses another formula, DeepSpeed's top-2 gating loss (:func:`deepspeed_top2_aux_loss`):
per layer, E^2 * mean_e(mean p_e * top-1 share_e), summed over the sparse layers. At a uniform router it is 1 per
layer (so 12 for 12 sparse layers) where the formula above gives ``top_k`` for the whole model: with the same
coefficient the official balancing pressure (its gradient) is about ``num_sparse_layers / top_k`` times stronger.
:func:`router_aux_loss` picks one by name (``aux_loss_type`` of the MoE trainers' configs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def expert_assignment_counts(router_logits: torch.Tensor, top_k: int, token_mask: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Top-k assignments per expert of one layer: ``(n, E)`` logits, ``(n,)`` mask -> ``(E,)`` float counts."""
    num_experts = router_logits.shape[-1]
    chosen = router_logits.detach().topk(top_k, dim=-1).indices  # (n, k)
    weights = torch.ones_like(chosen, dtype=torch.float32)
    if token_mask is not None:
        weights = weights * token_mask.reshape(-1, 1).to(torch.float32)
    return torch.zeros(num_experts, dtype=torch.float32, device=router_logits.device).scatter_add_(
        0, chosen.reshape(-1), weights.reshape(-1))


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The load-balancing loss over the sparse layers.

    Args:
        router_logits: one ``(n, E)`` tensor per sparse layer (n = batch * sequence, in the order of the mask).
        top_k: experts per token.
        token_mask: ``(n,)`` or ``(B, S)``; 1 for tokens that count (the attention mask), None for all.

    Returns:
        A scalar fp32 tensor (``top_k`` for a perfectly uniform router), differentiable in the router logits.
    """
    if not router_logits:
        raise ValueError("No router logits: the model has no sparse layer (or the routers were not recorded).")
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    mask = None if token_mask is None else token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=device)
    prob_sums = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (n, E)
        if mask is not None and mask.numel() != probs.shape[0]:
            raise ValueError(f"token_mask has {mask.numel()} entries but the router saw {probs.shape[0]} tokens.")
        counts = counts + expert_assignment_counts(logits, top_k, mask)
        prob_sums = prob_sums + (probs if mask is None else probs * mask[:, None]).sum(0)
        rows = rows + (probs.shape[0] if mask is None else mask.sum())
    rows = rows.clamp_min(1.0)
    return num_experts * torch.sum((counts / rows) * (prob_sums / rows))


def deepspeed_top2_aux_loss(router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor | None = None
                            ) -> torch.Tensor:
    """The load-balancing loss of LLaVA-MoD's official code: DeepSpeed's top-2 gating loss, summed over layers.

    For each sparse layer, with ``p = softmax(r_l)`` over its ``n`` token rows and ``first`` the top-1 expert:

        me_e = mean over rows of p_e,     ce_e = (rows whose first expert is e) / rows
        l_aux = E^2 * mean_e(me_e * ce_e) = E * sum_e me_e * ce_e       (1 for a perfectly uniform router)

    and the loss is the SUM of ``l_aux`` over the sparse layers (``deepspeed.moe.sharded_moe.top2gating``; the
    official model adds ``router_aux_loss_coef * sum(l_aux)`` to its loss). Only the top-1 assignment counts in
    ``ce`` (the sampled second expert does not), and only ``me`` carries gradient.

    Args:
        router_logits: one ``(n, E)`` tensor per sparse layer.
        token_mask: ``(n,)`` or ``(B, S)``; 1 for rows that count. None counts every row, padding included, as the
            official code does (its runs used one sequence per device, so they had no padding).

    Returns:
        A scalar fp32 tensor (the number of sparse layers for a perfectly uniform router).
    """
    if not router_logits:
        raise ValueError("No router logits: the model has no sparse layer (or the routers were not recorded).")
    num_experts = router_logits[0].shape[-1]
    device = router_logits[0].device
    mask = None if token_mask is None else token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)  # (n, E)
        first = torch.nn.functional.one_hot(probs.detach().argmax(dim=-1), num_experts).to(torch.float32)
        if mask is None:
            me, ce = probs.mean(dim=0), first.mean(dim=0)
        else:
            if mask.numel() != probs.shape[0]:
                raise ValueError(f"token_mask has {mask.numel()} entries but the router saw {probs.shape[0]} tokens.")
            rows = mask.sum().clamp_min(1.0)
            me, ce = (probs * mask[:, None]).sum(0) / rows, (first * mask[:, None]).sum(0) / rows
        total = total + num_experts * num_experts * torch.mean(me * ce)
    return total


AUX_LOSS_TYPES = ("switch", "deepspeed_top2")


def router_aux_loss(aux_loss_type: str, router_logits: Sequence[torch.Tensor], top_k: int,
                    token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``switch``: :func:`load_balancing_loss` (transformers' definition); ``deepspeed_top2``:
    :func:`deepspeed_top2_aux_loss` (LLaVA-MoD's official code)."""
    if aux_loss_type == "switch":
        return load_balancing_loss(router_logits, top_k, token_mask)
    if aux_loss_type == "deepspeed_top2":
        return deepspeed_top2_aux_loss(router_logits, token_mask)
    raise ValueError(f"aux_loss_type must be one of {AUX_LOSS_TYPES}, got {aux_loss_type!r}.")
