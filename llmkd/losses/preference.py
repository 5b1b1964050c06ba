"""Preference losses with a frozen teacher as the reference (docs/ALGORITHMS.md section 3, stage 2).

Inputs are sequence log-probabilities (sums of the response tokens' log-probs), shape ``(B,)`` each:
``policy_chosen`` / ``policy_rejected`` for the student, ``reference_chosen`` / ``reference_rejected`` for the teacher.

``sigmoid`` (DPO):
    L = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))
``kto_pair`` (LLaVA-MoD's default, the paired KTO of the original TRL implementation):
    KL_c = clamp(mean(pi_c - ref_c), min=0),  KL_r = clamp(mean(pi_r - ref_r), min=0)
    (means over the micro-batch's pairs; not detached, so the KL estimates carry gradient as in the original code)
    L = mean(concat(1 - sigmoid(beta * ((pi_c - ref_c) - KL_r)), 1 - sigmoid(beta * (KL_c - (pi_r - ref_r)))))
Both return per-pair losses ``(B,)`` for sigmoid and ``(2B,)`` for kto_pair, whose mean is the batch loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("sigmoid", "kto_pair")


def dpo_sigmoid_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                     reference_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Per-pair DPO losses ``(B,)``."""
    margin = (policy_chosen - policy_rejected) - (reference_chosen - reference_rejected)
    return -F.logsigmoid(beta * margin)


def kto_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                  reference_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Per-response paired-KTO losses ``(2B,)``: the chosen responses' then the rejected responses'."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    kl_chosen = chosen_ratio.mean().clamp(min=0)
    kl_rejected = rejected_ratio.mean().clamp(min=0)
    return torch.cat((1 - torch.sigmoid(beta * (chosen_ratio - kl_rejected)),
                      1 - torch.sigmoid(beta * (kl_chosen - rejected_ratio))))


def preference_loss(loss_type: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float = 0.1
                    ) -> torch.Tensor:
    """The per-item losses of ``loss_type`` (``sigmoid``: ``(B,)``, ``kto_pair``: ``(2B,)``), fp32."""
    args = [t.float() for t in (policy_chosen, policy_rejected, reference_chosen, reference_rejected)]
    if loss_type == "sigmoid":
        return dpo_sigmoid_loss(*args, beta=beta)
    if loss_type == "kto_pair":
        return kto_pair_loss(*args, beta=beta)
    raise ValueError(f"Unknown preference loss {loss_type!r}; choose one of {PREFERENCE_LOSSES}.")
