"""DistillTrainer: token-level distillation of a causal LM (or a LLaVA-style VLM) from a frozen teacher.

One step: the teacher's final hidden states at the valid positions (no logits), then the student's forward with
its output head replaced by the chunked engine (:mod:`llmkd.heads`), which computes
``(1 - kd_ratio) * CE + kd_ratio * divergence`` over the valid tokens, divided by the global valid-token count of
the optimizer step (``num_items_in_batch``), so that gradient accumulation and data parallelism give the same
gradient as one large batch.

Sequence classifiers (``task="sequence_classification"``, detected from the student) are distilled per example:
``(1 - kd_ratio) * CE + kd_ratio * divergence`` over the (B, C) class logits, divided by the step's global
example count.

Method trainers (TAID, SinKD, MoE mimic) subclass this and override the small hooks
:meth:`DistillTrainer.token_loss_fn`, :meth:`DistillTrainer.loss_weights`, :meth:`DistillTrainer.block_loss_fn`
(a loss coupling the tokens, or examples, of a block, e.g. SinKD's Sinkhorn term), :meth:`DistillTrainer.blocks`
and :meth:`DistillTrainer.extra_loss`.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DataCollatorWithPadding, EvalPrediction, PreTrainedModel, Trainer

from ..constants import IGNORE_INDEX
from ..config import DistillConfig
from ..data import IMAGE_FIELDS, DistillDataCollator, prepare_dataset
from ..data.classification import prepare_classification_dataset
from ..data.sources import load_dataset_splits
from ..heads import intercept_head, logit_transform_for, output_head, unwrap_model, verify_head_reproduction
from ..loading import check_sequence_lengths, detect_task, load_student, load_teacher, tokenizer_of
from ..losses import (
    DenseTargets,
    DistillationObjective,
    OutputHead,
    chunked_loss,
    distillation_loss_from_logits,
    get_divergence,
    grouped_loss,
)
from .shared import LlmkdTrainerMixin, scaled_for_data_parallel
from .guards import TrainingGuardsMixin
from .on_policy import COMPLETIONS_KEY, OnPolicyMixin, check_completion_room, check_on_policy_setup
from ..teacher import aligned_vocab_size, check_label_spaces, check_same_tokenizer
from ..teacher_signals import CachedTeacher, CrossTokenizerTeacher, OnlineTeacher, ServedTeacher
from ..teacher_signals.cross_tokenizer import TEACHER_INPUT_IDS
from ..teacher_signals.cached import open_cache, open_teacher_cache
from ..teacher_signals.multi import MultiTeacher, NamedTeacher
from ..teacher_signals.served import open_teacher_server

logger = logging.getLogger(__name__)

METRIC_KEYS = ("kd", "ce", "teacher_ce", "block", "tokens")


def divergence_from_config(config, *, scale_by_t2: bool = True):
    """The :class:`~llmkd.losses.Divergence` a config names: ``divergence`` at ``temperature``, with ``jsd_beta``,
    ``skew_alpha`` and ``divergence_kwargs`` (checked against the divergence's parameters)."""
    return get_divergence(config.divergence, temperature=config.temperature, beta=config.jsd_beta,
                          alpha=config.skew_alpha, scale_by_t2=scale_by_t2, **(config.divergence_kwargs or {}))


class DistillTrainer(OnPolicyMixin, TrainingGuardsMixin, LlmkdTrainerMixin, Trainer):
    """Distil ``teacher_model`` into ``model`` with a divergence of docs/ALGORITHMS.md section 0.

    Args:
        model: the student, a ``PreTrainedModel`` or a name/path (loaded with ``args.student_dtype``).
        teacher_model: the teacher, a ``PreTrainedModel`` or a name/path (loaded frozen with ``args.teacher_dtype``
            and, if asked, 4/8-bit quantization). Defaults to ``args.teacher_model_name_or_path``. With several
            teachers (``args.teachers``), a ``{name: model}`` dict of those given as objects.
        args: a :class:`~llmkd.DistillConfig` (or a subclass for the method trainers).
        train_dataset / eval_dataset: datasets in a TRL layout ("messages", "prompt"/"completion", "text", or
            pre-tokenized "input_ids"[/"labels"]); loaded from ``args.dataset_name`` when omitted.
        processing_class: the student's tokenizer or processor (loaded from the student's path when omitted).
        teacher_processing_class: the teacher's tokenizer, to check it equals the student's.
        peft_config: a peft config; the student is then wrapped with ``get_peft_model`` (LoRA student).
    """

    _tag_names = ["llmkd", "distillation"]
    config_class = DistillConfig
    #: whether ``on_policy_objective="sampled_token"`` may replace this trainer's token loss on student samples
    supports_sampled_token_objective = True

    def __init__(
        self,
        model: PreTrainedModel | str | None = None,
        teacher_model: PreTrainedModel | str | None = None,
        args: DistillConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        teacher_processing_class=None,
        peft_config=None,
        callbacks=None,
        optimizers=(None, None),
        **kwargs: Any,
    ):
        if args is None:
            args = self.config_class(output_dir="llmkd_output")
        if not isinstance(args, DistillConfig):
            raise TypeError(f"args must be a DistillConfig (or a method's config), got {type(args).__name__}.")
        if train_dataset is None and eval_dataset is None and args.dataset_name:
            # the data first: a missing or empty file is reported before the models are loaded
            train_dataset, eval_dataset = load_dataset_splits(args)
        self.task = self._resolve_task(model, args)
        model, processing_class = self._student(model, args, processing_class, self.task)
        tokenizer = tokenizer_of(processing_class)
        self.teacher_signal, teacher_model = self._teacher_signal(model, teacher_model, tokenizer,
                                                                  teacher_processing_class, args)
        self.vocab_size = self.teacher_signal.vocab_size

        if peft_config is None and args.use_peft:
            peft_config = self._lora_config(args)
        if peft_config is not None:
            model = self._apply_peft(model, peft_config, args)

        train_dataset = self._prepare(train_dataset, tokenizer, args, "train")
        eval_dataset = self._prepare(eval_dataset, tokenizer, args, "eval")
        # a teacher with another tokenizer checks its own tokenization's lengths (prepare_dataset)
        length_checked = {"student": model, "teacher": None if args.cross_tokenizer_loss else teacher_model}
        for split, prepared in (("train", train_dataset), ("eval", eval_dataset)):
            check_sequence_lengths(prepared, args.max_length, length_checked, split)
        if args.samples_completions:
            check_completion_room(train_dataset, args.max_completion_length, {"student": model,
                                                                              "teacher": teacher_model})
        train_dataset = self.teacher_signal.prepare_dataset(train_dataset, tokenizer, "train")
        eval_dataset = self.teacher_signal.prepare_dataset(eval_dataset, tokenizer, "eval")
        if data_collator is None:
            data_collator = (DataCollatorWithPadding(tokenizer) if self.is_classification
                             else DistillDataCollator(pad_token_id=self._pad_token_id(tokenizer),
                                                      padded_columns=self.teacher_signal.padded_columns(),
                                                      # prefetching needs the batches built in this process
                                                      on_batch=None if args.dataloader_num_workers else
                                                      self.teacher_signal.prefetch))

        if not self.is_classification:
            self.student_transform = logit_transform_for(model)
            if args.use_chunked_loss and args.verify_logit_head:
                self._verify_heads(model, teacher_model, train_dataset)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            compute_metrics=kwargs.pop("compute_metrics", None) or (
                classification_accuracy if self.is_classification else None),
            **kwargs,
        )
        # Our loss is always divided by the step's global token count: let the Trainer count it and not rescale.
        self.model_accepts_loss_kwargs = True
        self.teacher_signal.place(self.accelerator, is_deepspeed=self.is_deepspeed_enabled,
                                  is_fsdp=self.is_fsdp_enabled)
        self.teacher = self.teacher_signal.model  # the prepared teacher model (None with a cache)
        self.divergence = divergence_from_config(args)
        self._metric_sums = {True: defaultdict(float), False: defaultdict(float)}
        self.setup_on_policy()

    # ------------------------------------------------------------------------------------------------ set-up
    @property
    def is_classification(self) -> bool:
        return self.task == "sequence_classification"

    def _teacher_signal(self, student, teacher_model, tokenizer, teacher_processing_class, args: DistillConfig):
        """``(the run's teacher signal, the local teacher model or None)``: several teachers (``teachers``), a
        teacher cache, a served teacher, a teacher with another tokenizer, or a local teacher model."""
        self.teacher_cache = None
        if args.teachers:
            check_on_policy_setup(args, task=self.task, teacher_cache=None,
                                  sampled_token_allowed=self.supports_sampled_token_objective)
            return self._several_teachers(student, teacher_model, tokenizer, args), None
        model = student  # the name below
        self.teacher_cache = open_teacher_cache(args, teacher_model, self.task)
        teacher_server = open_teacher_server(args, teacher_model, self.teacher_cache, self.task)
        check_on_policy_setup(args, task=self.task, teacher_cache=self.teacher_cache,
                              sampled_token_allowed=self.supports_sampled_token_objective)
        if self.teacher_cache is None and teacher_server is None:
            teacher_model, teacher_processing_class = self._teacher(
                teacher_model, args, teacher_processing_class, self.task
            )
        if args.cross_tokenizer_loss is not None and not self.is_classification:
            if (self.teacher_cache is not None or teacher_server is not None) and teacher_processing_class is None:
                teacher_processing_class = offline_teacher_tokenizer(args)
            signal = self._cross_tokenizer_teacher(model, teacher_model, tokenizer, teacher_processing_class, args,
                                                   server=teacher_server)
        elif self.teacher_cache is not None:
            signal = CachedTeacher(self.teacher_cache, model, tokenizer)
        elif teacher_server is not None:
            signal = self._served_teacher(teacher_server, model, tokenizer, args)
        elif self.is_classification:
            check_same_tokenizer(tokenizer, teacher_processing_class)
            self.num_labels = check_label_spaces(model, teacher_model)
            self._models_take_token_type_ids = all(
                "token_type_ids" in inspect.signature(unwrap_model(m).forward).parameters
                for m in (model, teacher_model)
            )
            signal = OnlineTeacher(teacher_model, None)
        else:
            signal = OnlineTeacher(teacher_model, aligned_vocab_size(model, teacher_model, tokenizer,
                                                                     teacher_processing_class))
        return signal, teacher_model

    @staticmethod
    def _served_teacher(server, student, tokenizer, args: DistillConfig) -> ServedTeacher:
        sampled_token = args.samples_completions and args.on_policy_objective == "sampled_token"
        if args.teacher_server_top_k == 0 and (args.lmbda < 1.0 or args.off_policy_steps > 0):
            raise ValueError("teacher_server_top_k=0 gives the sampled tokens' log-probabilities only, which only "
                             "student-sampled batches can use: set lmbda: 1.0 and off_policy_steps: 0 (with "
                             "on_policy_objective: sampled_token), or teacher_server_top_k >= 1.")
        return ServedTeacher(server, student, tokenizer, top_k=args.teacher_server_top_k,
                             temperature=args.temperature, sampled_token=sampled_token)

    def _several_teachers(self, student, teacher_models, tokenizer, args: DistillConfig) -> MultiTeacher:
        """The :class:`~llmkd.teacher_signals.MultiTeacher` of ``args.teachers`` (models given to the trainer as
        ``teacher_model={name: model}``)."""
        if self.is_classification:
            raise ValueError("Several teachers distil token distributions of causal LMs; give a sequence classifier "
                             "one teacher.")
        if args.cross_tokenizer_loss is not None:
            raise ValueError("Several teachers with another tokenizer than the student's are not supported yet: "
                             "distil from one of them at a time (cross_tokenizer_loss).")
        if args.seq_kd:
            raise ValueError("seq_kd samples completions from the teacher; with several teachers use lmbda (student "
                             "samples, scored by each row's teacher) or the dataset's completions.")
        cached = [entry["name"] for entry in args.teachers if entry.get("teacher_cache")]
        if cached and args.samples_completions:
            raise ValueError(f"lmbda > 0 scores completions sampled during training, which the caches of teachers "
                             f"{cached} do not hold: run those teachers live (model_name_or_path or "
                             "teacher_server), or set lmbda: 0.")
        if teacher_models is not None and not isinstance(teacher_models, dict):
            raise ValueError("With teachers in the config, pass teacher models as teacher_model={name: model}.")
        given = dict(teacher_models or {})
        unknown = sorted(set(given) - {entry["name"] for entry in args.teachers})
        if unknown:
            raise ValueError(f"teacher_model names {unknown}, which teachers does not list.")
        teachers = []
        for entry in args.teachers:
            name = entry["name"]
            if name in given or entry.get("model_name_or_path"):
                teacher, teacher_tokenizer = self._teacher(given.get(name, entry.get("model_name_or_path")), args,
                                                           None, self.task)
                signal = OnlineTeacher(teacher, aligned_vocab_size(student, teacher, tokenizer, teacher_tokenizer))
            elif entry.get("teacher_cache"):
                signal = CachedTeacher(open_cache(entry["teacher_cache"], args.temperature), student, tokenizer)
            elif entry.get("teacher_server"):
                from ..teacher_server import TeacherServer

                server = TeacherServer.from_config(args, url=entry["teacher_server"],
                                                   model=entry.get("teacher_server_model"),
                                                   api=entry.get("teacher_server_api"))
                signal = self._served_teacher(server, student, tokenizer, args)
            else:
                raise ValueError(f"Teacher {name!r} has no source: give model_name_or_path, teacher_cache or "
                                 f"teacher_server in its entry, or pass teacher_model={{{name!r}: model}}.")
            teachers.append(NamedTeacher(name, signal, float(entry.get("weight", 1.0))))
        return MultiTeacher(teachers, args.teacher_routing_column)

    @staticmethod
    def _resolve_task(model, args: DistillConfig) -> str:
        if args.task != "auto":
            return args.task
        model = model if model is not None else args.model_name_or_path
        return detect_task(model, revision=args.model_revision, trust_remote_code=args.trust_remote_code)

    @staticmethod
    def _student(model, args: DistillConfig, processing_class, task: str = "causal_lm"):
        """The student and its processing class (:func:`llmkd.loading.load_student`); a hook method trainers
        extend (MoE upcycling)."""
        return load_student(model, args, processing_class, task)

    @staticmethod
    def _teacher(teacher, args: DistillConfig, teacher_processing_class, task: str = "causal_lm"):
        """The teacher and its tokenizer (:func:`llmkd.loading.load_teacher`)."""
        return load_teacher(teacher, args, teacher_processing_class, task)

    #: the cross-tokenizer losses this trainer's loss can become (docs/CROSS_TOKENIZER.md)
    cross_tokenizer_losses: tuple[str, ...] = ("uld", "hybrid", "span")

    def _cross_tokenizer_teacher(self, student, teacher, tokenizer, teacher_tokenizer, args: DistillConfig,
                                 server=None):
        """The :class:`~llmkd.teacher_signals.CrossTokenizerTeacher` of ``cross_tokenizer_loss`` (from the teacher
        model, the run's teacher cache, or ``server``), after checking this run can use it."""
        name = type(self).__name__
        if args.cross_tokenizer_loss not in self.cross_tokenizer_losses:
            allowed = " or ".join(self.cross_tokenizer_losses) or "none"
            raise ValueError(f"{name} cannot distil across tokenizers with cross_tokenizer_loss="
                             f"{args.cross_tokenizer_loss!r}: its loss works with {allowed}.")
        if teacher_tokenizer is None:
            raise ValueError("Cross-tokenizer distillation needs the teacher's tokenizer: pass "
                             "teacher_processing_class=, or give the teacher by name/path so it is loaded with it.")
        if args.seq_kd:
            raise ValueError("seq_kd samples completions from the teacher in its own tokens, which the student cannot "
                             "train on directly: with a teacher of another tokenizer use lmbda (student samples, "
                             "re-tokenized for the teacher) or the dataset's completions.")
        if args.samples_completions and args.on_policy_objective == "sampled_token":
            raise ValueError("on_policy_objective='sampled_token' needs the teacher's log-probability of the "
                             "student's own tokens, which a teacher with another tokenizer does not have: use "
                             "on_policy_objective='divergence' (the cross-tokenizer loss on the samples).")
        return CrossTokenizerTeacher(teacher, student, tokenizer, teacher_tokenizer, loss=args.cross_tokenizer_loss,
                                     top_k=args.cross_tokenizer_top_k, temperature=args.temperature,
                                     shared_weight=args.hybrid_shared_weight, rest_weight=args.hybrid_rest_weight,
                                     cache=self.teacher_cache, num_proc=args.dataset_num_proc, server=server,
                                     server_top_k=args.teacher_server_top_k)

    def _lora_config(self, args: DistillConfig):
        return lora_config_from_args(args, "SEQ_CLS" if self.is_classification else "CAUSAL_LM")

    @staticmethod
    def _apply_peft(model, peft_config, args):
        from peft import get_peft_model

        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        return get_peft_model(model, peft_config)

    @staticmethod
    def _pad_token_id(tokenizer) -> int:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token: set tokenizer.pad_token first.")
        return pad

    def _prepare(self, dataset, tokenizer, args: DistillConfig, split: str):
        if dataset is None:
            return None
        if self.is_classification:
            prepared = prepare_classification_dataset(dataset, tokenizer, max_length=args.max_length,
                                                      num_labels=self.num_labels, num_proc=args.dataset_num_proc)
            if "token_type_ids" in prepared.column_names and not self._models_take_token_type_ids:
                prepared = prepared.remove_columns("token_type_ids")  # e.g. a Llama classifier has no segments
            return prepared
        columns = getattr(dataset, "column_names", None) or (list(dataset[0].keys()) if len(dataset) else [])
        return prepare_dataset(
            dataset, tokenizer, max_length=args.max_length, completion_only_loss=args.completion_only_loss,
            num_proc=args.dataset_num_proc,
            # images, and the column naming each row's teacher (several teachers, routed)
            extra_columns=tuple(c for c in (*IMAGE_FIELDS, args.teacher_routing_column) if c and c in columns),
            with_prompt_length=split == "train" and args.samples_completions,  # the prompts on-policy samples follow
        )

    def _verify_heads(self, model, teacher, dataset) -> None:
        """Check once, on a few real tokens, that the chunked path reproduces both models' logits."""
        ids = {"student": [0, 1, 2, 3], "teacher": [0, 1, 2, 3]}
        if dataset is not None and len(dataset) > 0:
            ids["student"] = list(dataset[0]["input_ids"])[:8]
            ids["teacher"] = list(dataset[0].get(TEACHER_INPUT_IDS, ids["student"]))[:8]
        for role, m in (("student", model), ("teacher", teacher)):
            if m is None or any(hasattr(p, "ds_id") for p in m.parameters()):
                continue  # already partitioned: cannot run a plain forward here
            device = next(m.parameters()).device
            try:
                verify_head_reproduction(m, torch.tensor([ids[role]], device=device))
            except Exception as error:  # noqa: BLE001 - re-raised with the role
                raise type(error)(f"[{role}] {error}") from error

    # -------------------------------------------------------------------------------------- method hooks
    def token_loss_fn(self):
        """The token loss ``(student_logits (n, V), teacher_logits (n, V)) -> (n,)`` of this step."""
        return self.divergence

    def loss_weights(self) -> tuple[float, float]:
        """(weight of the token loss, weight of the student's CE)."""
        return self.args.kd_ratio, 1.0 - self.args.kd_ratio

    def block_loss_fn(self):
        """``(block_loss, weight)`` or None (default). ``block_loss(student_logits (n, V), teacher_logits (n, V))``
        returns a scalar over the n points of one block (tokens of a range of :meth:`blocks`, or the examples
        of a classifier's micro-batch); the sum over blocks, times ``weight``, is divided by the step's point count
        like the token terms."""
        return None

    #: the name the block loss's mean is logged under
    block_loss_name = "block_loss"

    def blocks(self, valid: torch.Tensor) -> list[tuple[int, int]] | None:
        """The ranges of the N valid tokens (``valid``: ``(B, S-1)`` bool, flattened row-major) that form the
        chunked engine's chunks and the block loss's blocks; None (default): chunks of ``loss_chunk_size``."""
        return None

    def extra_loss(self, model, student_outputs, inputs, normalizer) -> torch.Tensor | None:
        """An extra loss added to the micro-batch's distillation loss (e.g. an MoE load-balancing loss), already
        weighted for the step: the distillation loss is a sum over the micro-batch's points divided by
        ``normalizer``, the step's global point count. None by default."""
        return None

    # ------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.completions_source = inputs.pop(COMPLETIONS_KEY, "dataset")  # set by get_batch_samples
        record: dict[str, Any] = {}
        if self.is_classification:
            outputs, loss = self._classification_loss(model, inputs, num_items_in_batch, record)
        else:
            outputs, loss = self._language_model_loss(model, inputs, num_items_in_batch, record)
        extra = self.extra_loss(model, outputs, inputs, num_items_in_batch)
        if extra is not None:
            loss = loss + extra
        self._accumulate_metrics(record, model.training)

        loss = scaled_for_data_parallel(loss, self.args, self.accelerator, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def objective(self) -> DistillationObjective:
        """This step's :class:`~llmkd.losses.DistillationObjective`, from the method hooks."""
        block = self.block_loss_fn()
        block_loss, block_weight = block if block is not None else (None, 0.0)
        objective = DistillationObjective(self.token_loss_fn(), *self.loss_weights(), block_loss, block_weight)
        return self.objective_for_completions(self.teacher_signal.objective(objective))

    def _language_model_loss(self, model, inputs, num_items_in_batch, record):
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        shift_labels = labels[:, 1:]
        valid = shift_labels != IGNORE_INDEX  # (B, S-1)
        target_ids = shift_labels[valid]  # (N,)
        normalizer = num_items_in_batch if num_items_in_batch is not None else valid.sum()
        dense = not self.args.use_chunked_loss
        teacher = self.teacher_signal.token_targets(model_inputs, valid, dense=dense)  # the teacher runs here
        objective, blocks = self.objective(), self.blocks(valid)
        if dense:
            return self._dense_student_loss(model, model_inputs, valid, target_ids, teacher, objective, blocks,
                                            normalizer, record)
        return self._chunked_student_loss(model, model_inputs, valid, target_ids, teacher, objective, blocks,
                                          normalizer, record)

    def _classification_loss(self, model, inputs, num_items_in_batch, record):
        """Per-example distillation of a sequence classifier: logits ``(B, C)``, labels ``(B,)``."""
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        teacher_logits = self.teacher_signal.example_logits(model_inputs)  # (B, C)
        outputs = model(**model_inputs)
        student_logits = outputs.logits.float()  # (B, C)
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                             f"{tuple(teacher_logits.shape)} differ in shape.")
        normalizer = num_items_in_batch if num_items_in_batch is not None else labels.numel()
        result = distillation_loss_from_logits(student_logits, DenseTargets(teacher_logits), labels, self.objective(),
                                               normalizer=normalizer)
        self._record(record, result)
        return outputs, result.loss

    def _chunked_student_loss(self, model, model_inputs, valid, target_ids, teacher, objective, blocks, normalizer,
                              record):
        head = output_head(model)

        def distill_head(hidden_states: torch.Tensor) -> torch.Tensor:
            student_hidden = hidden_states[:, :-1][valid]  # (N, H_s)
            student_head = OutputHead(head.weight, getattr(head, "bias", None), self.student_transform)

            def engine(x, targets, labels, objective, **kwargs):
                return chunked_loss(x, student_head, targets, labels, objective, **kwargs)

            with teacher as targets:  # a sharded teacher head stays gathered while the engine runs
                result = self._engine_loss(engine, student_hidden, targets, target_ids, objective, blocks,
                                           normalizer, record, chunk_size=self.args.loss_chunk_size,
                                           vocab_size=self.vocab_size)
            record["result"] = result
            return result.loss

        with intercept_head(model, distill_head):
            outputs = model(**model_inputs)
        loss = outputs.logits  # the loss, as returned through the head (so ZeRO-3's backward hooks fire)
        result = record.pop("result")
        # exact equality, NaN included: a NaN loss is reported by the non-finite check, not as a changed head
        if loss.numel() != 1 or not torch.allclose(loss.detach().reshape(()), result.loss.detach(), rtol=0.0,
                                                   atol=0.0, equal_nan=True):
            raise RuntimeError(
                f"{type(model).__name__} changed the output of its head after the head ran; llmkd's chunked path "
                "cannot reproduce that. Set use_chunked_loss=False."
            )
        self._record(record, result)
        return outputs, loss.reshape(())

    def _dense_student_loss(self, model, model_inputs, valid, target_ids, teacher, objective, blocks, normalizer,
                            record):
        outputs = model(**model_inputs)
        student_logits = outputs.logits[:, :-1][valid][:, : self.vocab_size].float()  # (N, V)
        with teacher as targets:
            result = self._engine_loss(distillation_loss_from_logits, student_logits, targets, target_ids, objective,
                                       blocks, normalizer, record)
        self._record(record, result)
        return outputs, result.loss

    @staticmethod
    def _engine_loss(loss_fn, student, targets, target_ids, objective, blocks, normalizer, record, **kwargs):
        """``loss_fn``'s output for one teacher's targets, or, for several teachers (a list of
        :class:`~llmkd.losses.TargetGroup`), the sum over their groups (:func:`~llmkd.losses.grouped_loss`), with
        each teacher's token loss sum and token count kept in ``record["teachers"]``."""
        if not isinstance(targets, list):
            return loss_fn(student, targets, target_ids, objective, normalizer=normalizer, blocks=blocks, **kwargs)
        if blocks is not None:
            raise ValueError("This trainer cuts the tokens into blocks of its own, which several teachers would "
                             "split: distil from one teacher with it.")
        result, outputs = grouped_loss(loss_fn, student, targets, target_ids, objective, normalizer=normalizer,
                                       **kwargs)
        record["teachers"] = {name: (output.kd_sum, float(output.num_tokens)) for name, output in outputs.items()}
        return result

    @staticmethod
    def _record(record, result) -> None:
        record.update(kd=result.kd_sum, ce=result.ce_sum, teacher_ce=result.teacher_ce_sum, block=result.block_sum,
                      tokens=float(result.num_tokens), target_entropy=result.target_entropy_sum)

    # ---------------------------------------------------------------------------------------------- logging
    def _accumulate_metrics(self, record, training: bool) -> None:
        # kept as device tensors: no host synchronisation per micro-batch
        sums = self._metric_sums[training]
        values = {key: record[key] for key in METRIC_KEYS}
        for name, (kd, tokens) in record.get("teachers", {}).items():  # every teacher, every micro-batch
            values[f"kd/{name}"], values[f"tokens/{name}"] = kd, tokens
        for key, value in values.items():
            value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
            sums[key] = sums[key] + value

    def _reduced_metrics(self, training: bool) -> dict[str, float]:
        sums = self._metric_sums[training]
        if not sums:
            return {}
        keys = list(METRIC_KEYS) + sorted(k for k in sums if k not in METRIC_KEYS)  # the same order on every rank
        totals = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64).to(self.accelerator.device)
                              for k in keys])
        totals = self.accelerator.reduce(totals, reduction="sum") if self.accelerator.num_processes > 1 else totals
        sums.clear()
        reduced = dict(zip(keys, totals.tolist()))
        means = {k: reduced[k] / max(reduced["tokens"], 1.0) for k in METRIC_KEYS}
        metrics = {"kd_loss": means["kd"], "ce_loss": means["ce"], "teacher_ce_loss": means["teacher_ce"]}
        for key in keys:  # several teachers: each one's token loss over its own tokens, and its token count
            if key.startswith("kd/"):
                name = key[3:]
                metrics[f"kd_loss/{name}"] = reduced[key] / max(reduced[f"tokens/{name}"], 1.0)
                metrics[f"tokens/{name}"] = reduced[f"tokens/{name}"]
        if self.block_loss_fn() is not None:
            metrics[self.block_loss_name] = means["block"]
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        training = not any(key.startswith("eval_") for key in logs)
        prefix = "" if training else "eval_"
        # in place, so that Trainer.evaluate() returns the distillation metrics too
        for key, value in self._reduced_metrics(training).items():
            logs[prefix + key] = round(value, 6)
        if training:
            logs.update(self.on_policy_logs())
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The distillation loss; for classifiers also the student's (B, C) logits and the labels, so that
        ``compute_metrics`` (accuracy by default) sees predictions. LM evaluation is loss-only (no (N x V) logits
        are kept; use llmkd's lm-eval integration for generation benchmarks)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if self.is_classification and not prediction_loss_only:
            return loss.detach(), outputs.logits.detach(), inputs["labels"]
        return loss.detach(), None, None


def offline_teacher_tokenizer(args):
    """The teacher's tokenizer of a cross-tokenizer run from a teacher cache or a teacher server (no teacher model
    is loaded)."""
    if not args.teacher_model_name_or_path:
        raise ValueError("A cross-tokenizer run from teacher_cache or teacher_server needs the teacher's tokenizer: "
                         "pass teacher_processing_class=, or set teacher_model_name_or_path (only its tokenizer is "
                         "loaded).")
    from ..loading import teacher_processing_class

    return tokenizer_of(teacher_processing_class(args))


def lora_config_from_args(args, task_type: str = "CAUSAL_LM"):
    """The peft ``LoraConfig`` a config's ``lora_*`` fields describe (all linear layers but the head by default).
    For ``SEQ_CLS`` peft trains a classifier's new head in full next to the adapters."""
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_target_modules or "all-linear", task_type=task_type)


def classification_accuracy(prediction: EvalPrediction) -> dict[str, float]:
    """The default ``compute_metrics`` of classifiers: accuracy of the argmax of the student's logits."""
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())}
