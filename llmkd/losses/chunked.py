"""The chunked distillation engine: a token-level loss from final hidden states and output heads, chunk by chunk.

For the N valid tokens of a micro-batch it computes

    loss = (kd_weight * sum_n token_loss(z_s[n], z_t[n]) + ce_weight * sum_n CE(z_s[n], y[n])
            + block_weight * sum_blocks block_loss(z_s[block], z_t[block])) / normalizer

where ``z_s = post(h_s W_s^T + b_s)`` and ``z_t = post(h_t W_t^T + b_t)`` are the student's and teacher's logits
(``post`` is the model's own logit post-processing, see :class:`LogitTransform`). The (N x V) logits of neither
model ever exist whole: each chunk of ``chunk_size`` tokens (or each range of ``chunk_bounds``) is projected, its loss and its gradients with
respect to the chunk's hidden states and the student head are computed at once (as Liger-Kernel's fused linear
losses do), and the chunk's logits are freed before the next chunk. Backward only rescales the stored gradients.

:func:`dense_distillation_loss` computes the same quantity with full logits and ordinary autograd; the tests
hold the two equal in value and gradient.

A *block loss* couples the tokens of one chunk (SinKD's Sinkhorn term transports mass between the positions of a
block): the chunks are then the caller's ``chunk_bounds`` (e.g. :func:`llmkd.losses.sinkhorn.sinkhorn_blocks`), so
a block is never split, and its gradient is computed in forward like the token terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .head import IDENTITY, LogitTransform, project, project_into
from .fused import ChunkWorkspace, FusedKL, fused_kl_ce_chunk, fused_sparse_kl_ce_chunk
from .reduction import at_least_one
from .sparse_teacher import SparseTeacher

TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BlockLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (n, V), (n, V) -> scalar


@dataclass
class DistillationLossOutput:
    """What the engine returns.

    ``loss``: scalar with gradient, already divided by the normalizer. The ``*_sum`` fields are detached float32
    scalars summed over the N tokens (divide by the token count to log means): ``kd_sum`` the token loss,
    ``ce_sum`` the student's cross-entropy, ``teacher_ce_sum`` the teacher's cross-entropy on the same labels,
    ``block_sum`` the block loss summed over blocks (unweighted; zero without a block loss),
    ``target_entropy_sum`` the entropy ``H(p)`` of the token loss's target distribution, for a token loss that is
    a KL to a target and says so with a ``with_target_entropy`` method (TAID: ``KL(p_t || q) + H(p_t)`` is the
    cross-entropy its official schedule watches); None for other token losses.
    """

    loss: torch.Tensor
    kd_sum: torch.Tensor
    ce_sum: torch.Tensor
    teacher_ce_sum: torch.Tensor
    num_tokens: int
    block_sum: torch.Tensor | None = None
    target_entropy_sum: torch.Tensor | None = None


def reports_target_entropy(token_loss) -> bool:
    """Whether ``token_loss`` is a KL to a target whose entropy it can return (a ``with_target_entropy`` method)."""
    return callable(getattr(token_loss, "with_target_entropy", None))


def token_loss_sums(token_loss, student_logits, teacher_logits) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum_n token_loss, sum_n H(target))`` over the n rows of ``(n, V)`` logits: the first with gradient, the
    second detached, or None when the token loss does not report its target's entropy. The entropy comes out of
    the same softmax as the loss (:meth:`~llmkd.losses.TAIDTokenLoss.with_target_entropy`)."""
    if not reports_target_entropy(token_loss):
        return token_loss(student_logits, teacher_logits).sum(), None
    per_token, entropy = token_loss.with_target_entropy(student_logits, teacher_logits)
    return per_token.sum(), entropy.detach().sum()


def _chunk_terms(student_logits, teacher_logits, labels, token_loss, kd_weight, ce_weight, block_loss=None,
                 block_weight=0.0):
    """Per-chunk sums: (weighted total, kd sum, ce sum, block loss, target entropy (0 when not reported)); logits are
    float32 ``(n, V)``, labels ``(n,)``."""
    kd_sum, entropy_sum = token_loss_sums(token_loss, student_logits, teacher_logits)
    if entropy_sum is None:
        entropy_sum = student_logits.new_zeros(())
    if labels is not None:
        ce_sum = F.cross_entropy(student_logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    else:
        ce_sum = student_logits.new_zeros(())
    total = kd_weight * kd_sum
    if ce_weight != 0.0:
        total = total + ce_weight * ce_sum
    block_sum = student_logits.new_zeros(())
    if block_loss is not None:
        block_sum = block_loss(student_logits, teacher_logits)
        if block_weight != 0.0:
            total = total + block_weight * block_sum
    return total, kd_sum, ce_sum, block_sum, entropy_sum


def teacher_cross_entropy_sum(teacher_logits, labels):
    """Sum over tokens of the teacher's cross-entropy on ``labels``: logits ``(n, V)`` or a SparseTeacher."""
    if isinstance(teacher_logits, SparseTeacher):
        return teacher_logits.cross_entropy_sum(labels)
    if labels is None:
        return teacher_logits.new_zeros(())
    return F.cross_entropy(teacher_logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)


def _teacher_chunk(teacher, teacher_weight, teacher_bias, transform, vocab_size, start, end):
    """The teacher's targets for tokens ``[start, end)``: logits ``(n, V)`` projected from hidden states, or the
    rows of a :class:`~llmkd.losses.sparse_teacher.SparseTeacher` (a cached top-k teacher)."""
    if isinstance(teacher, SparseTeacher):
        return teacher[start:end]
    return project(teacher[start:end], teacher_weight, teacher_bias, transform, vocab_size)


class _ChunkedDistillationFunction(torch.autograd.Function):
    """Values and gradients of the engine's loss, computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                labels, spec):
        token_loss, kd_weight, ce_weight, normalizer, bounds, s_post, t_post, vocab_size, block_loss, block_weight = spec
        need_hidden_grad = student_hidden.requires_grad
        need_weight_grad = student_weight.requires_grad
        need_bias_grad = student_bias is not None and student_bias.requires_grad

        grad_hidden = torch.zeros_like(student_hidden) if need_hidden_grad else None
        grad_weight = torch.zeros_like(student_weight, dtype=torch.float32) if need_weight_grad else None
        grad_bias = torch.zeros_like(student_bias, dtype=torch.float32) if need_bias_grad else None
        weight_leaf = student_weight.detach().requires_grad_(need_weight_grad)
        bias_leaf = None if student_bias is None else student_bias.detach().requires_grad_(need_bias_grad)

        # total, kd, ce, teacher ce, block loss, target entropy
        totals = torch.zeros(6, dtype=torch.float32, device=student_hidden.device)
        fused = _fused_spec(token_loss, teacher_hidden, s_post)
        workspace = None
        if fused is not None:
            workspace = ChunkWorkspace(max(end - start for start, end in bounds) if bounds else 0, vocab_size,
                                       student_hidden.device)
        head = (weight_leaf, bias_leaf)
        for start, end in bounds:
            chunk_labels = None if labels is None else labels[start:end]
            hidden_chunk = student_hidden[start:end].detach()
            if fused is not None:
                grad_logits, sums = _fused_chunk(
                    hidden_chunk, head, (teacher_hidden, teacher_weight, teacher_bias, t_post), vocab_size,
                    chunk_labels, fused, (kd_weight, ce_weight, block_loss, block_weight), workspace, start, end,
                    densify_cached=reports_target_entropy(token_loss),
                )
                totals += sums
                _accumulate_head_grads(grad_logits, hidden_chunk, head, vocab_size, start, end,
                                       (grad_hidden, grad_weight, grad_bias))
                continue
            with torch.no_grad():
                teacher_logits = _teacher_chunk(teacher_hidden, teacher_weight, teacher_bias, t_post, vocab_size,
                                                start, end)
                totals[3] += teacher_cross_entropy_sum(teacher_logits, chunk_labels)
            hidden_leaf = hidden_chunk.requires_grad_(need_hidden_grad)
            with torch.enable_grad():
                student_logits = project(hidden_leaf, weight_leaf, bias_leaf, s_post, vocab_size)
                total, kd_sum, ce_sum, block_sum, entropy_sum = _chunk_terms(
                    student_logits, teacher_logits, chunk_labels, token_loss, kd_weight, ce_weight, block_loss,
                    block_weight,
                )
                inputs = [t for t, need in ((hidden_leaf, need_hidden_grad), (weight_leaf, need_weight_grad),
                                            (bias_leaf, need_bias_grad)) if need]
                grads = list(torch.autograd.grad(total, inputs)) if inputs else []
            if need_hidden_grad:
                grad_hidden[start:end] = grads.pop(0)
            if need_weight_grad:
                grad_weight += grads.pop(0)
            if need_bias_grad:
                grad_bias += grads.pop(0)
            totals[0] += total.detach()
            totals[1] += kd_sum.detach()
            totals[2] += ce_sum.detach()
            totals[4] += block_sum.detach()
            totals[5] += entropy_sum
            del student_logits, teacher_logits, total

        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.has = (need_hidden_grad, need_weight_grad, need_bias_grad)
        ctx.dtypes = (student_weight.dtype, None if student_bias is None else student_bias.dtype)
        ctx.normalizer = normalizer
        loss = totals[0] / normalizer
        metrics = totals[1:].clone()  # kd, ce, teacher ce, block, target entropy
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.has
        scale = grad_loss / ctx.normalizer
        out_hidden = (grad_hidden * scale.to(grad_hidden.dtype)) if need_hidden else None
        out_weight = (grad_weight * scale).to(ctx.dtypes[0]) if need_weight else None
        out_bias = (grad_bias * scale).to(ctx.dtypes[1]) if need_bias else None
        return out_hidden, out_weight, out_bias, None, None, None, None, None


def _fused_spec(token_loss, teacher, student_transform) -> FusedKL | None:
    """The fast path's description of the token loss (:mod:`.fused`), or None where autograd must run: token losses
    that are not a forward KL to a target, a student logit post-processing."""
    describe = getattr(token_loss, "fused_kl", None)
    if describe is None or not student_transform.is_identity:
        return None
    return describe()


def _fused_chunk(hidden, head, teacher_head, vocab_size, labels, spec, weights, workspace, start, end,
                 densify_cached=False):
    """One chunk on the fast path: returns the gradient with respect to the student's logits ``(n, V)`` and the
    chunk's sums ``(total, kd, ce, teacher ce, block, target entropy)`` as a float32 ``(6,)`` tensor.
    ``densify_cached``: a cached teacher enters densified even at ``teacher_share = 1``, so that the reported target
    entropy is that of the target the gradient uses, as on the autograd path."""
    kd_weight, ce_weight, block_loss, block_weight = weights
    teacher, teacher_weight, teacher_bias, teacher_transform = teacher_head
    rows = end - start
    with torch.no_grad():
        student_logits = project_into(hidden, head[0].detach(), None if head[1] is None else head[1].detach(),
                                       vocab_size, workspace.get("student_logits", rows))
        if isinstance(teacher, SparseTeacher):
            teacher_logits = teacher[start:end]
        else:
            teacher_logits = project_into(teacher[start:end], teacher_weight, teacher_bias, vocab_size,
                                           workspace.get("teacher_logits", rows))
            teacher_logits = teacher_transform(teacher_logits).float()
    block_sum = block_grad = None
    if block_loss is not None:  # the block loss reads the teacher's logits before the fast path overwrites them
        logits_leaf = student_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            block_sum = block_loss(logits_leaf, teacher_logits)
            if block_weight != 0.0:
                block_grad = torch.autograd.grad(block_sum * block_weight, logits_leaf)[0]
        block_sum = block_sum.detach()
    with torch.no_grad():
        cached = teacher_logits if isinstance(teacher_logits, SparseTeacher) else None
        if cached is not None and (spec.teacher_share != 1.0 or densify_cached):
            # TAID interpolates logits: the cached teacher densified (tail shaped like the student, a constant)
            teacher_logits = cached.dense_logits(like=student_logits)
        kernel = fused_sparse_kl_ce_chunk if isinstance(teacher_logits, SparseTeacher) else fused_kl_ce_chunk
        kd_sum, ce_sum, teacher_ce_sum, entropy_sum, grad = kernel(student_logits, teacher_logits, labels, spec,
                                                                   kd_weight, ce_weight, workspace)
        if cached is not None and labels is not None:
            teacher_ce_sum = cached.cross_entropy_sum(labels)  # the cache's own definition (uniform tail)
        if block_grad is not None:
            grad.add_(block_grad)
        block_sum = kd_sum.new_zeros(()) if block_sum is None else block_sum
        total = kd_weight * kd_sum + ce_weight * ce_sum + block_weight * block_sum
        return grad, torch.stack([total, kd_sum, ce_sum, teacher_ce_sum, block_sum, entropy_sum]).float()


def _accumulate_head_grads(grad_logits, hidden, head, vocab_size, start, end, grads):
    """Chain the logits' gradient ``(n, V)`` through the head: ``grad_hidden[start:end] = G W``,
    ``grad_weight[:V] += G^T h``, ``grad_bias[:V] += sum_n G`` (each only where wanted)."""
    grad_hidden, grad_weight, grad_bias = grads
    weight = head[0].detach()[:vocab_size]
    with torch.no_grad():
        grad_in_dtype = grad_logits if weight.dtype == torch.float32 else grad_logits.to(weight.dtype)
        if grad_hidden is not None:
            if grad_hidden.dtype == grad_in_dtype.dtype:
                torch.matmul(grad_in_dtype, weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = grad_in_dtype @ weight
        if grad_weight is not None:
            grad_weight[:vocab_size].addmm_(grad_logits.t(), hidden.to(grad_weight.dtype))
        if grad_bias is not None:
            grad_bias[:vocab_size] += grad_logits.sum(0)


def _default_vocab_size(vocab_size, student_weight, teacher, teacher_weight) -> int:
    if vocab_size is not None:
        return int(vocab_size)
    if isinstance(teacher, SparseTeacher):
        return teacher.vocab_size
    return min(student_weight.shape[0], teacher_weight.shape[0])


CHUNK_LOGITS_BUDGET = 2**25  # logits per chunk of the automatic chunk size: 128 MB per float32 chunk buffer


def auto_chunk_size(vocab_size: int) -> int:
    """The default tokens per chunk: the power of two nearest to ``CHUNK_LOGITS_BUDGET / V`` (in log scale),
    between 16 and 4096 (512 tokens at vocab 64k, 256 at 152k, 1024 at 32k). Chunks from 128 to 1024 tokens measured
    equally fast on CPU (BENCHMARKS.md); this keeps each of the engine's chunk buffers near 128 MB."""
    rows = CHUNK_LOGITS_BUDGET / max(int(vocab_size), 1)
    return int(min(max(2 ** round(math.log2(rows)), 16), 4096))


def _chunk_ranges(n_tokens: int, chunk_size: int | None, chunk_bounds) -> list[tuple[int, int]]:
    """The engine's chunks: the caller's ``chunk_bounds`` (checked to tile ``range(N)`` in order) or fixed-size."""
    if chunk_bounds is None:
        if chunk_size is None or chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        return [(start, min(start + chunk_size, n_tokens)) for start in range(0, n_tokens, chunk_size)]
    bounds = [(int(start), int(end)) for start, end in chunk_bounds]
    expected = 0
    for start, end in bounds:
        if start != expected or end <= start:
            raise ValueError(
                f"chunk_bounds must tile range({n_tokens}) in order with non-empty ranges; got {bounds[:8]}..."
            )
        expected = end
    if expected != n_tokens:
        raise ValueError(f"chunk_bounds cover {expected} tokens but there are {n_tokens}.")
    return bounds


def _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, vocab_size):
    if isinstance(teacher_hidden, SparseTeacher):
        if teacher_hidden.num_tokens != student_hidden.shape[0]:
            raise ValueError(f"student has {student_hidden.shape[0]} tokens but the cached teacher has "
                             f"{teacher_hidden.num_tokens}: both must be the same valid positions of the same batch.")
        if vocab_size != teacher_hidden.vocab_size or vocab_size > student_weight.shape[0]:
            raise ValueError(f"vocab_size={vocab_size} must equal the cache's vocabulary ({teacher_hidden.vocab_size})"
                             f" and fit the student's head ({student_weight.shape[0]} rows).")
        if labels is not None and labels.shape != student_hidden.shape[:1]:
            raise ValueError(f"labels must have shape (N,) = ({student_hidden.shape[0]},), got {tuple(labels.shape)}.")
        return
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError(
            "the chunked engine takes the hidden states of the valid tokens only, shaped (N, hidden): got "
            f"student {tuple(student_hidden.shape)} and teacher {tuple(teacher_hidden.shape)}."
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student has {student_hidden.shape[0]} tokens but teacher has {teacher_hidden.shape[0]}: both must be "
            "the same valid positions of the same batch."
        )
    if labels is not None and labels.shape != student_hidden.shape[:1]:
        raise ValueError(f"labels must have shape (N,) = ({student_hidden.shape[0]},), got {tuple(labels.shape)}.")
    if vocab_size > min(student_weight.shape[0], teacher_weight.shape[0]):
        raise ValueError(
            f"vocab_size={vocab_size} exceeds a head's output size (student {student_weight.shape[0]}, teacher "
            f"{teacher_weight.shape[0]})."
        )


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    token_loss: TokenLoss,
    *,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
    vocab_size: int | None = None,
    block_loss: BlockLoss | None = None,
    block_weight: float = 0.0,
    chunk_bounds: Sequence[tuple[int, int]] | None = None,
) -> DistillationLossOutput:
    """Distillation loss over N valid tokens without materialising (N x V) logits.

    Args:
        student_hidden: ``(N, H_s)`` final hidden states of the student at the valid positions (grad flows here).
        student_weight: ``(V_s, H_s)`` the student's output head (grad flows here if it requires grad).
        teacher_hidden: ``(N, H_t)`` the teacher's final hidden states at the same positions (no grad), or a
            :class:`~llmkd.losses.sparse_teacher.SparseTeacher` of N tokens (a cached top-k teacher; then
            ``teacher_weight`` is None).
        teacher_weight: ``(V_t, H_t)`` the teacher's output head.
        labels: ``(N,)`` next-token ids (for CE and the teacher-CE metric) or None.
        token_loss: ``(student_logits (n, V), teacher_logits (n, V)) -> (n,)`` float32, e.g. a
            :class:`~llmkd.losses.registry.Divergence`.
        kd_weight / ce_weight: weights of the token loss and the student's CE.
        normalizer: the divisor (the global valid-token count of the step); defaults to N.
        chunk_size: tokens per chunk (None: :func:`auto_chunk_size` of the vocabulary); the extra memory is about
            ``chunk_size * V * 4 bytes`` times 4 (forward KL, TAID: 5 at a temperature other than 1) buffers.
        vocab_size: the aligned vocabulary (both heads are cut to their first ``vocab_size`` rows); defaults to
            ``min(V_s, V_t)``.
        block_loss: ``(student_logits (n, V), teacher_logits (n, V)) -> scalar`` over the n tokens of one chunk
            (e.g. :class:`~llmkd.losses.sinkhorn.SinkhornTerm`), added with ``block_weight``.
        chunk_bounds: ``[(start, end), ...]`` tiling ``range(N)``: the chunks (and the block loss's blocks);
            overrides ``chunk_size``.
    Returns:
        :class:`DistillationLossOutput`.
    """
    vocab_size = _default_vocab_size(vocab_size, student_weight, teacher_hidden, teacher_weight)
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, vocab_size)
    n_tokens = student_hidden.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(vocab_size)
    bounds = _chunk_ranges(n_tokens, chunk_size, chunk_bounds)
    if normalizer is None:
        normalizer = max(n_tokens, 1)
    normalizer = at_least_one(normalizer, device=student_hidden.device)
    spec = (token_loss, float(kd_weight), float(ce_weight), normalizer, bounds, student_transform,
            teacher_transform, int(vocab_size), block_loss, float(block_weight))
    if not isinstance(teacher_hidden, SparseTeacher):
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    loss, metrics = _ChunkedDistillationFunction.apply(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
        None if teacher_bias is None else teacher_bias.detach(), labels, spec,
    )
    entropy_sum = metrics[4] if reports_target_entropy(token_loss) else None
    return DistillationLossOutput(loss, metrics[0], metrics[1], metrics[2], n_tokens, block_sum=metrics[3],
                                  target_entropy_sum=entropy_sum)


def dense_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None,
    token_loss: TokenLoss,
    *,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    normalizer: float | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_transform: LogitTransform = IDENTITY,
    teacher_transform: LogitTransform = IDENTITY,
    vocab_size: int | None = None,
    block_loss: BlockLoss | None = None,
    block_weight: float = 0.0,
    chunk_bounds: Sequence[tuple[int, int]] | None = None,
    chunk_size: int | None = None,  # accepted for a uniform call signature; unused
) -> DistillationLossOutput:
    """The same loss as :func:`chunked_distillation_loss` with full (N x V) logits and ordinary autograd.

    The block loss (if any) is evaluated on each range of ``chunk_bounds`` (default: one block of all N tokens).
    """
    vocab_size = _default_vocab_size(vocab_size, student_weight, teacher_hidden, teacher_weight)
    _check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, vocab_size)
    n_tokens = student_hidden.shape[0]
    if normalizer is None:
        normalizer = max(n_tokens, 1)
    student_logits = project(student_hidden, student_weight, student_bias, student_transform, vocab_size)
    with torch.no_grad():
        teacher_logits = _teacher_chunk(teacher_hidden, teacher_weight, teacher_bias, teacher_transform,
                                        vocab_size, 0, n_tokens)
        teacher_ce = teacher_cross_entropy_sum(teacher_logits, labels)
    total, kd_sum, ce_sum, _, entropy_sum = _chunk_terms(student_logits, teacher_logits, labels, token_loss, kd_weight,
                                                         ce_weight)
    block_sum = dense_block_loss(student_logits, teacher_logits, block_loss, chunk_bounds)
    if block_loss is not None and block_weight != 0.0:
        total = total + block_weight * block_sum
    normalizer = at_least_one(normalizer, device=total.device)
    return DistillationLossOutput(total / normalizer, kd_sum.detach(), ce_sum.detach(), teacher_ce.detach(), n_tokens,
                                  block_sum=block_sum.detach(),
                                  target_entropy_sum=entropy_sum if reports_target_entropy(token_loss) else None)


def dense_block_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, block_loss: BlockLoss | None,
                     chunk_bounds: Sequence[tuple[int, int]] | None) -> torch.Tensor:
    """Sum of ``block_loss`` over the ranges of ``chunk_bounds`` (default one block) of full ``(N, V)`` logits."""
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if block_loss is None:
        return zero
    bounds = _chunk_ranges(student_logits.shape[0], None, chunk_bounds) if chunk_bounds is not None else \
        ([(0, student_logits.shape[0])] if student_logits.shape[0] else [])
    total = zero
    for start, end in bounds:
        total = total + block_loss(student_logits[start:end], teacher_logits[start:end])
    return total
