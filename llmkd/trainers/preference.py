"""Preference distillation (LLaVA-MoD stage 2, docs/ALGORITHMS.md section 3): DPO whose reference is the frozen teacher.

Built on TRL's ``DPOTrainer``, which provides the data handling (prompt/chosen/rejected rows, conversational or
plain, with images for VLMs), the fused log-prob head (no (tokens x vocab) logits), the reference placement (a
ZeRO-3 inference engine under DeepSpeed, FSDP, or a plain copy), ``precompute_ref_log_probs`` and evaluation.
llmkd adds what TRL does not do:

- the reference model is the TEACHER (loaded frozen like in every llmkd trainer: dtype, 4/8-bit), not a copy of
  the student; teacher and student must share a tokenizer, since the teacher scores the student's token ids;
- the loss ``loss_type``: ``sigmoid`` (DPO) or ``kto_pair`` (LLaVA-MoD's default, which TRL no longer ships),
  from :mod:`llmkd.losses.preference`;
- for an MoE student, ``aux_loss_coef`` times the load-balancing loss computed from router logits recorded with
  hooks (TRL reads ``outputs.aux_loss``, which LLaVA-style wrappers do not return), and the per-expert load logs.

Logged: ``rewards/chosen``, ``rewards/rejected`` (``beta * (pi - ref)`` means), ``rewards/margins`` (``beta``
times the student's chosen-minus-rejected margin beyond the teacher's), ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected``, ``teacher_margin`` (the teacher's ``ref_c - ref_r``) and, for MoE students, ``moe_*``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer

from ..constants import IGNORE_INDEX
from ..config import ModelSourceFields
from ..data.sources import load_dataset_splits
from ..heads import unwrap_model
from ..loading import load_student, load_teacher, tokenizer_of
from ..losses.preference import PREFERENCE_LOSSES, preference_loss
from ..models.routing import monitor_student_routers
from ..teacher import check_same_tokenizer, freeze
from .base import DistillTrainer, lora_config_from_args
from .moe import MOE_STAGES, MoEStudentFields, freeze_for_stage, freeze_vision_tower
from .shared import LlmkdTrainerMixin, method_config
from .guards import TrainingGuardsMixin

logger = logging.getLogger(__name__)

_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferenceDistillConfig(MoEStudentFields, ModelSourceFields, DPOConfig):
    r"""Configuration of :class:`PreferenceDistillTrainer`: every ``trl.DPOConfig`` field, plus the fields that name
    the student, the teacher (the reference), the data and LoRA (as in :class:`~llmkd.DistillConfig`).

    Parameters:
        loss_type: ``["kto_pair"]`` (default, LLaVA-MoD's official choice) or ``["sigmoid"]`` (DPO); one loss.
        beta: the DPO/KTO temperature (0.1).
        aux_loss_coef: weight of an MoE student's load-balancing loss (0.01; 0 turns it off).
        aux_loss_type / aux_loss_mask_padding / second_expert_sampling / capacity_factor / min_capacity: how an
            MoE student's routers train, as in the mimic stage (:class:`~llmkd.trainers.moe.MoEStudentFields`).
        moe_stage: which parameters train, as in :class:`~llmkd.MoEMimicConfig`: ``None`` (default) keeps the
            student's own ``requires_grad`` (a model loaded from a path trains whole), ``d2s`` only the FFNs /
            experts / routers and a VLM's projector, ``d2d`` everything.
        freeze_vision_tower: keep a VLM student's vision tower frozen (True), whatever ``moe_stage`` says.
    Defaults that differ from DPOConfig: ``learning_rate=2e-6`` (the paper), ``bf16=False`` and
    ``gradient_checkpointing=False`` (set them in GPU recipes), ``logging_steps=10``.
    """

    loss_type: list[str] = field(default_factory=lambda: ["kto_pair"],
                                 metadata={"help": f"One of {PREFERENCE_LOSSES}."})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "MoE load-balancing loss coefficient."})
    moe_stage: str | None = field(default=None, metadata={
        "help": "Which student parameters train: None keeps the student's own requires_grad, d2s the FFNs/experts/"
                "routers (+ projector), d2d all but the vision tower."})
    freeze_vision_tower: bool = field(default=True, metadata={"help": "Keep a VLM student's vision tower frozen."})
    learning_rate: float = field(default=2e-6, metadata={"help": "Learning rate (LLaVA-MoD: 2e-6)."})
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (GPU)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Gradient checkpointing."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if len(self.loss_type) != 1 or self.loss_type[0] not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type must be one of {list(PREFERENCE_LOSSES)} (a single loss), got "
                             f"{self.loss_type}.")
        if self.moe_stage is not None and self.moe_stage not in MOE_STAGES:
            raise ValueError(f"moe_stage must be None or one of {MOE_STAGES}, got {self.moe_stage!r}.")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}.")
        self.check_moe_student_fields()
        if self.ld_alpha is not None or self.use_weighting or self.f_divergence_type != "reverse_kl":
            raise ValueError("ld_alpha, use_weighting and f_divergence_type are TRL DPO variants that "
                             "PreferenceDistillTrainer does not implement; leave them at their defaults.")
        self.router_aux_loss_coef = 0.0  # TRL's own aux path reads outputs.aux_loss; llmkd records the routers
        self.adapt_to_launcher()
        super().__post_init__()
        self.check_model_sources()


class PreferenceDistillTrainer(TrainingGuardsMixin, LlmkdTrainerMixin, DPOTrainer):
    """DPO / paired KTO of ``model`` against the frozen ``teacher_model`` as the reference (see the module docstring).

    Args:
        model: the student (a ``PreTrainedModel`` or a name/path; e.g. the MoE student of the mimic stage).
        teacher_model: the teacher (object or name/path; default ``args.teacher_model_name_or_path``).
        args: a :class:`PreferenceDistillConfig`.
        train_dataset / eval_dataset: preference rows (``prompt``, ``chosen``, ``rejected``, optionally
            ``images``); loaded from ``args.dataset_name`` when omitted.
        processing_class: the student's tokenizer or processor (loaded from the student's path when omitted).
        teacher_processing_class: the teacher's tokenizer, checked equal to the student's.
        peft_config: a peft config (LoRA student); ``args.use_peft`` builds one from the ``lora_*`` fields.
    """

    _tag_names = ["llmkd", "distillation", "dpo", "llava-mod"]

    def __init__(self, model=None, teacher_model=None, args: PreferenceDistillConfig | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 teacher_processing_class=None, peft_config=None, **kwargs):
        args = method_config(args, PreferenceDistillConfig, "PreferenceDistillTrainer")
        model, processing_class = load_student(model, args, processing_class)
        self._select_trainable(model, args)
        teacher, teacher_processing_class = load_teacher(teacher_model, args, teacher_processing_class)
        if teacher is model:
            raise ValueError("The teacher and the student are the same object: the reference must be the teacher.")
        check_same_tokenizer(tokenizer_of(processing_class), teacher_processing_class)
        self._check_vocab(model, teacher, tokenizer_of(processing_class))
        freeze(teacher)
        if train_dataset is None and args.dataset_name:
            train_dataset, loaded_eval = load_dataset_splits(args)
            eval_dataset = eval_dataset if eval_dataset is not None else loaded_eval
        if train_dataset is None:
            raise ValueError("No preference data: pass train_dataset=... or set dataset_name in the config/recipe "
                             "(rows with 'prompt', 'chosen' and 'rejected').")
        self._check_columns(train_dataset, "train")
        if eval_dataset is not None:
            self._check_columns(eval_dataset, "eval")
        if peft_config is None and args.use_peft:
            peft_config = lora_config_from_args(args)
        super().__init__(model=model, ref_model=teacher, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         peft_config=peft_config, **kwargs)
        self.router_monitor = monitor_student_routers(unwrap_model(self.model), self.args)

    # ------------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _select_trainable(model, args) -> None:
        if args.moe_stage is not None:
            trainable, total = freeze_for_stage(model, args.moe_stage, args.freeze_vision_tower)
            logger.info("Preference stage trains %d of %d parameters (moe_stage=%s).", trainable, total,
                        args.moe_stage)
        elif args.freeze_vision_tower:
            freeze_vision_tower(model)

    @staticmethod
    def _check_vocab(student, teacher, tokenizer) -> None:
        """The teacher must be able to score every id of the student's tokenizer."""
        teacher_vocab = teacher.config.get_text_config().vocab_size
        if teacher_vocab < len(tokenizer):
            raise ValueError(f"The teacher's vocabulary ({teacher_vocab}) is smaller than the tokenizer's "
                             f"({len(tokenizer)} tokens): the teacher cannot score the student's responses.")

    @staticmethod
    def _check_columns(dataset, split: str) -> None:
        columns = set(getattr(dataset, "column_names", None) or dataset[0].keys())
        raw = {"prompt", "chosen", "rejected"}
        tokenized = {"prompt_ids", "chosen_ids", "rejected_ids"}
        if not (raw <= columns or tokenized <= columns or {"chosen", "rejected"} <= columns):
            raise ValueError(f"The {split} preference data has columns {sorted(columns)}; it needs 'prompt', "
                             "'chosen' and 'rejected' (strings or chat messages; 'images' for a VLM).")

    # ------------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]  # (2B, S): chosen rows then rejected rows
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        recording = self.router_monitor.recording() if self.router_monitor is not None else contextlib.nullcontext()
        with recording:
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            aux = self._aux_loss(inputs)
        shift_mask = completion_mask[:, 1:]
        token_logps = outputs.log_probs[:, -shift_mask.shape[1]:]  # (2B, S-1), zero off the responses
        logps = (token_logps * shift_mask).sum(dim=1)  # (2B,)
        policy_chosen, policy_rejected = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            reference_chosen, reference_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            reference_chosen, reference_rejected = self.compute_ref_log_probs(self.ref_model, inputs)
        loss_type = self.loss_types[0]
        loss = preference_loss(loss_type, policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                               beta=self.beta).mean()
        if aux is not None and self.args.aux_loss_coef:
            loss = loss + self.args.aux_loss_coef * aux
        self._record_metrics(mode, policy_chosen, policy_rejected, reference_chosen, reference_rejected)
        return (loss, outputs) if return_outputs else loss

    def _aux_loss(self, inputs) -> torch.Tensor | None:
        """The MoE student's load-balancing loss of the forward just recorded (None for a dense student)."""
        if self.router_monitor is None:
            return None
        mask = inputs.get("attention_mask")
        aux = self.router_monitor.aux_loss(mask)
        self.router_monitor.accumulate_load(mask, aux, self.model.training)
        return aux

    @torch.no_grad()
    def _record_metrics(self, mode, policy_chosen, policy_rejected, reference_chosen, reference_rejected) -> None:
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = self.beta * (policy_chosen - reference_chosen).detach()
        rejected_rewards = self.beta * (policy_rejected - reference_rejected).detach()
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": policy_chosen.detach(),
            "logps/rejected": policy_rejected.detach(),
            "teacher_margin": (reference_chosen - reference_rejected).detach(),
        }
        for key, value in values.items():
            self._metrics[mode][key].append(gather(value.float()).mean().item())
