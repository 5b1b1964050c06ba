"""Divergences by name, as token-loss callables the chunked engine (and the trainers) consume.

A *token loss* is any callable ``(student_logits (N, V), teacher_logits (N, V)) -> (N,)`` returning float32
per-position losses (already scaled, e.g. by T^2). Adding a divergence costs one kernel in
:mod:`llmkd.losses.divergences` and one line in :data:`DIVERGENCE_KERNELS`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .divergences import (
    forward_kl_per_token,
    jsd_per_token,
    reverse_kl_per_token,
    skew_forward_kl_per_token,
    skew_reverse_kl_per_token,
    softened_log_probs,
    tvd_per_token,
)
from .fused import FusedKL
from .sparse_teacher import SparseTeacher

# name -> (kernel on (log_q, log_p), names of the kernel's own hyperparameters)
DIVERGENCE_KERNELS: dict[str, tuple[Callable[..., torch.Tensor], tuple[str, ...]]] = {
    "fkl": (forward_kl_per_token, ()),
    "rkl": (reverse_kl_per_token, ()),
    "jsd": (jsd_per_token, ("beta",)),
    "skew_fkl": (skew_forward_kl_per_token, ("alpha",)),
    "skew_rkl": (skew_reverse_kl_per_token, ("alpha",)),
    "tvd": (tvd_per_token, ()),
}
ALIASES = {
    "forward_kl": "fkl",
    "kl": "fkl",
    "reverse_kl": "rkl",
    "generalized_jsd": "jsd",
    "skew_forward_kl": "skew_fkl",
    "skew_reverse_kl": "skew_rkl",
}


@dataclass(frozen=True)
class Divergence:
    """A named divergence with its temperature and hyperparameters, callable as a token loss.

    ``__call__(student_logits (N, V), teacher_logits (N, V)) -> (N,)`` float32, scaled by ``T^2`` unless
    ``scale_by_t2`` is False (SinKD's KD term follows its paper and official code: no ``T^2``).
    """

    name: str
    temperature: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    scale_by_t2: bool = True

    def __call__(self, student_logits: torch.Tensor, teacher_logits) -> torch.Tensor:
        """``teacher_logits``: ``(N, V)``, or a cached top-k :class:`SparseTeacher`: the divergence is then computed
        on the top-k support plus one tail bucket, exactly (see :mod:`.sparse_teacher`)."""
        kernel, _ = DIVERGENCE_KERNELS[self.name]
        log_q = softened_log_probs(student_logits, self.temperature)
        if isinstance(teacher_logits, SparseTeacher):
            teacher_logits.check_temperature(self.temperature)
            log_p = teacher_logits.dense_log_probs(like=log_q)
        else:
            log_p = softened_log_probs(teacher_logits, self.temperature)
        losses = kernel(log_q, log_p, **self.params)
        return losses * (self.temperature**2) if self.scale_by_t2 else losses

    def fused_kl(self) -> FusedKL | None:
        """Forward KL is ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``: the chunked engine computes it (and its
        gradient) in closed form (:mod:`.fused`). The other divergences return None and run through autograd."""
        if self.name != "fkl":
            return None
        return FusedKL(temperature=self.temperature, factor=self.temperature**2 if self.scale_by_t2 else 1.0)


def get_divergence(name: str, *, temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                   scale_by_t2: bool = True) -> Divergence:
    """Build a :class:`Divergence` by name (``fkl``, ``rkl``, ``jsd``, ``skew_fkl``, ``skew_rkl``, ``tvd`` or an
    alias such as ``forward_kl``). ``beta`` is used by ``jsd`` only, ``alpha`` by the skew KLs only."""
    canonical = ALIASES.get(name, name)
    if canonical not in DIVERGENCE_KERNELS:
        choices = sorted(set(DIVERGENCE_KERNELS) | set(ALIASES))
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown divergence {name!r}; choose one of {choices}.{hint}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    _, param_names = DIVERGENCE_KERNELS[canonical]
    given = {"beta": beta, "alpha": alpha}
    params = {key: given[key] for key in param_names}
    # validate hyperparameters once, here, rather than at the first training step
    probe = torch.zeros(1, 2)
    DIVERGENCE_KERNELS[canonical][0](probe, probe, **params)
    return Divergence(canonical, temperature, params, scale_by_t2)
