"""DHO: Dual-Head Optimization, semi-supervised distillation of a vision-language teacher into a compact image
classifier (arXiv 2505.07675; docs/ALGORITHMS.md section 4).

Each step draws a labeled batch ``(x_l, y)`` and an unlabeled batch ``x_u`` of the same size (one
:class:`~llmkd.data.images.PairedDataset` item holds one of each) and minimises

    L = lam * CE(h_ce(z_l), y) + (1 - lam) * T^2 * [KL(p_t(x_l) || q_kd(x_l)) + KL(p_t(x_u) || q_kd(x_u))]

with ``p_t`` and ``q_kd`` softened by ``T`` (2), ``lam = ce_weight`` (0.5): the CE head never sees unlabeled data,
the KD head sees both. Each term is a mean over its examples of the optimizer step (the sums are divided by the
step's global labeled count, which equals its unlabeled count), so gradient accumulation and data parallelism give
the gradient of one large batch.

At each evaluation on the trainer's ``eval_dataset`` (the VALIDATION split), ``alpha`` and ``beta`` of the
inference rule ``p = alpha softmax(h_ce) + (1 - alpha) softmax(h_kd / beta)`` are grid-searched on its predictions
and stored in the model's config, so the checkpoint saved after that evaluation carries them; at the end of
training with ``load_best_model_at_end`` the best checkpoint's ``alpha``/``beta`` are restored with its weights.
``trainer.evaluate(test_set, metric_key_prefix="test")`` never searches: it scores the stored weights.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from ..data.images import (
    ImageTransform,
    PairedDataset,
    WithTeacherLogits,
    check_labels,
    compute_teacher_logits,
    data_seed,
    hold_out_validation,
    parse_amount,
    row_labels,
    split_labeled_unlabeled,
)
from ..config import RunOutputFields
from ..data.sources import load_dataset_splits
from ..heads import unwrap_model
from ..losses.dho import DHOLoss, dho_loss
from ..models.dho_loading import load_dho_student, load_dho_teacher, resolve_class_names
from ..models.dual_head import (
    DEFAULT_ALPHA_GRID,
    DEFAULT_BETA_GRID,
    combine_head_predictions,
    search_inference_weights,
)
from ..teacher import prepare_teacher
from .shared import LlmkdTrainerMixin, method_config, scaled_for_data_parallel
from .guards import TrainingGuardsMixin, last_complete_checkpoint

logger = logging.getLogger(__name__)
TEACHER_TYPES = ("auto", "clip", "classifier")  # see llmkd.models.dho_loading.load_dho_teacher


@dataclass
class DHOConfig(RunOutputFields, TrainingArguments):
    r"""Configuration for :class:`DHOTrainer`. Every ``TrainingArguments`` field works; ``per_device_train_batch_size``
    is the size of the labeled batch AND of the unlabeled batch of a step. Defaults that differ from
    TrainingArguments: ``remove_unused_columns=False`` (images are processed on the fly), ``logging_steps=10``,
    ``metric_for_best_model="accuracy"`` (the validation accuracy at the searched alpha/beta).

    Parameters that name the student:
        model_name_or_path: a saved :class:`~llmkd.DualHeadModel`, or any transformers vision model (a CLIP
            checkpoint gives its vision tower; ResNet, ViT, MobileNetV2, ConvNeXt, ...) that becomes the backbone of
            a new dual-head student (pretrained weights, or fresh ones with ``init_student_from_config``).
        init_student_from_config: build the backbone from its config with fresh weights (seeded by ``seed``).
        student_feature_pooling: how backbone outputs become features (``auto``, ``pooler``, ``cls``, ``mean``).
        trust_remote_code: allow custom model code (False).

    Parameters that control the teacher:
        teacher_model_name_or_path: a ``CLIPModel`` checkpoint (a zero-shot classifier is built from class names
            and templates) or any image classifier over the same classes.
        teacher_type: ``auto`` (CLIP checkpoints are zero-shot classifiers), ``clip`` or ``classifier``.
        class_names / class_names_file: one name per label id (a file: one per line); default: the names of the
            dataset's ``ClassLabel`` label column.
        prompt_templates: CLIP prompt templates with one ``{}`` each (default ``["a photo of a {}."]``).
        teacher_logit_scale: the zero-shot logit scale (100, the paper's; 0 = the checkpoint's own).
        teacher_dtype: ``float32`` (default), ``bfloat16``, ``float16`` or ``auto``.
        precompute_teacher_logits: run the teacher once over the labeled and unlabeled rows before training (True);
            False runs it on every batch. Rows that already hold ``teacher_logits`` never need a teacher.
        teacher_batch_size: batch size of that pass (64; images decoded by ``dataloader_num_workers`` workers).
        The teacher's image processor comes from its checkpoint (or ``teacher_processing_class=``); without one the
        teacher sees the student's pixels.

    Parameters that control the data:
        dataset_name / dataset_config / dataset_train_split / dataset_eval_split: as in every llmkd recipe; the
            eval split is the VALIDATION split the inference weights are searched on (never give the test split).
        validation_size: without an eval split, hold this many (count or percentage, stratified) train rows out as
            the validation split; they are neither labeled nor unlabeled training data.
        image_column / label_column: the columns holding images and class ids (``-1``/None = unlabeled row).
        labeled: how many labeled train rows to keep labels for: a count (``"128"``) or a percentage of the
            labeled train rows (``"1%"``), sampled per class as evenly as possible (seeded by ``data_seed`` or
            ``seed``); the other rows become unlabeled.

    Parameters of the end of the run (as in every llmkd config): eval_tasks (e.g. ``llmkd_digits``), eval_limit,
    eval_teacher, report, hub_endpoint.

    Parameters that control the loss and the inference weights:
        ce_weight: ``lam`` (0.5). temperature: ``T`` (2.0).
        separate_forwards: run the student twice per step, once on the labeled batch and once on the unlabeled
            batch, instead of once on both concatenated (False). The loss is the same formula; only BatchNorm
            backbones (ResNet, MobileNetV2) notice: with one forward every BatchNorm layer normalises the 2B
            labeled and unlabeled images together and updates its running statistics once per step; with two, each
            batch is normalised with its own statistics and the running statistics are updated twice per step (the
            unlabeled batch last). The default follows the official ImageNet scripts (``train_imgnet.py``,
            ``train_imgnet_semi*.py``), which produced the paper's main results; turn it on to match the official
            few-shot script for the other datasets (``train_others.py``, ResNet-18 / MobileNetV2 students). Without
            BatchNorm (ViT, CLIP vision towers, ConvNeXt) both give the same loss and gradients, and one forward is
            cheaper.
        single_head: the single-head CE+KD baseline: both terms train the CE head, the KD head is unused and the
            prediction is the CE head's (alpha = 1).
        search_inference_weights: grid-search alpha/beta at each evaluation on the validation split (True).
        alpha_grid / beta_grid: the grids (default: alpha 0..1 step 0.05; beta 0.5, 0.75, 1, 1.25, 1.5, 2, 4).
    """

    # student
    model_name_or_path: str | None = field(default=None, metadata={"help": "The student or its vision backbone."})
    init_student_from_config: bool = field(default=False, metadata={"help": "Fresh backbone weights."})
    student_feature_pooling: str = field(default="auto", metadata={"help": "auto, pooler, cls or mean."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code (off by default)."})
    # teacher
    teacher_model_name_or_path: str | None = field(default=None, metadata={"help": "CLIP checkpoint or classifier."})
    teacher_type: str = field(default="auto", metadata={"help": f"One of {TEACHER_TYPES}."})
    class_names: list[str] | None = field(default=None, metadata={"help": "One class name per label id."})
    class_names_file: str | None = field(default=None, metadata={"help": "A file with one class name per line."})
    prompt_templates: list[str] | None = field(default=None, metadata={"help": "CLIP prompt templates with {}."})
    teacher_logit_scale: float = field(default=100.0, metadata={"help": "Zero-shot logit scale (0: the model's)."})
    teacher_dtype: str = field(default="float32", metadata={"help": "Teacher dtype."})
    precompute_teacher_logits: bool = field(default=True, metadata={"help": "Run the teacher once before training."})
    teacher_batch_size: int = field(default=64, metadata={"help": "Batch size of the teacher pass."})
    # data
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset: local file/folder or Hub name."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(default=None, metadata={"help": "Validation split (alpha/beta search)."})
    validation_size: str | None = field(default=None, metadata={"help": "Train rows held out as validation."})
    image_column: str = field(default="image", metadata={"help": "Image column."})
    label_column: str = field(default="label", metadata={"help": "Label column."})
    labeled: str = field(default="1%", metadata={"help": "Labeled train rows: a count or a percentage."})
    # loss and inference weights
    ce_weight: float = field(default=0.5, metadata={"help": "lam: weight of the CE term; KD gets 1 - lam."})
    temperature: float = field(default=2.0, metadata={"help": "KD temperature T (loss scaled by T^2)."})
    single_head: bool = field(default=False, metadata={"help": "Single-head CE+KD baseline."})
    separate_forwards: bool = field(default=False, metadata={
        "help": "One student forward per batch (labeled, then unlabeled; BatchNorm statistics per batch, as the "
                "official train_others.py) instead of one over both (as the official ImageNet scripts)."})
    search_inference_weights: bool = field(default=True, metadata={"help": "Search alpha/beta on validation."})
    alpha_grid: list[float] | None = field(default=None, metadata={"help": "alpha grid (default 0..1 step .05)."})
    beta_grid: list[float] | None = field(default=None, metadata={"help": "beta grid."})
    # TrainingArguments defaults changed for DHO
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the image columns."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    metric_for_best_model: str | None = field(default="accuracy", metadata={"help": "Best-checkpoint metric."})

    def __post_init__(self):
        self.adapt_to_launcher()
        super().__post_init__()
        self.check_run_outputs()
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False for DHO: images are turned into pixel_values on the "
                             "fly, so the image and label columns must reach the transform.")
        if self.teacher_type not in TEACHER_TYPES:
            raise ValueError(f"teacher_type={self.teacher_type!r} is not one of {TEACHER_TYPES}.")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight (lam) must be in [0, 1], got {self.ce_weight}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.teacher_logit_scale < 0:
            raise ValueError(f"teacher_logit_scale must be >= 0 (0 = the checkpoint's own), got "
                             f"{self.teacher_logit_scale}.")
        parse_amount(self.labeled, 10**12, "labeled")  # the format; the size is checked against the data
        if self.validation_size is not None:
            parse_amount(self.validation_size, 10**12, "validation_size")
        for name, grid in (("alpha_grid", self.alpha_grid), ("beta_grid", self.beta_grid)):
            if grid is not None and not grid:
                raise ValueError(f"{name} must not be empty.")
        if self.alpha_grid and not all(0.0 <= a <= 1.0 for a in self.alpha_grid):
            raise ValueError(f"alpha_grid values must be in [0, 1], got {self.alpha_grid}.")
        if self.beta_grid and not all(b > 0 for b in self.beta_grid):
            raise ValueError(f"beta_grid values must be > 0, got {self.beta_grid}.")


class DHOTrainer(TrainingGuardsMixin, LlmkdTrainerMixin, Trainer):
    """Train a :class:`~llmkd.DualHeadModel` with DHO (see the module docstring).

    Args:
        model: a ``DualHeadModel``, or a name/path (a saved dual-head model, or a vision backbone).
        teacher_model: a ``CLIPModel`` (with ``teacher_processing_class`` a ``CLIPProcessor``), a
            :class:`~llmkd.models.clip_teacher.CLIPZeroShotClassifier`, any image classifier, or a name/path. Not
            needed when the rows carry ``teacher_logits``.
        args: a :class:`DHOConfig`.
        train_dataset: image rows (``image_column``, ``label_column``); ``args.labeled`` of them keep their labels.
        eval_dataset: the VALIDATION split (alpha/beta are searched on it).
        unlabeled_dataset: extra unlabeled image rows.
        processing_class: the student's image processor; teacher_processing_class: the teacher's.
        class_names: one name per class id (overrides ``args.class_names``).
    """

    _tag_names = ["llmkd", "distillation", "dho"]

    def __init__(self, model=None, teacher_model=None, args: DHOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, unlabeled_dataset=None, processing_class=None,
                 teacher_processing_class=None, class_names=None, callbacks=None, optimizers=(None, None),
                 **kwargs):
        args = method_config(args, DHOConfig, "DHOTrainer")
        if train_dataset is None and eval_dataset is None and args.dataset_name:
            train_dataset, eval_dataset = load_dataset_splits(args)
        if train_dataset is None:
            raise ValueError("DHO needs a train split of images: pass train_dataset=... or set dataset_name.")
        if eval_dataset is None and args.validation_size is not None:
            train_dataset, eval_dataset = hold_out_validation(train_dataset, args)

        class_names = resolve_class_names(class_names, args, train_dataset, model)
        model, processing_class = load_dho_student(model, args, processing_class, class_names)
        num_labels = model.config.num_labels
        if class_names is not None and len(class_names) != num_labels:
            raise ValueError(f"{len(class_names)} class names were given but the student has {num_labels} classes; "
                             "give exactly one name per label id, in label order.")
        self.class_names = class_names

        self._num_labels = num_labels
        self._image_transform = ImageTransform(processing_class, args.image_column, args.label_column)
        if isinstance(eval_dataset, dict):
            raise ValueError("DHO searches alpha/beta on ONE validation split: give a single eval_dataset (score other "
                             "splits afterwards with trainer.evaluate(split, metric_key_prefix=...)).")
        if eval_dataset is not None:
            eval_dataset = self.prepare_eval_dataset(eval_dataset, "validation")
        labeled, unlabeled = split_labeled_unlabeled(train_dataset, unlabeled_dataset, args, num_labels)

        has_logits = all("teacher_logits" in ds.column_names for ds in (labeled, unlabeled))
        teacher, logits = None, {}
        if not has_logits and not (args.ce_weight == 1.0):
            teacher, teacher_processing_class = load_dho_teacher(teacher_model, args, teacher_processing_class,
                                                              class_names)
            teacher_processing_class = teacher_processing_class or processing_class
            teacher_classes = getattr(teacher, "num_labels", None) or teacher.config.num_labels
            if teacher_classes != num_labels:
                raise ValueError(f"The teacher scores {teacher_classes} classes but the student has {num_labels}; "
                                 "both must classify into the same classes, in the same order.")
            if args.precompute_teacher_logits:
                logits = {name: self._teacher_pass(ds, teacher, teacher_processing_class, args, name)
                          for ds, name in ((labeled, "labeled"), (unlabeled, "unlabeled"))}
                teacher = None
        elif has_logits:
            for ds, name in ((labeled, "labeled"), (unlabeled, "unlabeled")):
                width = len(ds[0]["teacher_logits"]) if len(ds) else num_labels
                if width != num_labels:
                    raise ValueError(f"The {name} rows' teacher_logits have {width} classes but the student has "
                                     f"{num_labels}.")

        separate_teacher_pixels = teacher is not None and not _same_processor(teacher_processing_class,
                                                                              processing_class)
        teacher_pixels = teacher_processing_class if separate_teacher_pixels else None
        labeled = labeled.with_transform(ImageTransform(processing_class, args.image_column, args.label_column,
                                                        teacher_pixels))
        unlabeled = unlabeled.with_transform(ImageTransform(processing_class, args.image_column, "\0none",
                                                            teacher_pixels))
        if logits:
            labeled = WithTeacherLogits(labeled, logits["labeled"])
            unlabeled = WithTeacherLogits(unlabeled, logits["unlabeled"])
        self.labeled_dataset, self.unlabeled_dataset = labeled, unlabeled
        train_dataset = PairedDataset(labeled, unlabeled, seed=data_seed(args))

        super().__init__(
            model=model, args=args, data_collator=data_collator or default_data_collator,
            train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
            callbacks=callbacks, optimizers=optimizers,
            compute_metrics=kwargs.pop("compute_metrics", None) or self._accuracy_metrics, **kwargs,
        )
        # the loss divides by the step's global labeled count: let the Trainer count it and not rescale
        self.model_accepts_loss_kwargs = True
        self.teacher = None if teacher is None else prepare_teacher(
            teacher, self.accelerator, is_deepspeed=self.is_deepspeed_enabled, is_fsdp=self.is_fsdp_enabled)
        if args.single_head:
            unwrap_model(self.model).set_inference_weights(1.0, 1.0)
        self._search_on_this_evaluation = False
        self._loss_sums = defaultdict(float)

    # ------------------------------------------------------------------------------------------------ set-up
    @staticmethod
    def _teacher_pass(dataset, teacher, image_processor, args: DHOConfig, name: str) -> np.ndarray:
        """The teacher's ``(N, C)`` logits on ``dataset``, computed once."""
        teacher.to(args.device)
        return compute_teacher_logits(teacher, dataset, image_processor, image_column=args.image_column,
                                      batch_size=args.teacher_batch_size, num_workers=args.dataloader_num_workers,
                                      desc=f"teacher logits ({name})")

    def prepare_eval_dataset(self, dataset, split: str = "evaluation"):
        """Image rows -> rows with ``pixel_values`` and ``labels`` (labels checked), processed on the fly."""
        if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") != "custom":
            check_labels(row_labels(dataset, self._image_transform.label_column), self._num_labels, split,
                         allow_unlabeled=False)
            return dataset.with_transform(self._image_transform)
        return dataset

    # ------------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """:func:`dho_loss` of a paired batch (``pixel_values`` ``(B, 3, H, W)``, ``labels`` ``(B,)``,
        ``unlabeled_pixel_values`` ``(B, 3, H, W)``, teacher logits or pixels); with ``return_outputs`` also the
        student's output on ``[x_l; x_u]``, or the pair ``(labeled, unlabeled)`` with ``separate_forwards``."""
        if "unlabeled_pixel_values" not in inputs:  # an evaluation batch: NLL of the combined prediction
            outputs = model(pixel_values=inputs["pixel_values"], labels=inputs.get("labels"))
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        labeled_pixels, unlabeled_pixels = inputs["pixel_values"], inputs["unlabeled_pixel_values"]
        size = labeled_pixels.shape[0]
        if self.args.separate_forwards:
            # one forward per batch, as the official train_others.py: BatchNorm normalises each batch with its own
            # statistics and updates its running statistics twice (the unlabeled batch last)
            outputs = (model(pixel_values=labeled_pixels), model(pixel_values=unlabeled_pixels))
            (ce_logits, kd_logits), (_, unlabeled_kd_logits) = (self._heads(out) for out in outputs)
        else:
            # one forward over both batches, as the official ImageNet scripts: BatchNorm normalises the 2B images
            # together (each image's logits depend on the other batch) and updates its running statistics once
            outputs = model(pixel_values=torch.cat([labeled_pixels, unlabeled_pixels]))
            ce_logits, kd_logits = self._heads(outputs)
            ce_logits, kd_logits, unlabeled_kd_logits = ce_logits[:size], kd_logits[:size], kd_logits[size:]
        teacher_labeled = self._teacher_logits(inputs, "")
        teacher_unlabeled = self._teacher_logits(inputs, "unlabeled_")
        unlabeled_count = None
        if num_items_in_batch is not None:  # paired items: the step's unlabeled count equals its labeled count
            unlabeled_count = num_items_in_batch * (unlabeled_pixels.shape[0] / size)
        result = dho_loss(ce_logits, kd_logits, inputs["labels"], teacher_labeled, unlabeled_kd_logits,
                          teacher_unlabeled, ce_weight=self.args.ce_weight, temperature=self.args.temperature,
                          labeled_count=num_items_in_batch, unlabeled_count=unlabeled_count)
        # per-example sums for the logs (device tensors: no host synchronisation per micro-batch)
        for key, divisor in (("ce", num_items_in_batch), ("kd_labeled", num_items_in_batch),
                             ("kd_unlabeled", unlabeled_count)):
            divisor = (size if key != "kd_unlabeled" else unlabeled_pixels.shape[0]) if divisor is None else divisor
            self._loss_sums[key] = self._loss_sums[key] + getattr(result, key).detach() * divisor
        self._loss_sums["examples"] += size
        loss = result.loss
        loss = scaled_for_data_parallel(loss, self.args, self.accelerator, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _heads(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(B, C)`` logits the CE and KD terms train: ``(ce_logits, kd_logits)``, or the CE head's twice for
        the single-head baseline."""
        return outputs.ce_logits, outputs.ce_logits if self.args.single_head else outputs.kd_logits

    @torch.no_grad()
    def _teacher_logits(self, inputs, prefix: str) -> torch.Tensor:
        if prefix + "teacher_logits" in inputs:
            return inputs[prefix + "teacher_logits"].float()
        if self.teacher is None:
            if self.args.ce_weight == 1.0:  # CE only: the KD terms have weight 0
                return torch.zeros(inputs[prefix + "pixel_values"].shape[0], self.model.config.num_labels,
                                   device=inputs[prefix + "pixel_values"].device)
            raise ValueError("The batch has no teacher_logits and the trainer has no teacher.")
        pixels = inputs.get(prefix + "teacher_pixel_values", inputs[prefix + "pixel_values"])
        return self.teacher(pixel_values=pixels).logits.float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._loss_sums.get("examples"):
            count = self._loss_sums.pop("examples")
            for key in ("ce", "kd_labeled", "kd_unlabeled"):
                logs[f"{key}_loss"] = round(float(self._loss_sums.pop(key)) / count, 6)
        super().log(logs, start_time)

    # -------------------------------------------------------------------------------------------- evaluation
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The NLL of the combined prediction, and both heads' logits stacked ``(B, 2, C)`` for the search."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(pixel_values=inputs["pixel_values"], labels=inputs.get("labels"))
        loss = None if outputs.loss is None else outputs.loss.detach()
        if prediction_loss_only:
            return loss, None, None
        heads = torch.stack([outputs.ce_logits.detach(), outputs.kd_logits.detach()], dim=1)
        return loss, heads, inputs.get("labels")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Evaluate; on the trainer's own ``eval_dataset`` (the validation split) first grid-search alpha/beta
        and store them in the model. Any other dataset (a test split) is scored with the stored weights."""
        search = (eval_dataset is None and self.args.search_inference_weights and not self.args.single_head)
        if eval_dataset is not None:
            eval_dataset = self.prepare_eval_dataset(eval_dataset)
        self._search_on_this_evaluation = search
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._search_on_this_evaluation = False

    def _accuracy_metrics(self, prediction) -> dict[str, float]:
        heads = torch.as_tensor(np.asarray(prediction.predictions))  # (N, 2, C)
        labels = torch.as_tensor(np.asarray(prediction.label_ids)).long()
        ce_logits, kd_logits = heads[:, 0], heads[:, 1]
        model = unwrap_model(self.model)
        metrics = {}
        if self._search_on_this_evaluation:
            found = search_inference_weights(ce_logits, kd_logits, labels, self.args.alpha_grid or DEFAULT_ALPHA_GRID,
                                             self.args.beta_grid or DEFAULT_BETA_GRID)
            model.set_inference_weights(found.alpha, found.beta)
        alpha, beta = model.config.alpha, model.config.beta
        predicted = combine_head_predictions(ce_logits, kd_logits, alpha, beta).argmax(-1)
        metrics["accuracy"] = (predicted == labels).double().mean().item()
        metrics["ce_head_accuracy"] = (ce_logits.argmax(-1) == labels).double().mean().item()
        if not self.args.single_head:
            metrics["kd_head_accuracy"] = (kd_logits.argmax(-1) == labels).double().mean().item()
        metrics["alpha"], metrics["beta"] = float(alpha), float(beta)
        return metrics

    # ------------------------------------------------------------------------------------ inference weights
    def train(self, resume_from_checkpoint=None, **kwargs):
        """``Trainer.train``; a resumed run starts from the checkpoint's alpha/beta, and with
        ``load_best_model_at_end`` the best checkpoint's alpha/beta come back with its weights."""
        if resume_from_checkpoint:
            folder = last_complete_checkpoint(self.args.output_dir) if resume_from_checkpoint is True \
                else resume_from_checkpoint
            if folder:
                self._restore_inference_weights(folder)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        if self.args.load_best_model_at_end and self.state.best_model_checkpoint:
            self._restore_inference_weights(self.state.best_model_checkpoint)
        return output

    def _restore_inference_weights(self, folder: str) -> None:
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            return
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        if "alpha" in config and "beta" in config:
            unwrap_model(self.model).set_inference_weights(config["alpha"], config["beta"])


def _same_processor(first, second) -> bool:
    if first is None or second is None:
        return first is second or first is None
    if first is second:
        return True
    try:
        return type(first) is type(second) and first.to_dict() == second.to_dict()
    except Exception:  # noqa: BLE001 - a processor without to_dict is compared by identity
        return False


__all__ = ["DHOConfig", "DHOLoss", "DHOTrainer", "dho_loss"]
