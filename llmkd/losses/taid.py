"""TAID: Temporally Adaptive Interpolated Distillation (Shing et al., ICLR 2025, arXiv 2501.16937).

The target of each token is an interpolation, in logit space and in float32, between the (detached) student and
the teacher (paper eq. 3):

    p_t = softmax((1 - t) * stopgrad(z_s) + t * z_t)          loss = KL(p_t || q_theta),  q_theta = softmax(z_s)

The official code (SakanaAI/TAID) minimises the cross-entropy ``-sum p_t log q_theta = KL(p_t || q_theta) + H(p_t)``,
which has the same gradient; llmkd reports the KL so that the logged value is 0 when the student matches its target,
and reports ``H(p_t)`` beside it (:meth:`TAIDTokenLoss.with_target_entropy`) because the official schedule is driven
by the cross-entropy.

``t`` follows :class:`TAIDSchedule`: a linear floor from ``t_start`` to ``t_end`` plus an adaptive, momentum-driven
increase while the loss keeps falling, updated once per optimizer step. docs/TAID.md states every formula and each
difference from the official code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .divergences import kl_per_token
from .reduction import reduce_token_losses
from .fused import FusedKL


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
    return kl_per_token(log_target, torch.log_softmax(student_logits.float(), dim=-1))


def taid_per_token_with_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float):
    """``(KL(p_t || q_theta), H(p_t))`` per row from one softmax of the target: logits ``(N, V)`` -> two ``(N,)``
    float32 tensors; the KL carries the gradient, the entropy ``-sum_v p_t log p_t`` is detached (``-inf`` logits,
    i.e. ``p_t = 0``, contribute 0). Their sum is the official code's loss, the cross-entropy ``-sum_v p_t log q``."""
    log_target = taid_target_log_probs(student_logits, teacher_logits, t)
    log_q = torch.log_softmax(student_logits.float(), dim=-1)
    with torch.no_grad():
        target = log_target.exp()
        entropy = -torch.where(target > 0, target * log_target, torch.zeros((), device=target.device)).sum(-1)
    return kl_per_token(log_target, log_q), entropy


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

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        # a cached top-k teacher enters the interpolation densified, its tail shaped like the student's (the engine
        # does it: llmkd.losses.targets)
        return taid_per_token(student_logits, teacher_logits, self.t)

    def with_target_entropy(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor):
        """``(KL (n,), H(p_t) (n,))``: the loss and its target's entropy from one softmax (the chunked engine's
        ``target_entropy_sum``; KL + H is the cross-entropy the official schedule is fed)."""
        return taid_per_token_with_entropy(student_logits, teacher_logits, self.t)

    def fused_kl(self) -> FusedKL:
        """KL(p_t || q) with ``p_t = softmax(t z_t + (1 - t) stopgrad(z_s))``: a forward KL to a constant target, which
        the chunked engine computes in closed form (:mod:`.fused`)."""
        return FusedKL(temperature=1.0, factor=1.0, teacher_share=self.t)


SCHEDULE_LOSSES = ("cross_entropy", "kl")


@dataclass
class TAIDSchedule:
    """The state (t, m, prev) of TAID's adaptive interpolation and its once-per-optimizer-step update.

    ``update(J, step, max_steps)`` takes the loss ``J`` of the optimizer step whose index is ``step`` (the number
    of optimizer steps completed before it: 0 for the first step, as the official code's ``global_step`` when its
    loss is computed) and returns the t of the next step::

        first call: prev = J; nothing else changes
        delta = (prev - J) / (prev + 1e-15)
        m     = beta * m + (1 - beta) * delta
        dt    = alpha * sigmoid(m) * (1 - t)
        t_lin = t_start + (t_end - t_start) * step / max_steps
        t     = min(t_end, max(t_lin, t + dt))            (disable_adaptive: t = t_lin; m is still updated)
        prev  = J

    The t that step n's loss uses is the one returned by the update of step n - 1 (``t_start`` for the first two
    steps). ``J`` is whatever the caller feeds: :class:`~llmkd.TAIDTrainer` feeds the cross-entropy
    ``-sum p_t log q`` (the official code's loss) or the KL, as ``schedule_loss`` names; the name is kept in the
    state so that a checkpoint's ``prev`` is never compared with the other kind. The arithmetic is float64 (Python
    floats); the official code's is float32 (docs/TAID.md gives the measured difference). t never decreases.
    ``state_dict``/``load_state_dict`` carry everything a resumed run needs.
    """

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    disable_adaptive: bool = False
    schedule_loss: str = "cross_entropy"
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
        if self.schedule_loss not in SCHEDULE_LOSSES:
            raise ValueError(f"TAID schedule_loss must be one of {SCHEDULE_LOSSES}, got {self.schedule_loss!r}: "
                             "'cross_entropy' reproduces the official code, 'kl' feeds KL(p_t || q) instead.")
        if self.t is None:
            self.t = self.t_start

    def linear_floor(self, step: int, max_steps: int) -> float:
        """``t_start + (t_end - t_start) * step / max_steps``, the progress clipped to [0, 1]."""
        if max_steps <= 0:
            raise ValueError(f"max_steps must be > 0 for the TAID schedule, got {max_steps}.")
        progress = min(max(step / max_steps, 0.0), 1.0)
        return self.t_start + (self.t_end - self.t_start) * progress

    def update(self, loss: float, step: int, max_steps: int) -> float:
        """Advance the schedule with the loss ``J`` of optimizer step ``step`` (0-based); returns the new t."""
        loss = float(loss)
        if not math.isfinite(loss):
            raise ValueError(f"TAID schedule got a non-finite loss {loss} at step {step}.")
        floor = self.linear_floor(step, max_steps)
        if self.prev_loss is None:
            self.prev_loss = loss
            return self.t
        delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
        if self.disable_adaptive:
            self.t = floor
        else:
            dt = self.alpha * (1.0 / (1.0 + math.exp(-self.momentum))) * (1.0 - self.t)
            self.t = min(self.t_end, max(floor, self.t + dt))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in state:
            if not hasattr(self, key):
                raise KeyError(f"Unknown TAID schedule state {key!r}; expected {sorted(asdict(self))}.")
        saved_loss = state.get("schedule_loss", self.schedule_loss)
        if saved_loss != self.schedule_loss:
            raise ValueError(
                f"The saved TAID schedule was driven by schedule_loss={saved_loss!r} but this run uses "
                f"{self.schedule_loss!r}: its previous loss and momentum measure the other quantity. Resume with "
                f"schedule_loss={saved_loss!r}, or start a new run."
            )
        for key, value in state.items():
            setattr(self, key, value)
