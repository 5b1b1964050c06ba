"""Distillation losses: pure functions of tensors (no Trainer, no model).

Dense divergences on logits (docs/ALGORITHMS.md section 0), their per-token kernels, the registry that turns a name
into a token loss, TAID's interpolated target and schedule (section 1), SinKD's Sinkhorn term (section 2), and the
chunked engine that runs any token loss (and a block loss such as the Sinkhorn term) from hidden states and
output heads; the MoE load-balancing loss and the preference losses with a teacher reference (section 3); DHO's loss
of its two heads (section 4); the cross-tokenizer losses on aligned spans (section 6).
"""

from .cross_tokenizer import AlignedTeacher, HybridLoss, SpanLikelihoodLoss, ULDLoss
from .dense_reference import dense_distillation_loss, dense_loss, distillation_loss_from_logits
from .engine import DistillationLossOutput, chunked_distillation_loss, chunked_loss
from .dho import DHOLoss, dho_loss
from .head import LogitTransform, OutputHead
from .objective import DistillationObjective
from .divergences import (
    alpha_beta_divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    softened_log_probs,
    tvd,
)
from .groups import TargetGroup, grouped_loss
from .load_balancing import expert_assignment_counts, load_balancing_loss
from .preference import PREFERENCE_LOSSES, dpo_sigmoid_loss, kto_pair_loss, preference_loss
from .reduction import reduce_token_losses
from .registry import DIVERGENCES, Divergence, get_divergence, register_divergence
from .sampled_token import SampledTokenLoss
from .sparse_teacher import SparseTeacher
from .targets import DenseTargets, ProjectedTeacher
from .sinkhorn import SinkhornTerm, sinkhorn_blocks, sinkhorn_loss, sinkhorn_plan
from .taid import TAIDSchedule, TAIDTokenLoss, taid_loss

__all__ = [
    "AlignedTeacher",
    "HybridLoss",
    "SpanLikelihoodLoss",
    "ULDLoss",
    "alpha_beta_divergence",
    "DHOLoss",
    "DIVERGENCES",
    "Divergence",
    "DenseTargets",
    "DistillationLossOutput",
    "DistillationObjective",
    "LogitTransform",
    "OutputHead",
    "ProjectedTeacher",
    "chunked_distillation_loss",
    "chunked_loss",
    "dense_distillation_loss",
    "dense_loss",
    "distillation_loss_from_logits",
    "dho_loss",
    "dpo_sigmoid_loss",
    "expert_assignment_counts",
    "grouped_loss",
    "kto_pair_loss",
    "load_balancing_loss",
    "PREFERENCE_LOSSES",
    "preference_loss",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "register_divergence",
    "reduce_token_losses",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "SampledTokenLoss",
    "SinkhornTerm",
    "SparseTeacher",
    "sinkhorn_blocks",
    "sinkhorn_loss",
    "sinkhorn_plan",
    "softened_log_probs",
    "taid_loss",
    "TAIDSchedule",
    "TAIDTokenLoss",
    "TargetGroup",
    "tvd",
]
