"""The chunked distillation engine: a token-level loss from final hidden states and output heads, chunk by chunk.

For the N valid tokens of a micro-batch it computes the :class:`~llmkd.losses.objective.DistillationObjective`

    loss = (kd_weight * sum_n token_loss(z_s[n], z_t[n]) + ce_weight * sum_n CE(z_s[n], y[n])
            + block_weight * sum_blocks block_loss(z_s[block], z_t[block])) / normalizer

where ``z_s = post(h_s W_s^T + b_s)`` is the student's logits (``post`` its own logit post-processing, see
:class:`~llmkd.losses.head.LogitTransform`) and ``z_t`` the teacher's targets, read chunk by chunk from a teacher
targets object (:mod:`llmkd.losses.targets`: a teacher's hidden states and head, dense logits, or a cached top-k
teacher). The (N x V) logits never exist whole: each chunk of ``chunk_size`` tokens (or each of the caller's
``blocks``) is projected, its loss and its gradients with respect to the chunk's hidden states and the student head
are computed at once (as Liger-Kernel's fused linear losses do), and the chunk's logits are freed before the next
chunk. Backward only rescales the stored gradients.

A *block loss* couples the tokens of one block (SinKD's Sinkhorn term transports mass between the positions of a
block): the chunks are then the caller's ``blocks`` (e.g. :func:`llmkd.losses.sinkhorn.sinkhorn_blocks`), so a
block is never split, and its gradient is computed in forward like the token terms.

:mod:`llmkd.losses.dense_reference` computes the same quantity with full logits and ordinary autograd; the tests
hold the two equal in value and gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .fused import ChunkWorkspace, FusedKL
from .head import IDENTITY, LogitTransform, OutputHead, project, project_into
from .objective import BlockLoss, DistillationObjective, TokenLoss
from .reduction import at_least_one
from .targets import ProjectedTeacher

CHUNK_LOGITS_BUDGET = 2**25  # logits per chunk of the automatic chunk size: 128 MB per float32 chunk buffer


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


def token_loss_sums(token_loss, student_logits, teacher_logits,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(sum_n token_loss, sum_n H(target))`` over the n rows of ``(n, V)`` logits: the first with gradient, the
    second detached, or None when the token loss does not report its target's entropy. The entropy comes out of
    the same softmax as the loss (:meth:`~llmkd.losses.TAIDTokenLoss.with_target_entropy`). A token loss with
    ``needs_labels`` (the sampled-token objective, :class:`~llmkd.losses.SampledTokenLoss`) is also given the n
    tokens ``labels``."""
    if getattr(token_loss, "needs_labels", False):
        return token_loss(student_logits, teacher_logits, labels).sum(), None
    if not reports_target_entropy(token_loss):
        return token_loss(student_logits, teacher_logits).sum(), None
    per_token, entropy = token_loss.with_target_entropy(student_logits, teacher_logits)
    return per_token.sum(), entropy.detach().sum()


def objective_sums(student_logits: torch.Tensor, chunk, labels: torch.Tensor | None,
                   objective: DistillationObjective, with_block: bool = True):
    """The objective's sums over the n tokens of one chunk (or block), with gradient to ``student_logits``
    ``(n, V)`` float32: ``(weighted total, kd sum, ce sum, block sum, target entropy sum)``; the teacher's targets
    come from ``chunk`` (:mod:`.targets`), densified where needed with a tail shaped like the student at each
    loss's temperature."""
    if getattr(objective.token_loss, "aligned", False):  # a cross-tokenizer loss reads the aligned chunk itself
        return aligned_objective_sums(student_logits, chunk, labels, objective)
    like = student_logits.detach()
    token_temperature = getattr(objective.token_loss, "temperature", None)
    teacher_logits = chunk.logits(like=like / objective.temperature if objective.temperature != 1.0 else like,
                                  temperature=token_temperature)
    kd_sum, entropy_sum = token_loss_sums(objective.token_loss, student_logits, teacher_logits, labels)
    if entropy_sum is None:
        entropy_sum = student_logits.new_zeros(())
    if labels is not None:
        ce_sum = F.cross_entropy(student_logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    else:
        ce_sum = student_logits.new_zeros(())
    total = objective.kd_weight * kd_sum
    if objective.ce_weight != 0.0:
        total = total + objective.ce_weight * ce_sum
    block_sum = student_logits.new_zeros(())
    if with_block and objective.block_loss is not None:
        block_teacher = teacher_logits if objective.temperature == 1.0 else chunk.logits(like=like)
        block_sum = objective.block_loss(student_logits, block_teacher)
        if objective.block_weight != 0.0:
            total = total + objective.block_weight * block_sum
    return total, kd_sum, ce_sum, block_sum, entropy_sum


def aligned_objective_sums(student_logits: torch.Tensor, chunk, labels: torch.Tensor | None,
                           objective: DistillationObjective):
    """:func:`objective_sums` for a cross-tokenizer token loss (:mod:`.cross_tokenizer`): its sum over the chunk's
    aligned spans, and the student's cross-entropy on all n tokens (no block loss; the target entropy where the
    loss reports one: the hybrid's shared part under TAID)."""
    if labels is None:
        raise ValueError("Cross-tokenizer losses need the student's target tokens (labels).")
    zero = student_logits.new_zeros(())
    entropy_sum = zero
    if objective.reports_target_entropy:
        kd_sum, entropy_sum = objective.token_loss.with_target_entropy(student_logits, chunk, labels)
    else:
        kd_sum = objective.token_loss(student_logits, chunk, labels)
    ce_sum = F.cross_entropy(student_logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)
    total = objective.kd_weight * kd_sum
    if objective.ce_weight != 0.0:
        total = total + objective.ce_weight * ce_sum
    return total, kd_sum, ce_sum, zero, entropy_sum


@dataclass(frozen=True)
class _Plan:
    """Everything the autograd function needs besides the student's tensors."""

    objective: DistillationObjective
    teacher: object  # teacher targets (llmkd.losses.targets)
    labels: torch.Tensor | None
    normalizer: torch.Tensor | float
    chunks: list[tuple[int, int]]
    student_transform: LogitTransform
    vocab_size: int


class _ChunkedDistillationFunction(torch.autograd.Function):
    """Values and gradients of the engine's loss, computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, plan: _Plan):
        objective, teacher, labels, vocab_size = plan.objective, plan.teacher, plan.labels, plan.vocab_size
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
        kl = _fused_kl(objective.token_loss, plan.student_transform)
        aligned = _fused_aligned(objective.token_loss, plan.student_transform)
        workspace = None
        if kl is not None:
            workspace = ChunkWorkspace(max(end - start for start, end in plan.chunks) if plan.chunks else 0,
                                       vocab_size, student_hidden.device)
        head = (weight_leaf, bias_leaf)
        for start, end in plan.chunks:
            chunk_labels = None if labels is None else labels[start:end]
            hidden_chunk = student_hidden[start:end].detach()
            if aligned is not None:
                grad_logits, sums = _aligned_chunk(hidden_chunk, head, teacher.chunk(start, end, vocab_size),
                                                   vocab_size, chunk_labels, aligned, objective)
                totals += sums
                _accumulate_head_grads(grad_logits, hidden_chunk, head, vocab_size, start, end,
                                       (grad_hidden, grad_weight, grad_bias))
                continue
            if kl is not None:
                grad_logits, sums = _fused_chunk(hidden_chunk, head, teacher.chunk(start, end, vocab_size, workspace),
                                                 vocab_size, chunk_labels, kl, objective, workspace)
                totals += sums
                _accumulate_head_grads(grad_logits, hidden_chunk, head, vocab_size, start, end,
                                       (grad_hidden, grad_weight, grad_bias))
                continue
            chunk = teacher.chunk(start, end, vocab_size)
            with torch.no_grad():
                totals[3] += chunk.cross_entropy_sum(chunk_labels)
            hidden_leaf = hidden_chunk.requires_grad_(need_hidden_grad)
            with torch.enable_grad():
                student_logits = project(hidden_leaf, weight_leaf, bias_leaf, plan.student_transform, vocab_size)
                total, kd_sum, ce_sum, block_sum, entropy_sum = objective_sums(student_logits, chunk, chunk_labels,
                                                                               objective)
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
            del student_logits, chunk, total

        ctx.save_for_backward(
            *(t if t is not None else torch.empty(0) for t in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.has = (need_hidden_grad, need_weight_grad, need_bias_grad)
        ctx.dtypes = (student_weight.dtype, None if student_bias is None else student_bias.dtype)
        ctx.normalizer = plan.normalizer
        loss = totals[0] / plan.normalizer
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
        return out_hidden, out_weight, out_bias, None


def _fused_kl(token_loss, student_transform) -> FusedKL | None:
    """The fast path's description of the token loss (:mod:`.fused`), or None where autograd must run: token losses
    that are not a forward KL to a target, a student logit post-processing."""
    describe = getattr(token_loss, "fused_kl", None)
    if describe is None or not student_transform.is_identity:
        return None
    return describe()


def _fused_aligned(token_loss, student_transform):
    """A cross-tokenizer loss's closed-form path (:meth:`~llmkd.losses.cross_tokenizer.AlignedLoss.fused`), or None
    where autograd must run (a student logit post-processing)."""
    fused = getattr(token_loss, "fused", None) if getattr(token_loss, "aligned", False) else None
    return fused if fused is not None and student_transform.is_identity else None


def _aligned_chunk(hidden, head, chunk, vocab_size, labels, fused, objective: DistillationObjective):
    """One chunk of a cross-tokenizer loss on its closed-form path: the gradient with respect to the student's
    logits ``(n, V)`` and the chunk's sums as a float32 ``(6,)`` tensor (as :func:`_fused_chunk`)."""
    if labels is None:
        raise ValueError("Cross-tokenizer losses need the student's target tokens (labels).")
    with torch.no_grad():
        student_logits = project(hidden, head[0].detach(), None if head[1] is None else head[1].detach(), IDENTITY,
                                 vocab_size)
    kd_sum, ce_sum, teacher_ce_sum, entropy_sum, grad = fused(student_logits, chunk, labels, objective.kd_weight,
                                                              objective.ce_weight, objective.reports_target_entropy)
    total = objective.kd_weight * kd_sum + objective.ce_weight * ce_sum
    return grad, torch.stack([total, kd_sum, ce_sum, teacher_ce_sum, kd_sum.new_zeros(()), entropy_sum]).float()


def _fused_chunk(hidden, head, chunk, vocab_size, labels, kl: FusedKL, objective: DistillationObjective, workspace):
    """One chunk on the fast path: returns the gradient with respect to the student's logits ``(n, V)`` and the
    chunk's sums ``(total, kd, ce, teacher ce, block, target entropy)`` as a float32 ``(6,)`` tensor."""
    rows = hidden.shape[0]
    with torch.no_grad():
        student_logits = project_into(hidden, head[0].detach(), None if head[1] is None else head[1].detach(),
                                      vocab_size, workspace.get("student_logits", rows))
    block_sum = block_grad = None
    if objective.block_loss is not None:  # the block loss reads the teacher before the fast path overwrites it
        logits_leaf = student_logits.detach().requires_grad_(True)
        with torch.enable_grad():
            block_sum = objective.block_loss(logits_leaf, chunk.logits(like=student_logits))
            if objective.block_weight != 0.0:
                block_grad = torch.autograd.grad(block_sum * objective.block_weight, logits_leaf)[0]
        block_sum = block_sum.detach()
    with torch.no_grad():
        kd_sum, ce_sum, teacher_ce_sum, entropy_sum, grad = chunk.fused_kl_ce(
            student_logits, labels, kl, objective.kd_weight, objective.ce_weight, workspace,
            densify=objective.reports_target_entropy)
        if block_grad is not None:
            grad.add_(block_grad)
        block_sum = kd_sum.new_zeros(()) if block_sum is None else block_sum
        total = objective.kd_weight * kd_sum + objective.ce_weight * ce_sum + objective.block_weight * block_sum
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


def auto_chunk_size(vocab_size: int) -> int:
    """The default tokens per chunk: the power of two nearest to ``CHUNK_LOGITS_BUDGET / V`` (in log scale),
    between 16 and 4096 (512 tokens at vocab 64k, 256 at 152k, 1024 at 32k). Chunks from 128 to 1024 tokens measured
    equally fast on CPU (BENCHMARKS.md); this keeps each of the engine's chunk buffers near 128 MB."""
    rows = CHUNK_LOGITS_BUDGET / max(int(vocab_size), 1)
    return int(min(max(2 ** round(math.log2(rows)), 16), 4096))


def token_ranges(n_tokens: int, chunk_size: int | None, blocks) -> list[tuple[int, int]]:
    """The engine's chunks: the caller's ``blocks`` (checked to tile ``range(N)`` in order) or fixed-size."""
    if blocks is None:
        if chunk_size is None or chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
        return [(start, min(start + chunk_size, n_tokens)) for start in range(0, n_tokens, chunk_size)]
    bounds = [(int(start), int(end)) for start, end in blocks]
    expected = 0
    for start, end in bounds:
        if start != expected or end <= start:
            raise ValueError(f"blocks (chunk_bounds) must tile range({n_tokens}) in order with non-empty ranges; got "
                             f"{bounds[:8]}...")
        expected = end
    if expected != n_tokens:
        raise ValueError(f"blocks (chunk_bounds) cover {expected} tokens but there are {n_tokens}.")
    return bounds


def check_engine_inputs(student_hidden: torch.Tensor, student_head: OutputHead, teacher, labels, vocab_size) -> int:
    """Validate the engine's inputs and return the aligned vocabulary size (``vocab_size`` or the teacher's
    default against the student's head)."""
    if student_hidden.dim() != 2:
        raise ValueError("the chunked engine takes the hidden states of the valid tokens only, shaped (N, hidden): "
                         f"got student {tuple(student_hidden.shape)}.")
    vocab_size = int(vocab_size) if vocab_size is not None else teacher.default_vocab_size(student_head.rows)
    teacher.check(student_hidden.shape[0], student_head.rows, vocab_size)
    if labels is not None and labels.shape != student_hidden.shape[:1]:
        raise ValueError(f"labels must have shape (N,) = ({student_hidden.shape[0]},), got {tuple(labels.shape)}.")
    return vocab_size


def chunked_loss(
    student_hidden: torch.Tensor,
    student_head: OutputHead,
    teacher,
    labels: torch.Tensor | None,
    objective: DistillationObjective,
    *,
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    blocks: Sequence[tuple[int, int]] | None = None,
    vocab_size: int | None = None,
) -> DistillationLossOutput:
    """The objective over N valid tokens without materialising (N x V) logits.

    Args:
        student_hidden: ``(N, H_s)`` final hidden states of the student at the valid positions (grad flows here).
        student_head: the student's :class:`~llmkd.losses.head.OutputHead` (grad flows into its weight and bias
            where they require grad).
        teacher: the teacher's targets for the same N tokens (:mod:`llmkd.losses.targets`: a
            :class:`~llmkd.losses.targets.ProjectedTeacher`, :class:`~llmkd.losses.targets.DenseTargets` or
            :class:`~llmkd.losses.SparseTeacher`).
        labels: ``(N,)`` next-token ids (for CE and the teacher-CE metric) or None.
        objective: the :class:`~llmkd.losses.DistillationObjective`.
        normalizer: the divisor (the global valid-token count of the step); defaults to N.
        chunk_size: tokens per chunk (None: :func:`auto_chunk_size` of the vocabulary); the extra memory is about
            ``chunk_size * V * 4 bytes`` times 4 (forward KL, TAID: 5 at a temperature other than 1) buffers.
        blocks: ``[(start, end), ...]`` tiling ``range(N)``: the chunks and the block loss's blocks; overrides
            ``chunk_size``.
        vocab_size: the aligned vocabulary (the heads are cut to their first ``vocab_size`` rows); defaults to the
            teacher's (``min(V_s, V_t)`` for a teacher head, the cache's vocabulary for a cached teacher).
    Returns:
        :class:`DistillationLossOutput`.
    """
    vocab_size = check_engine_inputs(student_hidden, student_head, teacher, labels, vocab_size)
    n_tokens = student_hidden.shape[0]
    chunk_size = auto_chunk_size(vocab_size) if chunk_size is None else chunk_size
    if blocks is None and hasattr(teacher, "chunk_bounds"):  # targets whose tokens must stay together (spans)
        blocks = teacher.chunk_bounds(chunk_size)
    chunks = token_ranges(n_tokens, chunk_size, blocks)
    normalizer = at_least_one(max(n_tokens, 1) if normalizer is None else normalizer, device=student_hidden.device)
    plan = _Plan(objective, teacher, labels, normalizer, chunks, student_head.transform, vocab_size)
    loss, metrics = _ChunkedDistillationFunction.apply(student_hidden, student_head.weight, student_head.bias, plan)
    entropy_sum = metrics[4] if objective.reports_target_entropy else None
    return DistillationLossOutput(loss, metrics[0], metrics[1], metrics[2], n_tokens, block_sum=metrics[3],
                                  target_entropy_sum=entropy_sum)


def teacher_targets_of(teacher_hidden, teacher_weight, teacher_bias=None, teacher_transform=IDENTITY):
    """The teacher targets of the flat signature: hidden states and a head (a :class:`ProjectedTeacher`), or a
    teacher targets object passed as ``teacher_hidden`` with no head (a cached top-k teacher)."""
    if teacher_weight is None:
        return teacher_hidden
    return ProjectedTeacher(teacher_hidden, OutputHead(teacher_weight, teacher_bias, teacher_transform))


def with_flat_arguments(loss_function, name: str, summary: str):
    """``loss_function`` (:func:`chunked_loss` or :func:`~llmkd.losses.dense_reference.dense_loss`) with the heads,
    the teacher and the objective spelled out as arguments (the form ``chunked_distillation_loss`` and
    ``dense_distillation_loss`` have)."""

    def flat(
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden,
        teacher_weight: torch.Tensor | None,
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
        teacher = teacher_targets_of(teacher_hidden, teacher_weight, teacher_bias, teacher_transform)
        objective = DistillationObjective(token_loss, kd_weight, ce_weight, block_loss, block_weight)
        return loss_function(student_hidden, OutputHead(student_weight, student_bias, student_transform), teacher,
                             labels, objective, normalizer=normalizer, chunk_size=chunk_size, blocks=chunk_bounds,
                             vocab_size=vocab_size)

    flat.__name__ = flat.__qualname__ = name
    flat.__doc__ = summary + FLAT_ARGUMENTS
    return flat


FLAT_ARGUMENTS = """

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
        kd_weight / ce_weight / block_loss / block_weight: the :class:`~llmkd.losses.DistillationObjective`.
        student_bias / teacher_bias / student_transform / teacher_transform: the rest of the two heads.
        chunk_bounds: the ``blocks`` (the chunks, and the block loss's blocks).
        normalizer / chunk_size / vocab_size: as :func:`~llmkd.losses.chunked_loss`.
    Returns:
        :class:`DistillationLossOutput`.
    """

chunked_distillation_loss = with_flat_arguments(
    chunked_loss, "chunked_distillation_loss",
    "The distillation loss over N valid tokens without materialising (N x V) logits: :func:`chunked_loss` with the\n"
    "    heads, the teacher and the objective spelled out as arguments.")
