"""The chunked engine's objective computed the plain way: full ``(N, V)`` logits and ordinary autograd.

The reference the engine (:mod:`llmkd.losses.engine`) is tested against, and the trainers' dense path
(``use_chunked_loss=False``, the models' own full logits) and classification path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .engine import DistillationLossOutput, check_engine_inputs, objective_sums, token_ranges, with_flat_arguments
from .head import OutputHead, project
from .objective import BlockLoss, DistillationObjective
from .reduction import at_least_one


def distillation_loss_from_logits(student_logits: torch.Tensor, teacher, labels: torch.Tensor | None,
                                  objective: DistillationObjective, *, normalizer=None,
                                  blocks: Sequence[tuple[int, int]] | None = None) -> DistillationLossOutput:
    """The objective on full student logits ``(N, V)`` float32 (with gradient) and the teacher's targets for the
    same N rows (:mod:`llmkd.losses.targets`, cut to ``V``). The block loss is evaluated on each of ``blocks``
    (default: one block of all N rows)."""
    n_tokens, vocab_size = student_logits.shape
    with torch.no_grad():
        chunk = teacher.chunk(0, n_tokens, vocab_size)
        teacher_ce = chunk.cross_entropy_sum(labels)
    total, kd_sum, ce_sum, _, entropy_sum = objective_sums(student_logits, chunk, labels, objective, with_block=False)
    block_sum = dense_block_loss(student_logits, teacher, objective.block_loss, blocks)
    if objective.block_loss is not None and objective.block_weight != 0.0:
        total = total + objective.block_weight * block_sum
    normalizer = at_least_one(max(n_tokens, 1) if normalizer is None else normalizer, device=total.device)
    return DistillationLossOutput(total / normalizer, kd_sum.detach(), ce_sum.detach(), teacher_ce.detach(), n_tokens,
                                  block_sum=block_sum.detach(),
                                  target_entropy_sum=entropy_sum if objective.reports_target_entropy else None)


def dense_block_loss(student_logits: torch.Tensor, teacher, block_loss: BlockLoss | None,
                     blocks: Sequence[tuple[int, int]] | None) -> torch.Tensor:
    """Sum of ``block_loss`` over ``blocks`` (default one block) of full ``(N, V)`` student logits; each block's
    teacher targets come from ``teacher`` (:mod:`llmkd.losses.targets`), shaped like the student's block where the
    teacher does not know its whole distribution."""
    zero = student_logits.new_zeros((), dtype=torch.float32)
    if block_loss is None:
        return zero
    n_tokens, vocab_size = student_logits.shape
    ranges = token_ranges(n_tokens, None, blocks) if blocks is not None else ([(0, n_tokens)] if n_tokens else [])
    total = zero
    for start, end in ranges:
        logits = student_logits[start:end]
        with torch.no_grad():
            teacher_logits = teacher.chunk(start, end, vocab_size).logits(like=logits.detach())
        total = total + block_loss(logits, teacher_logits)
    return total


def dense_loss(student_hidden: torch.Tensor, student_head: OutputHead, teacher, labels: torch.Tensor | None,
               objective: DistillationObjective, *, normalizer=None, chunk_size: int | None = None,
               blocks: Sequence[tuple[int, int]] | None = None, vocab_size: int | None = None) -> DistillationLossOutput:
    """:func:`~llmkd.losses.engine.chunked_loss`'s arguments and result, computed from full logits
    (``chunk_size`` is accepted for a uniform signature and unused)."""
    vocab_size = check_engine_inputs(student_hidden, student_head, teacher, labels, vocab_size)
    student_logits = project(student_hidden, student_head.weight, student_head.bias, student_head.transform,
                             vocab_size)
    return distillation_loss_from_logits(student_logits, teacher, labels, objective, normalizer=normalizer,
                                         blocks=blocks)


dense_distillation_loss = with_flat_arguments(
    dense_loss, "dense_distillation_loss",
    "The same loss as :func:`~llmkd.losses.chunked_distillation_loss` (same arguments) with full (N x V) logits and\n"
    "    ordinary autograd; the block loss is evaluated on each range of ``chunk_bounds`` (default: one block of all N\n"
    "    tokens).")
