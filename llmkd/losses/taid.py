"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv 2501.16937).

The target of each token is an interpolation, in logit space and in float32, between the (detached) student and
the teacher (paper eq. 3):

    p_t = softmax((1 - t) * stopgrad(z_s) + t * z_t)          loss = KL(p_t || q_theta),  q_theta = softmax(z_s)

The official code minimises the cross-entropy ``-sum p_t log q_theta``, which has the same gradient; llmkd reports
the KL so that the logged value is 0 when the student matches its target.

``t`` follows :class:`TAIDSchedule`: a linear floor from ``t_start`` to ``t_end`` plus an adaptive, momentum-driven
increase while the loss keeps falling (paper eq. 5-6), updated once per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .divergences import kl_per_token
from .reduction import reduce_token_losses
from .fused import FusedKL
from .sparse_teacher import as_dense_logits


def taid_target_log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """log p_t for logits ``(..., V)``: ``log_softmax((1 - t) * stopgrad(z_s) + t * z_t)`` in float32.

    ``-inf`` teacher logits (masked vocabulary entries) stay ``-inf`` for any t > 0.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"TAID interpolation t must be in [0, 1], got {t}.")
    student = student_logits.detach().float()
    teacher = teacher_logits.float()
    if t == 0.0:
        mixed = student
    elif t == 1.0:
        mixed = teacher
    else:
        mixed = (1.0 - t) * student + t * teacher
    return torch.log_softmax(mixed, dim=-1)


def taid_per_token(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(p_t || q_theta) per row: logits ``(N, V)`` -> ``(N,)`` float32. No gradient flows through p_t."""
    log_target = taid_target_log_probs(student_logits, teacher_logits, t)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    return kl_per_token(log_target, log_q)


def taid_loss(student_logits, teacher_logits, mask=None, *, t: float, reduction="mean", num_items_in_batch=None):
    """The TAID loss on logits.

    Args:
        student_logits: ``(..., V)``.
        teacher_logits: ``(..., V)``.
        mask: ``(...)`` bool, True where the position counts.
        t: the interpolation coefficient in [0, 1] (0: the student's own distribution, 1: the teacher's).
    Returns:
        A scalar for ``"mean"``/``"sum"``, ``(...)`` for ``"none"`` (see :func:`llmkd.losses.reduce_token_losses`).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} must "
            "have the same shape; align the vocabularies first."
        )
    vocab = student_logits.shape[-1]
    per_token = taid_per_token(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), t)
    per_token = per_token.reshape(student_logits.shape[:-1])
    return reduce_token_losses(per_token, mask, reduction=reduction, num_items_in_batch=num_items_in_batch)


@dataclass(frozen=True)
class TAIDTokenLoss:
    """TAID at a fixed ``t`` as a token loss for the chunked engine: ``(z_s (n, V), z_t (n, V)) -> (n,)``."""

    t: float

    def __call__(self, student_logits: torch.Tensor, teacher_logits) -> torch.Tensor:
        # a cached top-k teacher enters the interpolation densified (tail shaped like the student's; .sparse_teacher)
        return taid_per_token(student_logits, as_dense_logits(teacher_logits, student_logits), self.t)

    def fused_kl(self) -> FusedKL:
        """KL(p_t || q) with ``p_t = softmax(t z_t + (1 - t) stopgrad(z_s))``: a forward KL to a constant target, which
        the chunked engine computes in closed form (:mod:`.fused`)."""
        return FusedKL(temperature=1.0, factor=1.0, teacher_share=self.t)


@dataclass
class TAIDSchedule:
    """The state (t, m, prev) of TAID's adaptive interpolation and its once-per-optimizer-step update.

    Update with the TAID loss J of an optimizer step (averaged over micro-batches and data-parallel ranks)::

        first step: prev = J; no update
        delta = (prev - J) / (prev + 1e-15)
        m     = beta * m + (1 - beta) * delta
        dt    = alpha * sigmoid(m) * (1 - t)
        t_lin = t_start + (t_end - t_start) * global_step / max_steps
        t     = min(t_end, max(t_lin, t + dt));  prev = J

    ``disable_adaptive`` makes t follow ``t_lin`` alone. t never decreases. ``state_dict``/``load_state_dict``
    carry everything a resumed run needs.
    """

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    disable_adaptive: bool = False
    t: float | None = None
    momentum: float = 0.0
    prev_loss: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.t_start <= self.t_end <= 1.0:
            raise ValueError(f"TAID needs 0 <= t_start <= t_end <= 1, got t_start={self.t_start}, t_end={self.t_end}.")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"TAID momentum beta must be in [0, 1), got {self.beta}.")
        if self.alpha < 0.0:
            raise ValueError(f"TAID step size alpha must be >= 0, got {self.alpha}.")
        if self.t is None:
            self.t = self.t_start

    def linear_floor(self, global_step: int, max_steps: int) -> float:
        if max_steps <= 0:
            raise ValueError(f"max_steps must be > 0 for the TAID schedule, got {max_steps}.")
        progress = min(max(global_step / max_steps, 0.0), 1.0)
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss: float, global_step: int, max_steps: int) -> float:
        """Advance the schedule with the step's loss ``J``; returns the new t."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"TAID schedule got a non-finite loss {loss} at step {global_step}.")
        floor = self.linear_floor(global_step, max_steps)
        if self.disable_adaptive:
            self.t = min(self.t_end, max(self.t, floor))
            self.prev_loss = loss
            return self.t
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        dt = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
        self.t = min(self.t_end, max(floor, self.t + dt))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if not hasattr(self, key):
                raise KeyError(f"Unknown TAID schedule state {key!r}; expected {sorted(asdict(self))}.")
            setattr(self, key, value)
