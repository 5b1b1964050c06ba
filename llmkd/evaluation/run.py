"""Evaluating a student (and its teacher) by path or object: ``llmkd eval`` and the end-of-training evaluation."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from typing import Any

import torch

from ..loading import ModelLoadError, detect_task, load_causal_lm, load_processing_class, tokenizer_of
from .classification import classification_scores, evaluate_classifier, load_rows, model_kind, predict_batches
from .harness import run_lm_eval
from .results import combine, markdown_table, write_results
from .tasks import EvaluationError, classification_task, parse_task_list

logger = logging.getLogger(__name__)

#: the task name that means "the trainer's own evaluation split" (classifiers, at the end of training)
EVAL_SPLIT_TASK = "eval_dataset"


def _looks_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name) or name.count("/") > 1


def check_model_dir(path: str, role: str) -> None:
    """A clear error when ``path`` is meant as a local folder and is missing or holds no safetensors weights."""
    if not _looks_local(path):
        return  # a Hub name: the loader reports what is wrong
    if not os.path.isdir(path):
        raise EvaluationError(f"The {role} model folder {path!r} does not exist. Pass the output_dir of `llmkd "
                              "train` (or any folder saved with save_pretrained), or a Hub model name.")
    if not glob.glob(os.path.join(path, "*.safetensors")):
        pickles = [os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin"))
                   + glob.glob(os.path.join(path, "*.pt")) if os.path.basename(p) != "training_args.bin"]
        hint = (f" It holds pickle weights ({', '.join(pickles)}), which llmkd never loads: re-save them with "
                "save_pretrained(path) (safetensors is the default)." if pickles else
                " Did training finish? `llmkd train` saves the student there at the end.")
        raise EvaluationError(f"The {role} model folder {path!r} holds no safetensors weights "
                              f"(*.safetensors).{hint}")


def _config(path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise EvaluationError(f"Could not read the model configuration at {path!r}: {error}") from error


def is_image_classifier_config(config) -> bool:
    """A config that AutoModelForImageClassification builds and AutoModelForCausalLM does not (a ViT/ResNet
    classifier, a DHO student)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    mapping = AutoModelForImageClassification._model_mapping
    return type(config) in mapping and type(config) not in AutoModelForCausalLM._model_mapping


def _is_adapter_folder(path: str) -> bool:
    """A LoRA student as ``llmkd train`` saves it: the adapter (``adapter_config.json``), no full ``config.json``."""
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and \
        not os.path.isfile(os.path.join(path, "config.json"))


def _load_adapter(path: str, role: str, *, dtype: str, trust_remote_code: bool):
    """A LoRA student: its base model (named in ``adapter_config.json``) with the adapter merged in, and the
    tokenizer saved beside the adapter (or the base's)."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification, PeftConfig

    from ..loading import resolve_dtype

    try:
        adapter = PeftConfig.from_pretrained(path)
        base = adapter.base_model_name_or_path
        peft_class = AutoPeftModelForSequenceClassification if adapter.task_type == "SEQ_CLS" else \
            AutoPeftModelForCausalLM
        model = peft_class.from_pretrained(path, dtype=resolve_dtype(dtype), use_safetensors=True,
                                           trust_remote_code=trust_remote_code).merge_and_unload()
    except (OSError, ValueError) as error:
        raise EvaluationError(f"Could not load the {role} LoRA adapter {path!r} on its base model: {error}") from error
    has_tokenizer = any(os.path.isfile(os.path.join(path, name)) for name in ("tokenizer.json",
                                                                                "tokenizer_config.json"))
    if not has_tokenizer:
        return model, tokenizer_of(load_processing_class(base, role=role, trust_remote_code=trust_remote_code))
    from transformers import AutoTokenizer

    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_for_evaluation(path: str, role: str, *, dtype: str = "float32", device: str | None = None,
                        trust_remote_code: bool = False):
    """(model, tokenizer or image processor) from a folder or Hub name: a causal LM or, if its config says so, a
    sequence classifier or an image classifier (safetensors only)."""
    check_model_dir(path, role)
    if _looks_local(path) and _is_adapter_folder(path):
        model, processing = _load_adapter(path, role, dtype=dtype, trust_remote_code=trust_remote_code)
    elif _looks_local(path) and is_image_classifier_config(_config(path, trust_remote_code)):
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        try:
            model = AutoModelForImageClassification.from_pretrained(path, use_safetensors=True,
                                                                    trust_remote_code=trust_remote_code)
            processing = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise EvaluationError(f"Could not load the {role} image classifier {path!r}: {error}") from error
    else:
        task = detect_task(path, trust_remote_code=trust_remote_code)
        try:
            model = load_causal_lm(path, role=role, dtype=dtype, trust_remote_code=trust_remote_code, task=task)
        except ModelLoadError as error:
            raise EvaluationError(str(error)) from error
        processing = tokenizer_of(load_processing_class(path, role=role, trust_remote_code=trust_remote_code))
    if device:
        model.to(device)
    return model, processing


def score_clip_teacher(path: str, tasks: list[str], *, limit: int | None = None, batch_size: int = 16,
                       device: str | None = None, templates: list[str] | None = None,
                       class_names: list[str] | None = None) -> dict[str, dict]:
    """A CLIP checkpoint as a zero-shot image classifier (the DHO teacher): for each image classification task, a
    :class:`~llmkd.models.clip_teacher.CLIPZeroShotClassifier` over ``class_names`` (default: the task's
    ``ClassLabel`` names) with the prompt ``templates`` (default ``"a photo of a {}."``; a DHO run passes its
    own)."""
    from transformers import AutoImageProcessor

    from ..models.clip_teacher import CLIPZeroShotClassifier

    check_model_dir(path, "teacher")
    scores = {}
    for name in tasks:
        spec = classification_task(name)
        if spec is None:
            raise EvaluationError(f"The teacher {path!r} is a CLIP model: it can be scored on image classification "
                                  f"tasks only (llmkd_digits, a saved image dataset), not {name!r}.")
        rows = load_rows(spec, limit)
        feature = rows.features.get(spec.label_column)
        names = class_names or getattr(feature, "names", None)
        if not names:
            raise EvaluationError(f"Task {name!r}: a CLIP teacher needs class names (a ClassLabel column "
                                  f"{spec.label_column!r}) to build its zero-shot classifier.")
        extra = {"templates": templates} if templates else {}
        teacher = CLIPZeroShotClassifier.from_pretrained(path, names, dtype=torch.float32, device=device,
                                                         use_safetensors=True, **extra)
        processor = AutoImageProcessor.from_pretrained(path)
        scores[name] = evaluate_classifier(teacher, processor, spec, limit=limit, batch_size=batch_size)
    return scores


def is_classifier(model) -> bool:
    return model_kind(model) != "causal_lm"


def score_model(model, tokenizer, tasks: list[str], *, limit: int | None = None, batch_size: int = 16,
                device: str | None = None, include_path: str | None = None,
                eval_batches=None) -> dict[str, dict]:
    """Scores of one model on ``tasks``: lm-eval tasks for a causal LM, classification tasks (``evaluate``
    accuracy/F1) for a sequence classifier. ``eval_batches``: a callable returning the batches of the trainer's
    evaluation split, for the task ``eval_dataset``."""
    classifier = is_classifier(model)
    scores: dict[str, dict] = {}
    lm_tasks = []
    for name in tasks:
        if name == EVAL_SPLIT_TASK:
            if eval_batches is None:
                raise EvaluationError(f"Task {EVAL_SPLIT_TASK!r} scores the trainer's evaluation split: it exists at "
                                      "the end of training only (set dataset_eval_split in the recipe).")
            predictions, references = predict_batches(model, eval_batches())
            num_labels = int(getattr(getattr(model, "config", None), "num_labels", 2) or 2)
            scores[name] = {"metrics": classification_scores(predictions, references, num_labels),
                            "higher_is_better": {"accuracy": True, "f1": True}, "samples": len(references),
                            "kind": "classification"}
            continue
        spec = classification_task(name)
        if spec is not None:
            if not classifier:
                raise EvaluationError(f"Task {name!r} is a classification task but the model is a "
                                      f"{type(model).__name__}, not a classifier: use lm-eval tasks such as "
                                      "llmkd_addition_exact_match for language models.")
            scores[name] = evaluate_classifier(model, tokenizer, spec, limit=limit, batch_size=max(batch_size, 1))
        elif classifier:
            raise EvaluationError(f"The model is a classifier ({type(model).__name__}); task {name!r} is not a "
                                  "classification task. Use llmkd_sentiment (text), llmkd_digits (images), a data "
                                  f"file or saved dataset folder (PATH[:split]), or {EVAL_SPLIT_TASK!r} at the end "
                                  "of training.")
        else:
            lm_tasks.append(name)
    if lm_tasks:
        scores.update(run_lm_eval(model, tokenizer, lm_tasks, limit=limit, batch_size=batch_size, device=device,
                                  include_path=include_path))
    return {name: scores[name] for name in tasks if name in scores} | {
        name: value for name, value in scores.items() if name not in tasks}


def evaluate_models(student, student_tokenizer, tasks: str | list[str], *, teacher=None, teacher_tokenizer=None,
                    limit: int | None = None, batch_size: int = 16, device: str | None = None,
                    include_path: str | None = None, student_name: str = "student", teacher_name: str = "teacher",
                    eval_batches=None) -> dict:
    """Score the student (and the teacher, if given) on ``tasks``; the results dict of :mod:`.results`, with
    retention ratios when there is a teacher."""
    names = parse_task_list(tasks)
    if not names:
        raise EvaluationError("No evaluation task given: pass --tasks T1,T2 (or eval_tasks: T1,T2 in a recipe).")
    common = dict(limit=limit, batch_size=batch_size, device=device, include_path=include_path,
                  eval_batches=eval_batches)
    logger.info("Evaluating the student on %s", ", ".join(names))
    student_part = {"model": student_name, "scores": score_model(student, student_tokenizer, names, **common)}
    teacher_part = None
    if teacher is not None:
        logger.info("Evaluating the teacher on %s", ", ".join(names))
        teacher_part = {"model": teacher_name,
                        "scores": score_model(teacher, teacher_tokenizer or student_tokenizer, names, **common)}
    settings: dict[str, Any] = {"tasks": names, "limit": limit, "batch_size": batch_size}
    return combine(student_part, teacher_part, settings)


def evaluate_paths(model: str, tasks: str | list[str], *, teacher: str | None = None, output_dir: str | None = None,
                   limit: int | None = None, batch_size: int = 16, device: str | None = None,
                   include_path: str | None = None, dtype: str = "float32") -> dict:
    """``llmkd eval``: load the student (and teacher) from folders or Hub names, score them, write
    ``results.json`` and ``results.md`` into ``output_dir`` (default: the student's folder)."""
    names = parse_task_list(tasks)
    if not names:
        raise EvaluationError("No evaluation task given: pass --tasks T1,T2.")
    check_model_dir(model, "student")
    if teacher is not None:
        check_model_dir(teacher, "teacher")
    student, student_tokenizer = load_for_evaluation(model, "student", dtype=dtype, device=device)
    results = evaluate_models(student, student_tokenizer, names, limit=limit, batch_size=batch_size, device=device,
                              include_path=include_path, student_name=model)
    if teacher is not None:
        del student
        if _looks_local(teacher) and getattr(_config(teacher, False), "model_type", None) == "clip":
            teacher_scores = score_clip_teacher(teacher, names, limit=limit, batch_size=batch_size, device=device)
        else:
            teacher_model, teacher_tokenizer = load_for_evaluation(teacher, "teacher", dtype=dtype, device=device)
            teacher_scores = score_model(teacher_model, teacher_tokenizer, names, limit=limit, batch_size=batch_size,
                                         device=device, include_path=include_path)
        results = combine(results["student"], {"model": teacher, "scores": teacher_scores}, results["settings"])
    if output_dir is None:
        output_dir = model if os.path.isdir(model) else "eval_output"
    json_path, table_path = write_results(results, output_dir)
    results["files"] = [json_path, table_path]
    return results


# ----------------------------------------------------------------------------------------- end of training
def _is_partitioned(model) -> bool:
    """Parameters sharded by DeepSpeed ZeRO-3 or FSDP2: the model cannot run a plain forward on one process."""
    for parameter in model.parameters():
        if hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor" or \
                type(getattr(parameter, "data", None)).__name__ == "DTensor":
            return True
    return False


@contextlib.contextmanager
def _one_process_loading():
    """Load models as whole, unsharded modules even inside a DeepSpeed ZeRO-3 run: transformers partitions every
    model it builds while a ZeRO-3 config is registered (``zero.Init``, a collective call), and at the end of
    training only the main process evaluates."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def _trainer_teacher(trainer):
    for name in ("teacher", "teacher_model", "ref_model"):
        teacher = getattr(trainer, name, None)
        if isinstance(teacher, torch.nn.Module):
            teacher = getattr(teacher, "module", teacher)  # a DeepSpeed engine holds the model as .module
            return None if _is_partitioned(teacher) else teacher
    return None


def evaluate_after_training(trainer) -> dict | None:
    """The end-of-training evaluation a recipe asks for with ``eval_tasks`` (main process only): the trained student
    (in memory, or reloaded from ``output_dir`` when its weights are sharded) and, with ``eval_teacher`` (default),
    the teacher, on ``eval_tasks`` with ``eval_limit`` examples per task. Writes ``results.json`` / ``results.md``
    into ``output_dir``. Returns the results, or None when no task is asked for."""
    args = trainer.args
    tasks = parse_task_list(getattr(args, "eval_tasks", None))
    if not tasks:
        return None
    output_dir = args.output_dir
    student = trainer.accelerator.unwrap_model(trainer.model)
    tokenizer = tokenizer_of(trainer.processing_class) if trainer.processing_class is not None else None
    if _is_partitioned(student) or tokenizer is None:
        with _one_process_loading():
            student, tokenizer = load_for_evaluation(output_dir, "student")
    teacher = teacher_tokenizer = clip_teacher_scores = None
    teacher_path = getattr(args, "teacher_model_name_or_path", None)
    device = str(next(student.parameters()).device)
    batch_size = int(getattr(args, "per_device_eval_batch_size", 16) or 16)
    if getattr(args, "eval_teacher", True):
        teacher = _trainer_teacher(trainer)
        if teacher is None and teacher_path and _looks_local(teacher_path) and \
                getattr(_config(teacher_path, False), "model_type", None) == "clip":
            # a CLIP teacher the run no longer holds (DHO precomputes its logits): rebuild its zero-shot classifier
            # with the run's prompt templates and class names
            clip_teacher_scores = score_clip_teacher(
                teacher_path, tasks, limit=getattr(args, "eval_limit", None), batch_size=batch_size, device=device,
                templates=getattr(args, "prompt_templates", None), class_names=getattr(args, "class_names", None))
        elif teacher is None and teacher_path:
            with _one_process_loading():
                teacher, teacher_tokenizer = load_for_evaluation(
                    teacher_path, "teacher", dtype=getattr(args, "teacher_dtype", "float32"),
                    trust_remote_code=getattr(args, "trust_remote_code", False))
        elif teacher is None:
            logger.info("No teacher to evaluate (the run had none, or it is sharded and has no path): "
                        "the results have no retention column.")
    eval_batches = None
    if getattr(trainer, "eval_dataset", None) is not None:
        def eval_batches():
            return iter(trainer.get_eval_dataloader())
    results = evaluate_models(
        student, tokenizer, tasks, teacher=teacher, teacher_tokenizer=teacher_tokenizer or tokenizer,
        limit=getattr(args, "eval_limit", None), batch_size=batch_size, device=device,
        student_name=os.path.abspath(output_dir), teacher_name=teacher_path or "teacher", eval_batches=eval_batches)
    if clip_teacher_scores is not None:
        results = combine(results["student"], {"model": teacher_path, "scores": clip_teacher_scores},
                          results["settings"])
    write_results(results, output_dir)
    logger.info("End-of-training evaluation (%s):\n%s", os.path.join(output_dir, "results.json"),
                markdown_table(results))
    return results
