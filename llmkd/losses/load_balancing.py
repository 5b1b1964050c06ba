"""The Switch/GShard load-balancing auxiliary loss of an MoE model, from its routers' logits.

For router logits ``r_l`` of layer ``l`` (``(n, E)``, one row per token), probabilities ``p = softmax(r_l)`` and
the top-k experts of each token, over all sparse layers and the (non-padding) tokens together:

    f_e = (number of top-k assignments to expert e) / (number of token rows)      (sums to k)
    P_e = (sum of p_e over the token rows) / (number of token rows)
    aux = E * sum_e f_e * P_e

This is transformers' ``load_balancing_loss_func`` (what ``outputs.aux_loss`` of Qwen2-MoE / Qwen3-MoE / Mixtral
holds), so the value equals the model's own when the model returns it; llmkd computes it from router logits
captured with hooks because LLaVA-style wrappers do not return it. Only ``P`` carries gradient (``f`` is a count).
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
