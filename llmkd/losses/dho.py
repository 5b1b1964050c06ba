"""DHO's loss (docs/ALGORITHMS.md section 4): cross-entropy on the labeled batch through the CE head, and forward
KL to the teacher through the KD head on the labeled and the unlabeled batch. A pure function of logits; the
trainer (:mod:`llmkd.trainers.dho`) runs the models and passes the step's global example counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .divergences import forward_kl
from .reduction import at_least_one


@dataclass
class DHOLoss:
    """The loss of a batch and its three terms (each a mean over its examples)."""

    loss: torch.Tensor
    ce: torch.Tensor
    kd_labeled: torch.Tensor
    kd_unlabeled: torch.Tensor


def dho_loss(ce_logits: torch.Tensor, kd_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
             unlabeled_kd_logits: torch.Tensor, unlabeled_teacher_logits: torch.Tensor, *, ce_weight: float = 0.5,
             temperature: float = 2.0, labeled_count=None, unlabeled_count=None) -> DHOLoss:
    """``lam * CE(h_ce(z_l), y) + (1 - lam) * T^2 * [KL(p_t(x_l) || q_kd(x_l)) + KL(p_t(x_u) || q_kd(x_u))]``.

    Args:
        ce_logits / kd_logits: ``(B_l, C)`` the two heads on the labeled batch.
        labels: ``(B_l,)`` class ids.
        teacher_logits: ``(B_l, C)`` the teacher on the labeled batch.
        unlabeled_kd_logits / unlabeled_teacher_logits: ``(B_u, C)`` the KD head and the teacher on the unlabeled
            batch.
        labeled_count / unlabeled_count: the divisors of the labeled and unlabeled sums (the step's global counts
            under gradient accumulation / data parallelism); default ``B_l`` and ``B_u``.
    Returns:
        :class:`DHOLoss`; the KL terms include the ``T^2`` factor (:func:`llmkd.losses.forward_kl`).
    """
    num_labels = ce_logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"Labels must be class ids in [0, {num_labels}), got values from {int(labels.min())} to "
                         f"{int(labels.max())}.")
    for name, student, teacher in (("labeled", kd_logits, teacher_logits),
                                   ("unlabeled", unlabeled_kd_logits, unlabeled_teacher_logits)):
        if student.shape != teacher.shape:
            raise ValueError(f"On the {name} batch the student's KD logits {tuple(student.shape)} and the teacher's "
                             f"logits {tuple(teacher.shape)} differ in shape: the teacher must score the student's "
                             f"{num_labels} classes.")
    labeled_count = labels.numel() if labeled_count is None else labeled_count
    unlabeled_count = unlabeled_kd_logits.shape[0] if unlabeled_count is None else unlabeled_count
    ce = F.cross_entropy(ce_logits.float(), labels.long(), reduction="sum") / at_least_one(labeled_count)
    kd_labeled = forward_kl(kd_logits, teacher_logits, temperature=temperature, reduction="sum") / at_least_one(
        labeled_count)
    kd_unlabeled = forward_kl(unlabeled_kd_logits, unlabeled_teacher_logits, temperature=temperature,
                              reduction="sum") / at_least_one(unlabeled_count)
    loss = ce_weight * ce + (1.0 - ce_weight) * (kd_labeled + kd_unlabeled)
    return DHOLoss(loss=loss, ce=ce, kd_labeled=kd_labeled, kd_unlabeled=kd_unlabeled)
