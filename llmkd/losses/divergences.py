"""Token-level divergences between a student and a teacher distribution (docs/ALGORITHMS.md section 0).

Notation: ``z_s`` / ``z_t`` are the student / teacher logits of one position, ``q = softmax(z_s / T)`` and
``p = softmax(z_t / T)``. Every function here:

* takes logits of shape ``(..., V)`` in any dtype and does its math in float32;
* takes an optional boolean ``mask`` of shape ``(...)`` (True = the position counts);
* softens both sides by ``temperature`` and multiplies the divergence by ``T^2`` (Hinton et al., 2015), so that
  gradient magnitudes do not shrink as T grows; this is applied to every divergence, TVD included;
* treats ``-inf`` logits (masked vocabulary entries) as zero-probability tokens: terms with zero weight are
  exactly zero, never NaN;
* reduces with ``reduction``: ``"mean"`` (sum over valid positions / their count, or / ``num_items_in_batch``
  when it is given, which is how a trainer gets gradient-accumulation and data-parallel invariance), ``"sum"``,
  or ``"none"`` (a tensor of shape ``(...)`` with zeros at masked positions).

The ``*_per_token`` functions are the kernels shared with the chunked engine: they take float32 log-probability
rows ``(N, V)`` and return ``(N,)``.
"""

from __future__ import annotations

import math

import torch

from .reduction import reduce_token_losses

__all__ = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "alpha_beta_divergence",
    "kl_per_token",
    "forward_kl_per_token",
    "reverse_kl_per_token",
    "jsd_per_token",
    "skew_forward_kl_per_token",
    "skew_reverse_kl_per_token",
    "tvd_per_token",
    "alpha_beta_per_token",
]


# --------------------------------------------------------------------------------------------------------------
# Per-token kernels on float32 log-probabilities: (N, V), (N, V) -> (N,)
# --------------------------------------------------------------------------------------------------------------
def kl_per_token(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) per row.

    Args:
        log_a: ``(N, V)`` log-probabilities of the first distribution (may hold ``-inf``).
        log_b: ``(N, V)`` log-probabilities of the second distribution.
    Returns:
        ``(N,)`` float32. Entries where ``a_v = 0`` contribute exactly 0 (and a zero gradient).
    """
    a = log_a.exp()
    # torch.where on a difference (not on a log) keeps the backward free of 0 * inf.
    diff = torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=log_a.dtype, device=log_a.device))
    return (a * diff).sum(-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed stably; weight_a strictly inside (0, 1).

    Entries where both distributions are zero (both ``-inf``) are computed on finite stand-ins and set to ``-inf``
    afterwards: ``logaddexp(-inf, -inf)`` has a NaN gradient that would poison the whole row through softmax.
    """
    both_zero = torch.isneginf(log_a) & torch.isneginf(log_b)
    zero = torch.zeros((), dtype=log_a.dtype, device=log_a.device)
    safe_a = torch.where(both_zero, zero, log_a)
    safe_b = torch.where(both_zero, zero, log_b)
    mixed = torch.logaddexp(safe_a + math.log(weight_a), safe_b + math.log1p(-weight_a))
    return torch.where(both_zero, torch.full((), float("-inf"), dtype=mixed.dtype, device=mixed.device), mixed)


def forward_kl_per_token(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(p || q): teacher ``p`` weights the student's log-ratio (mode covering)."""
    return kl_per_token(log_p, log_q)


def reverse_kl_per_token(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """KL(q || p): the student weights the log-ratio (mode seeking)."""
    return kl_per_token(log_q, log_p)


def jsd_per_token(log_q: torch.Tensor, log_p: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD of GKD (Agarwal et al., 2024): ``beta KL(p||m) + (1-beta) KL(q||m)``, ``m = beta p + (1-beta) q``.

    The end points return the limits GKD and TRL use: ``beta = 0`` gives forward KL(p || q), ``beta = 1`` gives
    reverse KL(q || p) (the mixture formula itself vanishes there; its rescaled limit is the KL).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd needs 0 <= beta <= 1, got beta={beta}.")
    if beta == 0.0:
        return kl_per_token(log_p, log_q)
    if beta == 1.0:
        return kl_per_token(log_q, log_p)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * kl_per_token(log_p, log_m) + (1.0 - beta) * kl_per_token(log_q, log_m)


def skew_forward_kl_per_token(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM skew forward KL: KL(p || alpha p + (1 - alpha) q)."""
    _check_alpha(alpha)
    if alpha == 0.0:
        return kl_per_token(log_p, log_q)
    return kl_per_token(log_p, _log_mixture(log_p, log_q, alpha))


def skew_reverse_kl_per_token(log_q: torch.Tensor, log_p: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p)."""
    _check_alpha(alpha)
    if alpha == 0.0:
        return kl_per_token(log_q, log_p)
    return kl_per_token(log_q, _log_mixture(log_q, log_p, alpha))


def tvd_per_token(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum_v |p_v - q_v|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"skew KL needs a skew coefficient 0 <= alpha < 1 (alpha = 1 makes the divergence identically 0), "
            f"got alpha={alpha}."
        )


# --------------------------------------------------------------------------------------------------------------
# Public functions on logits
# --------------------------------------------------------------------------------------------------------------
def softened_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` in float32; ``-inf`` entries stay ``-inf``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def _apply(
    kernel,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None,
    temperature: float,
    reduction: str,
    num_items_in_batch,
    **kernel_kwargs,
) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must "
            "have the same shape; align the vocabularies first (llmkd.teacher.align_vocab_size)."
        )
    vocab = student_logits.shape[-1]
    log_q = softened_log_probs(student_logits, temperature).reshape(-1, vocab)
    log_p = softened_log_probs(teacher_logits, temperature).reshape(-1, vocab)
    per_token = kernel(log_q, log_p, **kernel_kwargs) * (temperature**2)
    per_token = per_token.reshape(student_logits.shape[:-1])
    return reduce_token_losses(per_token, mask, reduction=reduction, num_items_in_batch=num_items_in_batch)


def forward_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", num_items_in_batch=None):
    """Forward KL(p || q) (Hinton KD).

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``.
        mask: ``(...)`` bool, True where the position counts; None = all count.
    Returns:
        A scalar for ``"mean"``/``"sum"``, ``(...)`` for ``"none"``.
    """
    return _apply(forward_kl_per_token, student_logits, teacher_logits, mask, temperature, reduction, num_items_in_batch)


def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", num_items_in_batch=None):
    """Reverse KL(q || p). Shapes as :func:`forward_kl`."""
    return _apply(reverse_kl_per_token, student_logits, teacher_logits, mask, temperature, reduction, num_items_in_batch)


def generalized_jsd(
    student_logits, teacher_logits, mask=None, *, beta=0.5, temperature=1.0, reduction="mean", num_items_in_batch=None
):
    """Generalized JSD with mixture ``m = beta p + (1 - beta) q`` (GKD convention; beta=0 -> forward KL,
    beta=1 -> reverse KL). Shapes as :func:`forward_kl`."""
    return _apply(
        jsd_per_token, student_logits, teacher_logits, mask, temperature, reduction, num_items_in_batch, beta=beta
    )


def skew_forward_kl(
    student_logits, teacher_logits, mask=None, *, alpha=0.1, temperature=1.0, reduction="mean", num_items_in_batch=None
):
    """DistiLLM skew forward KL: KL(p || alpha p + (1 - alpha) q), alpha = 0.1. Shapes as :func:`forward_kl`."""
    return _apply(
        skew_forward_kl_per_token, student_logits, teacher_logits, mask, temperature, reduction, num_items_in_batch,
        alpha=alpha,
    )


def skew_reverse_kl(
    student_logits, teacher_logits, mask=None, *, alpha=0.1, temperature=1.0, reduction="mean", num_items_in_batch=None
):
    """DistiLLM skew reverse KL: KL(q || alpha q + (1 - alpha) p), alpha = 0.1. Shapes as :func:`forward_kl`."""
    return _apply(
        skew_reverse_kl_per_token, student_logits, teacher_logits, mask, temperature, reduction, num_items_in_batch,
        alpha=alpha,
    )


def tvd(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduction="mean", num_items_in_batch=None):
    """Total variation distance 0.5 * sum |p - q|. Shapes as :func:`forward_kl`."""
    return _apply(tvd_per_token, student_logits, teacher_logits, mask, temperature, reduction, num_items_in_batch)




def alpha_beta_divergence(student_logits, teacher_logits, mask=None, *, ab_alpha=0.2, ab_beta=0.7, temperature=1.0,
                          reduction="mean", num_items_in_batch=None):
    """The alpha-beta divergence of ABKD (:func:`alpha_beta_per_token`; ``ab_alpha = 1, ab_beta = 0`` is forward
    KL, ``0, 1`` reverse KL). Shapes as :func:`forward_kl`."""
    return _apply(
        alpha_beta_per_token, student_logits, teacher_logits, mask, temperature, reduction, num_items_in_batch,
        ab_alpha=ab_alpha, ab_beta=ab_beta,
    )

def alpha_beta_per_token(log_q: torch.Tensor, log_p: torch.Tensor, ab_alpha: float = 0.2,
                         ab_beta: float = 0.7) -> torch.Tensor:
    """The alpha-beta divergence of ABKD (Wang et al., ICML 2025; Cichocki et al., 2011) between the teacher ``p``
    and the student ``q``, per row (docs/ALGORITHMS.md section 0.8), with ``a = ab_alpha``, ``b = ab_beta``:

        D_AB = -1 / (a b) * sum_v ( p^a q^b - a / (a + b) p^(a + b) - b / (a + b) q^(a + b) )      a, b > 0

    and the limits of that formula where a parameter is 0: ``b = 0`` gives
    ``1 / a^2 sum_v (p^a log(p^a / q^a) - p^a + q^a)`` (forward KL at a = 1), ``a = 0`` gives
    ``1 / b^2 sum_v (q^b log(q^b / p^b) - q^b + p^b)`` (reverse KL at b = 1) and ``a = b = 0`` gives
    ``1/2 sum_v (log p - log q)^2``. ``a`` moves the focus to the tokens the teacher is confident of, ``b`` to those
    the student is; the default (0.2, 0.7) is the official code's LLM setting. Both must be >= 0 (the paper's
    range): a negative power of a zero probability is infinite.

    Each term of the sum is >= 0 (weighted AM-GM); it is computed in a form that never subtracts nearly equal
    numbers (``expm1`` of the log-ratio), so that a student close to its teacher gets a loss and a gradient
    accurate to float32 rounding instead of the formula's cancellation error.

    Args:
        log_q: ``(N, V)`` float32 student log-probabilities (may hold ``-inf``).
        log_p: ``(N, V)`` float32 teacher log-probabilities.
    Returns:
        ``(N,)`` float32; entries where both probabilities are 0 contribute exactly 0.
    """
    a, b = float(ab_alpha), float(ab_beta)
    if not (a >= 0 and b >= 0):  # also refuses NaN
        raise ValueError(f"the alpha-beta divergence needs ab_alpha >= 0 and ab_beta >= 0, got ab_alpha={ab_alpha}, "
                         f"ab_beta={ab_beta}.")
    zero = torch.zeros((), dtype=log_q.dtype, device=log_q.device)
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_q)
    log_p = torch.where(both_zero, zero, log_p)  # finite stand-ins, zeroed below: no NaN in the backward
    log_q = torch.where(both_zero, zero, log_q)
    if a > 0 and b > 0:
        terms = _alpha_beta_terms(log_p, log_q, a, b)
    elif a > 0:
        terms = _powered_kl_terms(log_p, log_q, a)
    elif b > 0:
        terms = _powered_kl_terms(log_q, log_p, b)
    else:
        terms = 0.5 * (log_p - log_q).square()
    return torch.where(both_zero, zero, terms).sum(-1)


def _alpha_beta_terms(log_p: torch.Tensor, log_q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """``(w x + (1 - w) y - x^w y^(1 - w)) / (a b)`` with ``x = p^(a+b)``, ``y = q^(a+b)``, ``w = a / (a + b)``: the
    general-case term, written around the larger of ``x`` and ``y`` as ``larger * (u expm1(d) - expm1(u d))`` with
    ``d = log(smaller / larger) <= 0`` and ``u`` the weight of the smaller side; for ``|d| < 1`` as
    ``larger * (u E(d) - E(u d))``, ``E(t) = expm1(t) - t``, whose two terms are both O(d^2) (no cancellation)."""
    s = a + b
    teacher_larger = log_p >= log_q
    log_larger = torch.maximum(log_p, log_q)
    d = s * (torch.minimum(log_p, log_q) - log_larger)
    u = torch.where(teacher_larger, torch.tensor(b / s, dtype=d.dtype, device=d.device),
                    torch.tensor(a / s, dtype=d.dtype, device=d.device))
    near_zero = d > -1.0
    d_near = torch.where(near_zero, d, torch.zeros((), dtype=d.dtype, device=d.device))
    bracket = torch.where(near_zero, u * _expm1_minus_x(d_near) - _expm1_minus_x(u * d_near),
                          u * torch.expm1(d) - torch.expm1(u * d))
    return torch.exp(s * log_larger) * bracket / (a * b)


def _powered_kl_terms(log_x: torch.Tensor, log_y: torch.Tensor, c: float) -> torch.Tensor:
    """``(x^c log(x^c / y^c) - x^c + y^c) / c^2``, the generalized KL between the powered distributions, as
    ``x^c E(d) / c^2`` with ``d = c log(y / x)``, ``E(t) = expm1(t) - t`` (and ``y^c - x^c - x^c d`` where ``d`` is
    large, so that ``expm1`` cannot overflow)."""
    x, y = torch.exp(c * log_x), torch.exp(c * log_y)
    live = x > 0
    d = torch.where(live, c * (log_y - log_x), torch.zeros((), dtype=log_x.dtype, device=log_x.device))
    small = d < 20.0
    near = x * _expm1_minus_x(torch.clamp(d, max=20.0))
    far = -y * torch.expm1(-d) - x * d
    return torch.where(live, torch.where(small, near, far), y) / c**2


def _expm1_minus_x(t: torch.Tensor) -> torch.Tensor:
    """``exp(t) - 1 - t`` accurate to rounding for every ``t`` (a Taylor series to ``t^16`` for ``|t| <= 1/2``, where
    computing it as ``expm1(t) - t`` would cancel); ``+inf`` at ``t = -inf``."""
    small = t.abs() <= 0.5
    ts = torch.where(small, t, torch.zeros((), dtype=t.dtype, device=t.device))
    series = torch.zeros_like(ts)
    for k in range(16, 1, -1):  # Horner: t^2 (1/2! + t (1/3! + ... + t / 16!)); truncation < 1e-19 relative
        series = (series + 1.0 / math.factorial(k)) * (ts if k > 2 else ts * ts)
    return torch.where(small, series, torch.expm1(t) - t)
