"""Several teachers in one loss: the tokens of a batch split into groups, each with its own teacher targets
(:class:`TargetGroup`, :func:`grouped_loss`).

A group is the targets of one teacher for some of the batch's N valid tokens (``tokens``: their indices in the
N, or None for all of them) and two factors:

* ``kd_weight``: the group's token loss is weighted by ``objective.kd_weight * kd_weight``;
* ``share``: the part of each of its tokens' cross-entropy (and of its token count in the logged means) the group
  carries, ``objective.ce_weight * share``.

Routing (each row to one teacher) makes disjoint groups with ``share = 1``: the loss is the sum of the
single-teacher losses of the groups' tokens, each divided by the same step-wide normaliser. Mixing (every teacher
on every token, weights ``w_i`` summing to 1) makes groups of all tokens with ``kd_weight = share = w_i``: the
loss is ``sum_i w_i D(p_i, q) + CE``, for forward KL the KL to the mixture ``sum_i w_i p_i`` up to a constant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .engine import DistillationLossOutput
from .objective import DistillationObjective


@dataclass
class TargetGroup:
    """One teacher's targets for some of the batch's N valid tokens (see the module docstring).

    Attributes:
        name: the teacher's name (the per-teacher logs).
        targets: the teacher targets of the group's tokens, in their order (any engine targets); None: the group
            has no tokens in this batch.
        tokens: ``(n,)`` long indices of the group's tokens among the N, increasing; None: all N.
        kd_weight / share: the factors of the module docstring.
    """

    name: str
    targets: object
    tokens: torch.Tensor | None
    kd_weight: float = 1.0
    share: float = 1.0


def grouped_loss(loss_fn, student: torch.Tensor, groups: list[TargetGroup], labels: torch.Tensor,
                 objective: DistillationObjective, *, normalizer, **kwargs):
    """``(the combined output, {name: the group's output})``: ``loss_fn(student[tokens], targets, labels[tokens],
    scaled objective, normalizer=normalizer, **kwargs)`` per group, summed.

    ``loss_fn(student_part, targets, labels_part, objective, normalizer=..., **kwargs)`` is
    :func:`~llmkd.losses.chunked_loss` with its head bound (``student``: the ``(N, H)`` hidden states) or
    :func:`~llmkd.losses.distillation_loss_from_logits` (``student``: ``(N, V)`` logits). The
    combined output's sums are the groups' times their ``share`` (the cross-entropy of each token counted once),
    its ``num_tokens`` their shared count.
    """
    if objective.block_loss is not None:
        raise ValueError("A block loss (SinKD) couples the tokens of a block, which several teachers would split: "
                         "distil from one teacher with this trainer.")
    outputs = {}
    zero = student.new_zeros((), dtype=torch.float32)
    for group in groups:
        if group.targets is None:  # a teacher without tokens in this batch
            outputs[group.name] = DistillationLossOutput(zero, zero, zero, zero, 0)
            continue
        rows = group.tokens
        part = student if rows is None else student.index_select(0, rows)
        part_labels = labels if rows is None else labels.index_select(0, rows)
        scaled = dataclasses.replace(objective, kd_weight=objective.kd_weight * group.kd_weight,
                                     ce_weight=objective.ce_weight * group.share)
        outputs[group.name] = loss_fn(part, group.targets, part_labels, scaled, normalizer=normalizer, **kwargs)

    def total(field):
        values = [getattr(outputs[g.name], field) for g in groups]
        if all(v is None for v in values):
            return None
        return sum((g.share * v.detach().float() for g, v in zip(groups, values) if v is not None), zero)

    combined = DistillationLossOutput(
        loss=sum((outputs[g.name].loss for g in groups), zero),
        kd_sum=total("kd_sum"), ce_sum=total("ce_sum"), teacher_ce_sum=total("teacher_ce_sum"),
        num_tokens=int(round(sum(g.share * outputs[g.name].num_tokens for g in groups))),
        block_sum=zero, target_entropy_sum=total("target_entropy_sum"))
    return combined, outputs
