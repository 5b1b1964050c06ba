"""Reduction of per-position losses, shared by every token-level loss."""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def reduce_token_losses(
    per_token: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask and reduce a tensor of per-position losses.

    Args:
        per_token: ``(...)`` float losses, one per position.
        mask: ``(...)`` bool (True = counts) or None (all count).
        reduction: ``"mean"`` divides the masked sum by ``num_items_in_batch`` when given (the global valid-token
            count of a Trainer step, so that accumulation and data parallelism equal one large batch), else by the
            number of valid positions; ``"sum"`` returns the masked sum; ``"none"`` returns ``(...)`` with zeros at
            masked positions.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if mask is not None:
        if mask.shape != per_token.shape:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)} but the losses have shape {tuple(per_token.shape)}: the mask "
                "must cover every position except the vocabulary dimension."
            )
        per_token = torch.where(mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        denominator = num_items_in_batch
    else:
        denominator = mask.sum() if mask is not None else per_token.numel()
    return total / at_least_one(denominator, device=total.device, dtype=total.dtype)


def at_least_one(count, *, device=None, dtype: torch.dtype = torch.float32):
    """A divisor that is at least 1: a loss summed over no valid token (or example) divided by it is 0, not 0/0.

    ``count`` is a number (-> a Python float) or a tensor (-> a tensor of ``dtype`` on ``device``, default its own
    device), as the step's global token counts are under gradient accumulation and data parallelism.
    """
    if isinstance(count, torch.Tensor):
        return count.to(count.device if device is None else device, dtype).clamp_min(1)
    return max(float(count), 1.0)
