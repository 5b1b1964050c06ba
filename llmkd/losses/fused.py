"""Closed-form value and gradient of a chunk's forward KL + cross-entropy, without autograd (the engine's fast path).

For one chunk of ``n`` tokens with student logits ``z`` and *target* logits ``y`` (both ``(n, V)`` float32):

    q_T = softmax(z / T),  p = softmax(y / T),  q_1 = softmax(z)
    loss = a * f * sum_n KL(p || q_T)  +  c * sum_n CE(z, label)
    dloss/dz = (a * f / T) * (q_T - p)  +  c * (q_1 - onehot(label))          (rows with label -100: no CE term)

``a`` is the token loss's weight, ``f`` its factor (``T^2`` for Hinton's scaling), ``c`` the CE weight. The target
is treated as a constant (the teacher's logits, or TAID's interpolation that only sees ``stopgrad(z)``).

Why by hand: autograd through ``log_softmax`` / ``exp`` / ``where`` / ``sum`` keeps several ``(n, V)`` tensors for the
backward and runs as many full passes over them again; here each softmax is one row-wise (cache-resident) kernel
written into a reusable buffer, the KL comes from per-row dot products
(``KL = <p, y/T> - lse(y/T) - <p, z/T> + lse(z/T)``), and the gradient is formed in place, so a chunk costs a handful
of passes over ``n x V`` and allocates nothing after the first chunk. Log-normalisers come from the softmax
itself: ``lse = max(x) - log max(softmax(x))`` (the largest probability is at least ``1/V``, so the log is
accurate).

Used by :mod:`llmkd.losses.engine` when the token loss is a forward KL to a target (see
:class:`FusedKL`); every other token loss goes through autograd. The tests hold both paths equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..constants import IGNORE_INDEX

# Logits below (row max - _FLOOR) have probability exactly 0 in float32 (exp(-104) underflows); clamping there
# makes p * log p exactly 0 for -inf entries (masked vocabulary) instead of 0 * -inf = NaN.
_FLOOR = 1.0e4


@dataclass(frozen=True)
class FusedKL:
    """A token loss that is ``factor * KL(softmax(y / T) || softmax(z / T))`` with a constant target
    ``y = teacher_share * z_t + (1 - teacher_share) * stopgrad(z)``: forward KL has ``teacher_share = 1``, TAID's
    interpolation ``teacher_share = t`` (at ``T = 1``). Token losses describe themselves with one through a
    ``fused_kl()`` method; the engine then takes the fast path."""

    temperature: float = 1.0
    factor: float = 1.0
    teacher_share: float = 1.0


class ChunkWorkspace:
    """Reusable float32 ``(rows, V)`` buffers for the chunks of one engine call (allocated at the first chunk,
    sliced to the chunk's row count afterwards)."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        self.shape = (max_rows, vocab_size)
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, rows: int) -> torch.Tensor:
        buffer = self._buffers.get(name)
        if buffer is None:
            buffer = self._buffers[name] = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        return buffer[:rows]


def softmax_into(logits: torch.Tensor, out: torch.Tensor, logits_max: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(logits, -1)`` written into ``out`` (one fused row-wise kernel); returns the ``(n,)`` log-normaliser
    ``logsumexp(logits, -1) = max(logits) - log max(softmax)`` (``logits_max``: the row maxima, if known)."""
    torch.ops.aten._softmax.out(logits, -1, False, out=out)
    if logits_max is None:
        logits_max = logits.amax(dim=-1)
    return logits_max.reshape(-1) - out.amax(dim=-1).log()


def row_dot(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` for ``(n, V)`` tensors, the product written into ``scratch`` (which may be ``a`` or ``b``):
    ``(n,)``. (A batched ``bmm`` of n dot products measured 2.5x slower on CPU; a fresh product tensor pays its page
    faults.)"""
    return torch.mul(a, b, out=scratch).sum(-1)


def label_columns(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n,)`` labels with -100 = ignored -> ``valid`` ``(n,)`` bool and a gather index ``(n, 1)`` (ignored rows
    point at column 0; multiply what they read by ``valid``)."""
    valid = labels != IGNORE_INDEX
    return valid, torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)


def cross_entropy_sum(logits: torch.Tensor, lse: torch.Tensor, index: torch.Tensor, valid: torch.Tensor):
    """``sum over valid rows of lse - logits[label]``: logits ``(n, V)``, lse ``(n,)``, index/valid from
    :func:`label_columns`."""
    return ((lse - logits.gather(-1, index).squeeze(-1)) * valid).sum()


def fused_kl_ce_chunk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    kl: FusedKL,
    kd_weight: float,
    ce_weight: float,
    workspace: ChunkWorkspace,
):
    """Value sums and the gradient with respect to the logits of ``kd_weight * KD + ce_weight * CE`` for one chunk.

    Args:
        student_logits: ``(n, V)`` float32 ``z``, not modified.
        teacher_logits: ``(n, V)`` float32 ``z_t``; overwritten (it becomes the buffer of the softened target).
        labels: ``(n,)`` int64 next-token ids with -100 = ignored, or None (no CE).
        kl: the KL's temperature, factor and target.
        kd_weight / ce_weight: ``a`` and ``c`` of the module docstring.
        workspace: buffers ``"target_probs"``, ``"student_probs"`` and (``T != 1`` with labels) ``"plain_probs"``.
    Returns:
        ``(kd_sum, ce_sum, teacher_ce_sum, target_entropy_sum, grad)``: detached float32 scalars (the CE sums are 0
        without labels; ``target_entropy_sum`` is ``sum_n H(p)`` of the target ``p = softmax(y / T)``, without the
        factor, a by-product of the KL: ``KL + H(p)`` is the cross-entropy ``-sum_v p log q_T``) and the ``(n, V)``
        gradient (a workspace buffer: consume it before the next chunk).
    """
    rows = student_logits.shape[0]
    temperature = kl.temperature
    target_probs = workspace.get("target_probs", rows)
    zero = student_logits.new_zeros(())
    teacher_ce_sum = ce_sum = zero
    valid = labels_safe = None
    if labels is not None:
        valid, labels_safe = label_columns(labels)
        teacher_label_logits = teacher_logits.gather(-1, labels_safe).squeeze(-1)
        if not (temperature == 1.0 and kl.teacher_share == 1.0):  # else it comes from the target's lse below
            teacher_lse = softmax_into(teacher_logits, target_probs)
            teacher_ce_sum = ((teacher_lse - teacher_label_logits) * valid).sum()

    target = teacher_logits
    if kl.teacher_share != 1.0:
        target.mul_(kl.teacher_share).add_(student_logits, alpha=1.0 - kl.teacher_share)
    if temperature != 1.0:
        target.div_(temperature)
    target_max = target.amax(dim=-1, keepdim=True)
    target.clamp_(min=target_max - _FLOOR)  # -inf -> finite, probability still exactly 0
    target_lse = softmax_into(target, target_probs, target_max)
    if labels is not None and temperature == 1.0 and kl.teacher_share == 1.0:
        teacher_ce_sum = ((target_lse - teacher_label_logits) * valid).sum()
    target_neg_entropy = row_dot(target_probs, target, scratch=target) - target_lse  # sum_v p log p; target spent

    student_probs = workspace.get("student_probs", rows)
    if temperature != 1.0:
        softened_student = torch.div(student_logits, temperature, out=target)
    else:
        softened_student = student_logits
    cross = row_dot(target_probs, softened_student, scratch=student_probs)  # sum_v p z/T
    student_lse = softmax_into(softened_student, student_probs)
    kd_sum = (kl.factor * (target_neg_entropy - cross + student_lse)).sum()

    # the gradient, built in the student-probability buffer: kd_scale * (q_T - p) + c * (q_1 - onehot)
    kd_scale = kd_weight * kl.factor / temperature
    grad = student_probs
    target_entropy_sum = -target_neg_entropy.sum()
    if labels is None:
        grad.sub_(target_probs).mul_(kd_scale)
        return kd_sum.detach(), ce_sum, teacher_ce_sum, target_entropy_sum, grad
    if temperature == 1.0:
        plain_lse, plain_probs = student_lse, None
    else:
        plain_probs = workspace.get("plain_probs", rows)
        plain_lse = softmax_into(student_logits, plain_probs)
    ce_sum = cross_entropy_sum(student_logits, plain_lse, labels_safe, valid)
    all_valid = bool(valid.all())
    if ce_weight == 0.0:
        grad.sub_(target_probs).mul_(kd_scale)
    elif plain_probs is None and all_valid:
        grad.mul_(kd_scale + ce_weight).sub_(target_probs, alpha=kd_scale)  # (a' + c) q - a' p, two passes
    else:
        if plain_probs is None:  # T = 1 with ignored rows: keep q_1 before the buffer becomes the gradient
            plain_probs = workspace.get("plain_probs", rows)
            plain_probs.copy_(student_probs)
        grad.sub_(target_probs).mul_(kd_scale)
        if not all_valid:
            plain_probs.mul_(valid.unsqueeze(-1))
        grad.add_(plain_probs, alpha=ce_weight)
    if ce_weight != 0.0:
        grad.scatter_add_(-1, labels_safe, (-ce_weight * valid).unsqueeze(-1).to(grad.dtype))
    return kd_sum.detach(), ce_sum.detach(), teacher_ce_sum.detach(), target_entropy_sum, grad


def fused_sparse_kl_ce_chunk(
    student_logits: torch.Tensor,
    teacher,
    labels: torch.Tensor | None,
    kl: FusedKL,
    kd_weight: float,
    ce_weight: float,
    workspace: ChunkWorkspace,
):
    """:func:`fused_kl_ce_chunk` for a cached top-k teacher (:class:`~llmkd.losses.sparse_teacher.SparseTeacher`):
    the top-k + tail-bucket forward KL ``sum_K p_i log(p_i / q_i) + P_tail log(P_tail / Q_tail)`` at the cache's
    temperature, whose gradient is ``(f / T) (q_T - p~)`` with ``p~`` the teacher densified with a tail shaped like
    the student (``p~_j = q_j P_tail / Q_tail`` outside the top-k). No ``(n, V)`` teacher tensor is built: the
    student's probabilities are the only vocabulary-wide buffer (plus ``z / T`` and ``softmax(z)`` at ``T != 1``).

    Args and returns as :func:`fused_kl_ce_chunk`; ``teacher`` holds the chunk's n tokens. ``target_entropy_sum``
    is the entropy of the distribution this KL compares, the top-k and one tail bucket:
    ``-sum_K p_i log p_i - P_tail log P_tail``.
    """
    rows = student_logits.shape[0]
    temperature = kl.temperature
    teacher.check_temperature(temperature)
    ids = teacher.ids
    log_p_top, log_p_tail = teacher.log_probs.float(), teacher.tail_log_prob.float()
    # a quantized cache sums to 1 only approximately: renormalise, as the densified path does
    log_total = torch.logsumexp(torch.cat([log_p_top, log_p_tail[:, None]], dim=-1), dim=-1)
    log_p_top = log_p_top - log_total[:, None]
    log_p_tail = log_p_tail - log_total
    p_top, p_tail = log_p_top.exp(), log_p_tail.exp()  # p_tail = 0 where k = V
    has_tail = p_tail > 0

    student_probs = workspace.get("student_probs", rows)
    softened = student_logits
    if temperature != 1.0:
        softened = torch.div(student_logits, temperature, out=workspace.get("target_probs", rows))
    student_lse = softmax_into(softened, student_probs)
    q_top = student_probs.gather(1, ids)  # (n, k)
    log_q_top = softened.gather(1, ids) - student_lse[:, None]
    student_probs.scatter_(1, ids, 0.0)
    q_tail = student_probs.sum(-1).clamp_min(torch.finfo(torch.float32).tiny)  # the student's mass outside K
    top_term = (p_top * (log_p_top - log_q_top)).sum(-1)
    tail_term = torch.where(has_tail, p_tail * (log_p_tail.clamp_min(-1e30) - q_tail.log()), 0.0)
    kd_sum = (kl.factor * (top_term + tail_term)).sum()
    tail_entropy = torch.where(has_tail, p_tail * log_p_tail.clamp_min(-1e30), 0.0)
    target_entropy_sum = -((p_top * log_p_top).sum(-1) + tail_entropy).sum()

    kd_scale = kd_weight * kl.factor / temperature
    tail_ratio = torch.where(has_tail, p_tail / q_tail, 0.0)  # p~_j / q_j outside K
    zero = student_logits.new_zeros(())
    teacher_ce_sum = teacher.cross_entropy_sum(labels) if labels is not None else zero
    ce_sum = zero
    grad = student_probs  # outside K: q_j; inside K: 0 (for now)
    outside_scale = kd_scale * (1.0 - tail_ratio)  # (n,)
    top_grad = kd_scale * (q_top - p_top)  # (n, k)
    plain_probs = None
    if labels is not None:
        valid, labels_safe = label_columns(labels)
        ce_rows = ce_weight * valid.float()  # (n,) the CE weight of each row
        if temperature == 1.0:
            plain_lse = student_lse
            outside_scale = outside_scale + ce_rows  # + c q_j
            top_grad = top_grad + ce_rows[:, None] * q_top
        else:
            plain_probs = workspace.get("plain_probs", rows)
            plain_lse = softmax_into(student_logits, plain_probs)
        ce_sum = cross_entropy_sum(student_logits, plain_lse, labels_safe, valid)
    grad.mul_(outside_scale[:, None])
    grad.scatter_(1, ids, top_grad)
    if plain_probs is not None and ce_weight != 0.0:
        grad.add_(plain_probs.mul_(ce_rows[:, None]))
    if labels is not None and ce_weight != 0.0:
        grad.scatter_add_(-1, labels_safe, -ce_rows.unsqueeze(-1))
    return kd_sum.detach(), ce_sum.detach(), teacher_ce_sum.detach(), target_entropy_sum.detach(), grad
