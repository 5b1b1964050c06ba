"""Loading the DHO student and teacher (docs/ALGORITHMS.md section 4) from a config: names or objects, class names, the
CLIP zero-shot teacher or any image classifier. Used by :class:`llmkd.DHOTrainer`; ``args`` is a
:class:`~llmkd.DHOConfig`."""

from __future__ import annotations

import logging

import datasets
import torch
from transformers import AutoConfig, AutoImageProcessor

from ..heads import unwrap_model
from ..loading import resolve_dtype
from .clip_teacher import DEFAULT_TEMPLATES, CLIPZeroShotClassifier
from .dual_head import DualHeadConfig, DualHeadModel

logger = logging.getLogger(__name__)


def resolve_class_names(class_names, args, train_dataset, model) -> list[str] | None:
    """One name per class id: ``class_names``, else ``args.class_names`` / ``args.class_names_file``, else the label
    column's ``ClassLabel`` names, else a dual-head student's own ``id2label`` (unless it is the default
    ``LABEL_i``); None when nothing names the classes."""
    if class_names is None:
        class_names = args.class_names
    if class_names is None and args.class_names_file:
        with open(args.class_names_file, encoding="utf-8") as handle:
            class_names = [line.strip() for line in handle if line.strip()]
    if class_names is None:
        feature = getattr(train_dataset, "features", {}).get(args.label_column)
        class_names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    if class_names is None and isinstance(model, DualHeadModel):
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        class_names = None if all(n == f"LABEL_{i}" for i, n in enumerate(names)) else names
    return None if class_names is None else [str(n) for n in class_names]


def load_dho_student(model, args, processing_class, class_names):
    """(DualHeadModel, image processor) from a model object or a name: a saved dual-head student, or a vision backbone
    that gets two new heads over ``class_names`` (fresh weights with ``args.init_student_from_config``)."""
    model = model if model is not None else args.model_name_or_path
    if model is None:
        raise ValueError("No student: pass model=... or set model_name_or_path (a saved DualHeadModel or a vision "
                         "backbone such as microsoft/resnet-18).")
    id2label = None if class_names is None else dict(enumerate(class_names))
    if isinstance(model, str):
        name = model
        if processing_class is None:
            processing_class = AutoImageProcessor.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        config = AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        if isinstance(config, DualHeadConfig):
            model = DualHeadModel.from_pretrained(name)
        else:
            if id2label is None:
                raise ValueError(f"{name!r} is a backbone, not a dual-head student: the number of classes comes "
                                 "from the class names; set class_names (or use a ClassLabel label column).")
            if args.init_student_from_config:
                torch.manual_seed(args.seed)
                model = DualHeadModel(DualHeadConfig(
                    backbone_config=config, id2label=id2label, label2id={v: k for k, v in id2label.items()},
                    feature_pooling=args.student_feature_pooling))
            else:
                model = DualHeadModel.from_backbone(name, id2label=id2label,
                                                    feature_pooling=args.student_feature_pooling,
                                                    trust_remote_code=args.trust_remote_code)
    if not isinstance(unwrap_model(model), DualHeadModel):
        raise TypeError(f"The DHO student must be a DualHeadModel, got {type(model).__name__}; wrap a vision "
                        "backbone with DualHeadModel.from_backbone(name, num_labels=...) or "
                        "DualHeadModel(DualHeadConfig(backbone_config=..., num_labels=...)).")
    if processing_class is None:
        raise ValueError("The student was given as a model object: pass its image processor as "
                         "processing_class=... (e.g. AutoImageProcessor.from_pretrained(backbone_name)).")
    return model, processing_class


def load_dho_teacher(teacher, args, teacher_processing_class, class_names):
    """(teacher, its image processor): a CLIP checkpoint or ``CLIPModel`` becomes a zero-shot classifier over
    ``class_names`` with ``args.prompt_templates``; any other checkpoint loads as an image classifier; a classifier
    object is used as it is."""
    teacher = teacher if teacher is not None else args.teacher_model_name_or_path
    if teacher is None:
        raise ValueError("No teacher: pass teacher_model=... or set teacher_model_name_or_path, or give rows that "
                         "already hold teacher_logits.")
    templates = args.prompt_templates or list(DEFAULT_TEMPLATES)
    scale = args.teacher_logit_scale or None
    if isinstance(teacher, str):
        name = teacher
        config = AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        is_clip = args.teacher_type == "clip" or (args.teacher_type == "auto" and config.model_type == "clip")
        dtype = resolve_dtype(args.teacher_dtype) if args.teacher_dtype != "auto" else "auto"
        if is_clip:
            if class_names is None:
                raise ValueError("A CLIP teacher classifies by class names: set class_names (one per label id).")
            # on the training device: the prompt embeddings (classes x templates text passes) are computed there
            teacher = CLIPZeroShotClassifier.from_pretrained(name, class_names, templates, logit_scale=scale,
                                                             dtype=dtype, device=args.device)
        else:
            from transformers import AutoModelForImageClassification

            teacher = AutoModelForImageClassification.from_pretrained(
                name, dtype=dtype, trust_remote_code=args.trust_remote_code)
        if teacher_processing_class is None:
            teacher_processing_class = AutoImageProcessor.from_pretrained(
                name, trust_remote_code=args.trust_remote_code)
    elif type(teacher).__name__ == "CLIPModel":
        tokenizer = getattr(teacher_processing_class, "tokenizer", None)
        if tokenizer is None or class_names is None:
            raise ValueError("A CLIPModel teacher object needs teacher_processing_class=CLIPProcessor(...) (its "
                             "tokenizer embeds the prompts) and class_names.")
        teacher = CLIPZeroShotClassifier.from_model(teacher, tokenizer, class_names, templates, logit_scale=scale)
    teacher_processing_class = getattr(teacher_processing_class, "image_processor", teacher_processing_class)
    if teacher_processing_class is None:
        logger.info("No teacher image processor given: the teacher sees the student's pixel_values.")
    return teacher, teacher_processing_class


__all__ = ["load_dho_student", "load_dho_teacher", "resolve_class_names"]
