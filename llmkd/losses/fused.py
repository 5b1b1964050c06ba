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
itself: ``lse = x[argmax] - log softmax(x)[argmax]`` (the largest probability is at least ``1/V``, so the log is
accurate).

Used by :mod:`llmkd.losses.chunked` when the token loss is a forward KL to a target (see
:class:`FusedKL`); every other token loss goes through autograd. The tests hold both paths equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def softmax_into(logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``softmax(logits, -1)`` written into ``out`` (one fused row-wise kernel); returns the ``(n,)`` log-normaliser
    ``logsumexp(logits, -1)``."""
    torch.ops.aten._softmax.out(logits, -1, False, out=out)
    top_prob, top_index = out.max(dim=-1, keepdim=True)
    return (logits.gather(-1, top_index) - top_prob.log()).squeeze(-1)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` for ``(n, V)`` tensors without an ``(n, V)`` temporary: ``(n,)``."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def fused_kl_ce_chunk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    spec: FusedKL,
    kd_weight: float,
    ce_weight: float,
    workspace: ChunkWorkspace,
):
    """Value sums and the gradient with respect to the logits of ``kd_weight * KD + ce_weight * CE`` for one chunk.

    Args:
        student_logits: ``(n, V)`` float32 ``z``, not modified.
        teacher_logits: ``(n, V)`` float32 ``z_t``; overwritten (it becomes the buffer of the softened target).
        labels: ``(n,)`` int64 next-token ids with -100 = ignored, or None (no CE).
        spec: the KL's temperature, factor and target.
        kd_weight / ce_weight: ``a`` and ``c`` of the module docstring.
        workspace: buffers ``"target_probs"``, ``"student_probs"`` and (``T != 1`` with labels) ``"plain_probs"``.
    Returns:
        ``(kd_sum, ce_sum, teacher_ce_sum, grad)``: detached float32 scalars (the CE sums are 0 without labels) and
        the ``(n, V)`` gradient (a workspace buffer: consume it before the next chunk).
    """
    rows = student_logits.shape[0]
    temperature = spec.temperature
    target_probs = workspace.get("target_probs", rows)
    zero = student_logits.new_zeros(())
    teacher_ce_sum = ce_sum = zero
    valid = labels_safe = None
    if labels is not None:
        valid = labels != -100
        labels_safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
        teacher_label_logits = teacher_logits.gather(-1, labels_safe).squeeze(-1)
        if not (temperature == 1.0 and spec.teacher_share == 1.0):  # else it comes from the target's lse below
            teacher_lse = softmax_into(teacher_logits, target_probs)
            teacher_ce_sum = ((teacher_lse - teacher_label_logits) * valid).sum()

    target = teacher_logits
    if spec.teacher_share != 1.0:
        target.mul_(spec.teacher_share).add_(student_logits, alpha=1.0 - spec.teacher_share)
    if temperature != 1.0:
        target.div_(temperature)
    target.clamp_(min=target.amax(dim=-1, keepdim=True) - _FLOOR)  # -inf -> finite, probability still exactly 0
    target_lse = softmax_into(target, target_probs)
    target_neg_entropy = row_dot(target_probs, target) - target_lse  # sum_v p log p
    if labels is not None and temperature == 1.0 and spec.teacher_share == 1.0:
        teacher_ce_sum = ((target_lse - teacher_label_logits) * valid).sum()

    if temperature != 1.0:
        softened_student = torch.div(student_logits, temperature, out=target)  # the target's values are spent
    else:
        softened_student = student_logits
    cross = row_dot(target_probs, softened_student)  # sum_v p z/T
    student_probs = workspace.get("student_probs", rows)
    student_lse = softmax_into(softened_student, student_probs)
    kd_sum = (spec.factor * (target_neg_entropy - cross + student_lse)).sum()

    # the gradient, built in the student-probability buffer: kd_scale * (q_T - p) + c * (q_1 - onehot)
    kd_scale = kd_weight * spec.factor / temperature
    grad = student_probs
    if labels is None:
        grad.sub_(target_probs).mul_(kd_scale)
        return kd_sum.detach(), ce_sum, teacher_ce_sum, grad
    if temperature == 1.0:
        plain_lse, plain_probs = student_lse, None
    else:
        plain_probs = workspace.get("plain_probs", rows)
        plain_lse = softmax_into(student_logits, plain_probs)
    ce_sum = ((plain_lse - student_logits.gather(-1, labels_safe).squeeze(-1)) * valid).sum()
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
    return kd_sum.detach(), ce_sum.detach(), teacher_ce_sum.detach(), grad
