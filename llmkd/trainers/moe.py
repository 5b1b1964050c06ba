"""MoE mimic distillation (LLaVA-MoD stage 1, docs/ALGORITHMS.md section 3).

loss = kd_weight * KL(teacher || student) + ce_weight * CE + aux_loss_coef * load-balancing loss

The KL and CE run on the response tokens through the chunked engine of :class:`~llmkd.DistillTrainer` (position
t's hidden state predicts token t+1: the mask is shifted with the labels, not one position off as in the
official code), with T = 1 by default. The load-balancing loss is computed from the student's router logits,
recorded with hooks (:class:`~llmkd.models.routing.RouterMonitor`), so it works inside LLaVA-style wrappers that
do not return it.

Stages:
- ``d2d`` (dense-to-dense): a dense (or already sparse) student, the whole language model trains (a VLM's
  projector too; its vision tower stays frozen unless ``freeze_vision_tower=False``).
- ``d2s`` (dense-to-sparse): a dense student is upcycled with :func:`~llmkd.upcycle_to_moe` (an MoE student is
  used as it is), then only the FFNs (experts, routers, and the remaining dense FFNs) and a VLM's projector
  train; attention, norms, embeddings and lm_head stay frozen.
In both stages the all-zero shared expert that upcycling to Qwen2-MoE adds (see :mod:`llmkd.models.moe`) stays
frozen at zero.

The official code's MoE training (DeepSpeed's top-2 aux loss, a Gumbel-sampled second expert, capacity dropping)
is available through :class:`MoEStudentFields` (docs/MOE.md, "Differences from the official code").
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..constants import IGNORE_INDEX
from ..config import DistillConfig
from ..heads import unwrap_model
from ..losses.load_balancing import AUX_LOSS_TYPES
from ..models.moe import upcycle_to_moe
from ..models.routing import is_moe_model, monitor_student_routers, stop_router_outputs_through_vlm_wrapper
from .shared import method_config
from .base import DistillTrainer

logger = logging.getLogger(__name__)

MOE_STAGES = ("d2d", "d2s")
_FFN_PARAMETER = re.compile(r"(^|\.)layers\.\d+\.mlp\.")
_PROJECTOR = "multi_modal_projector"
_VISION_TOWER = ("vision_tower", "vision_model", "visual")


@dataclass
class MoEStudentFields:
    r"""How an MoE student's routers are trained, shared by :class:`MoEMimicConfig` and
    :class:`~llmkd.PreferenceDistillConfig` (the fields act only on an MoE student).

    The defaults keep transformers' own MoE training (the saved model's class); the official LLaVA-MoD code
    (DeepSpeed's MoE layer) differs on each point, and these fields reproduce it (docs/MOE.md, "Differences from
    the official code"):

    Parameters:
        aux_loss_type: ``switch`` (default) — transformers' ``load_balancing_loss_func``, E·Σ f_e·P_e over the
            layers' tokens pooled (``top_k`` at balance), what the saved model's own ``aux_loss`` is, so continued
            training with any transformers tool optimises the same thing; or ``deepspeed_top2`` — the official
            formula, per layer E²·mean(me·ce) with ce the top-1 share, SUMMED over the sparse layers (1 per layer at
            balance: 12 for a 12-sparse-layer student, about ``num_sparse_layers / top_k`` times the balancing
            gradient at the same coefficient). The official d2s stage adds that term twice (inside the model's CE
            and again in the trainer): ``aux_loss_coef=0.02`` reproduces it; llmkd never doubles it itself.
        aux_loss_mask_padding: leave padding rows out of the aux loss (True, default). The official code counts
            every row, padding included (False), but ran one sequence per device, so it had no padding: masking
            gives its value on such batches and keeps padding from moving the loss on batched ones.
        second_expert_sampling: while training, sample each token's second expert with Gumbel noise over the
            non-first experts' logits, as the official DeepSpeed top-2 gating does (False, default: the
            second-largest gate, as at inference). Seeded by ``seed`` (torch's global generator).
        capacity_factor: while training, drop the assignments beyond ``max(ceil(tokens / E · 2 · capacity_factor),
            min_capacity)`` per expert (first choices first, then second choices, each in token order); a token
            that loses both experts passes through the layer's residual only. None (default): nothing is dropped,
            as at inference. The official stage scripts use 1.5.
        min_capacity: the smallest capacity when ``capacity_factor`` is set (0, the official code's value).
    Either routing option needs a top-2 student with renormalised gates (what ``upcycle_to_moe`` builds). At
    evaluation and after saving, the model routes as its transformers class does (deterministic top-2, nothing
    dropped); the official model keeps sampling the second expert at evaluation and inference (its evaluation
    capacity factor, 2.0, drops nothing with 4 experts).
    """

    aux_loss_type: str = field(default="switch", metadata={
        "help": f"Load-balancing loss formula, one of {AUX_LOSS_TYPES}: switch (transformers) or deepspeed_top2 "
                "(LLaVA-MoD's official code)."})
    aux_loss_mask_padding: bool = field(default=True, metadata={
        "help": "Leave padding out of the aux loss (the official code counts it; it ran without padding)."})
    second_expert_sampling: bool = field(default=False, metadata={
        "help": "Sample the second expert with Gumbel noise while training (official: true)."})
    capacity_factor: float | None = field(default=None, metadata={
        "help": "Drop assignments over capacity while training (official: 1.5); None drops nothing."})
    min_capacity: int = field(default=0, metadata={"help": "Minimum expert capacity (official: 0)."})

    def check_moe_student_fields(self) -> None:
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(f"aux_loss_type must be one of {AUX_LOSS_TYPES}, got {self.aux_loss_type!r}.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (LLaVA-MoD: 1.5) or None (drop nothing), got "
                             f"{self.capacity_factor}.")
        if self.min_capacity < 0:
            raise ValueError(f"min_capacity must be >= 0, got {self.min_capacity}.")


@dataclass
class MoEMimicConfig(MoEStudentFields, DistillConfig):
    r"""Configuration of :class:`MoEMimicTrainer` (every :class:`~llmkd.DistillConfig` field works).

    Parameters:
        moe_stage: ``d2s`` (default: upcycle and train the FFNs/experts/routers) or ``d2d`` (whole LM).
        num_experts / num_experts_per_tok / moe_every: how a dense student is upcycled in ``d2s`` (4 experts,
            top-2, layers 0, 2, 4, ...); ignored for a student that is already an MoE.
        aux_loss_coef: weight of the load-balancing loss (0.01); 0 turns it off (loads are still logged).
        kd_weight / ce_weight: weights of the forward KL and of the CE (1 and 1: LLaVA-MoD adds them);
            ``kd_ratio`` is not used by this trainer.
        freeze_vision_tower: keep a VLM's vision tower frozen in both stages (True).
        aux_loss_type / aux_loss_mask_padding / second_expert_sampling / capacity_factor / min_capacity: how the
            routers train, see :class:`MoEStudentFields`.
    Defaults that differ from DistillConfig: ``divergence="fkl"`` and ``temperature=1.0`` (as the paper).
    """

    moe_stage: str = field(default="d2s", metadata={"help": f"One of {MOE_STAGES}."})
    num_experts: int = field(default=4, metadata={"help": "Experts per sparse layer when upcycling."})
    num_experts_per_tok: int = field(default=2, metadata={"help": "Top-k experts per token when upcycling."})
    moe_every: int = field(default=2, metadata={"help": "Upcycle layers 0, every, 2*every, ..."})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "Load-balancing loss coefficient."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight of the forward KL."})
    ce_weight: float = field(default=1.0, metadata={"help": "Weight of the LM cross-entropy."})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep a VLM's vision tower frozen."})

    def __post_init__(self):
        super().__post_init__()
        if self.moe_stage not in MOE_STAGES:
            raise ValueError(f"moe_stage must be one of {MOE_STAGES}, got {self.moe_stage!r}.")
        if self.aux_loss_coef < 0 or self.kd_weight < 0 or self.ce_weight < 0:
            raise ValueError("aux_loss_coef, kd_weight and ce_weight must be >= 0.")
        self.check_moe_student_fields()


def stage_trainable(name: str, stage: str, freeze_vision_tower: bool = True) -> bool:
    """Whether the parameter ``name`` trains in ``stage`` (see the module docstring)."""
    is_vision = any(part in name.split(".") for part in _VISION_TOWER)
    if "shared_expert" in name:
        return False  # upcycling's all-zero Qwen2-MoE shared expert stays zero (llmkd.models.moe)
    if stage == "d2d":
        return not (is_vision and freeze_vision_tower)
    return (bool(_FFN_PARAMETER.search(name)) and not is_vision) or _PROJECTOR in name


def freeze_vision_tower(model: nn.Module) -> int:
    """Freeze a VLM's vision tower (no-op for a text model); returns the number of parameters frozen."""
    frozen = 0
    for name, parameter in model.named_parameters():
        if any(part in name.split(".") for part in _VISION_TOWER):
            parameter.requires_grad_(False)
            frozen += parameter.numel()
    return frozen


def freeze_for_stage(model: nn.Module, stage: str, freeze_vision_tower: bool = True) -> tuple[int, int]:
    """Set ``requires_grad`` for ``stage``; returns (trainable, total) parameter counts."""
    if stage not in MOE_STAGES:
        raise ValueError(f"stage must be one of {MOE_STAGES}, got {stage!r}.")
    trainable = total = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(stage_trainable(name, stage, freeze_vision_tower))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    if trainable == 0:
        raise ValueError(f"No parameter of {type(model).__name__} trains in stage {stage!r}: expected FFN "
                         "parameters named '...layers.<i>.mlp...'.")
    return trainable, total


class MoEMimicTrainer(DistillTrainer):
    """Mimic distillation of a dense or upcycled-MoE student (LLM or LLaVA-style VLM); see the module docstring.

    Logs, next to DistillTrainer's kd/ce metrics: ``moe_aux_loss`` and the per-expert load ``moe_load_e{i}``
    (share of the top-k assignments, mean over the sparse layers; ``moe_load_max`` the largest share).
    """

    _tag_names = ["llmkd", "distillation", "moe", "llava-mod"]
    config_class = MoEMimicConfig

    def __init__(self, model=None, teacher_model=None, args: MoEMimicConfig | None = None, peft_config=None,
                 **kwargs):
        args = method_config(args, MoEMimicConfig, "MoEMimicTrainer")
        if args.moe_stage == "d2s" and (peft_config is not None or args.use_peft):
            raise ValueError("moe_stage='d2s' trains the experts and routers in full; LoRA is not supported there "
                             "(use it in the d2d stage, or set use_peft=False).")
        super().__init__(model=model, teacher_model=teacher_model, args=args, peft_config=peft_config, **kwargs)
        if self.is_classification:
            raise ValueError("MoE mimic distillation is for causal LMs and VLMs, not sequence classifiers.")
        self.router_monitor = monitor_student_routers(unwrap_model(self.model), self.args)
        if args.moe_stage == "d2s" and self.router_monitor is None:
            raise ValueError("moe_stage='d2s' needs an MoE student after upcycling; none was found.")

    def _student(self, model, args, processing_class, task="causal_lm"):
        model, processing_class = super()._student(model, args, processing_class, task)
        if args.moe_stage == "d2s" and not is_moe_model(model):
            model = upcycle_to_moe(model, num_experts=args.num_experts, top_k=args.num_experts_per_tok,
                                   every=args.moe_every, aux_loss_coef=args.aux_loss_coef, seed=args.seed)
        stop_router_outputs_through_vlm_wrapper(model)  # before the first forward (transformers >= 5.24's LLaVA)
        if not (args.use_peft and args.moe_stage == "d2d"):
            trainable, total = freeze_for_stage(model, args.moe_stage, args.freeze_vision_tower)
            logger.info("MoE mimic stage %s: %d of %d parameters train (%.1f%%).", args.moe_stage, trainable, total,
                        100.0 * trainable / max(total, 1))
        return model, processing_class

    @staticmethod
    def _teacher(teacher, args, teacher_processing_class, task="causal_lm"):
        teacher, teacher_processing_class = DistillTrainer._teacher(teacher, args, teacher_processing_class, task)
        stop_router_outputs_through_vlm_wrapper(teacher)  # an MoE VLM teacher, as the student
        return teacher, teacher_processing_class

    # ------------------------------------------------------------------------------------------------ loss
    def loss_weights(self) -> tuple[float, float]:
        return self.args.kd_weight, self.args.ce_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.router_monitor is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        with self.router_monitor.recording():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def extra_loss(self, model, student_outputs, inputs, normalizer) -> torch.Tensor | None:
        """``aux_loss_coef * aux * (this micro-batch's response tokens / the step's)``: the per-micro-batch aux
        loss (a mean over its tokens, as transformers computes it) weighted by the micro-batch's token share."""
        if self.router_monitor is None:
            return None
        mask = inputs.get("attention_mask")
        aux = self.router_monitor.aux_loss(mask)
        self.router_monitor.accumulate_load(mask, aux, model.training)
        if self.args.aux_loss_coef == 0:
            return None
        tokens = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum().to(torch.float32)
        share = tokens / (tokens if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32,
                                                                           device=tokens.device)).clamp_min(1.0)
        return self.args.aux_loss_coef * aux * share

