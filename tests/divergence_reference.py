"""The divergences of docs/ALGORITHMS.md section 0 written from their formulas on probability vectors (float64), shared
by the tests of the dense losses, the chunked engine and the cached top-k teacher."""

from __future__ import annotations

import torch


def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v), with 0 log 0 = 0 (terms where a_v = 0 are dropped)."""
    pos = a > 0
    one = torch.ones((), dtype=a.dtype)
    safe_a = torch.where(pos, a, one)
    safe_b = torch.where(pos, b, one)
    terms = torch.where(pos, safe_a * (torch.log(safe_a) - torch.log(safe_b)), torch.zeros((), dtype=a.dtype))
    return terms.sum(dim=-1)


def divergence_of_probs(name: str, p: torch.Tensor, q: torch.Tensor, beta: float = 0.5,
                        alpha: float = 0.1) -> torch.Tensor:
    """The divergence between the teacher's ``p`` and the student's ``q`` (``(..., V)`` -> ``(...)``), unscaled.

    ``jsd`` follows the GKD convention: beta = 0 is KL(p || q), beta = 1 is KL(q || p) (the mixture formula's limits).
    """
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "jsd":
        if beta == 0.0:
            return kl(p, q)
        if beta == 1.0:
            return kl(q, p)
        m = beta * p + (1.0 - beta) * q
        return beta * kl(p, m) + (1.0 - beta) * kl(q, m)
    if name == "skew_fkl":
        return kl(p, alpha * p + (1.0 - alpha) * q)
    if name == "skew_rkl":
        return kl(q, alpha * q + (1.0 - alpha) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(f"unknown divergence {name}")
