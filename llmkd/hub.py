"""Model cards and publishing a distilled student to the Hugging Face Hub (or any server speaking its API).

    llmkd publish OUTPUT_DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--endpoint URL]

What is uploaded, from a ``llmkd train`` output directory (nothing else: no pickles, no checkpoints, no
``training_args.bin``):

- weights: ``*.safetensors`` (and their index), ``config.json``, ``generation_config.json``, ``adapter_config.json``;
- the tokenizer / processor files (``tokenizer*``, ``special_tokens_map.json``, ``vocab.*``, ``merges.txt``,
  ``*.model``, ``chat_template.*``, ``*processor*_config.json``, ``preprocessor_config.json``);
- the recipe (``llmkd_recipe.yaml``) and the run's effective settings (``llmkd_run.json``);
- the evaluation (``results.json``, ``results.md``), the report (``report.html``, ``report/*.png``,
  ``log_history.json``);
- ``README.md``: the model card built here (huggingface_hub ``ModelCard``), whose metadata holds the base model,
  the teacher, the method and its hyperparameters, the datasets, and the evaluation in ``model-index`` form; its
  body shows the report's plots.

The token is whatever huggingface_hub finds (``HF_TOKEN`` or ``hf auth login``); llmkd never reads, prints or writes
it. The endpoint is ``--endpoint``, a recipe's ``hub_endpoint``, or huggingface_hub's default (``HF_ENDPOINT``).
A failed upload raises :class:`PublishError` with the server's message; the output directory is left as it was
(the card is written there only after the upload succeeded).
"""

from __future__ import annotations

import dataclasses
import enum
import fnmatch
import glob
import json
import logging
import os
from typing import Any

import yaml

logger = logging.getLogger(__name__)

RUN_FILE = "llmkd_run.json"
RECIPE_FILE = "llmkd_recipe.yaml"
CARD_FILE = "README.md"

UPLOAD_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
    "chat_template.*", "preprocessor_config.json", "processor_config.json", "*processor_config.json",
    RECIPE_FILE, RUN_FILE, "results.json", "results.md", "report.html", "log_history.json", "report/*.png",
)

# Training settings worth stating on a card next to the method's own fields.
TRAINING_FIELDS = (
    "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "num_train_epochs",
    "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "seed", "bf16", "fp16",
    "use_peft", "lora_r", "lora_alpha",
)
# Fields that name things (reported separately) or that must never be written out.
_NOT_HYPERPARAMETERS = {
    "model_name_or_path", "teacher_model_name_or_path", "dataset_name", "output_dir", "hub_endpoint", "eval_tasks",
    "eval_limit", "eval_teacher", "report", "logging_dir", "run_name",
}


class PublishError(RuntimeError):
    """Publishing failed (nothing to publish, or the server refused)."""


# ------------------------------------------------------------------------------------------ what the run was
def method_of(args) -> str:
    """The recipe method name of a config object (``kd``, ``taid``, ...), from llmkd's method table."""
    from .methods import METHODS

    for name, entry in METHODS.items():
        module, attribute = entry.config_path.rsplit(":", 1)
        if type(args).__name__ == attribute and type(args).__module__ == module:
            return name
    return type(args).__name__


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _secret(name: str) -> bool:
    return "token" in name.lower() or "secret" in name.lower() or "password" in name.lower()


def run_summary(args, method: str | None = None) -> dict[str, Any]:
    """What a run was, for the card and the report: method, student, teacher, datasets, hyperparameters (the
    method config's own fields and the main training settings). Read with getattr, so any llmkd config (or
    TrainingArguments subclass) works. Nothing whose name mentions a token is included."""
    from transformers import TrainingArguments

    from .config import ModelSourceFields

    method = method or method_of(args)
    trainer_fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    source_defaults = {f.name: f.default for f in dataclasses.fields(ModelSourceFields)}
    hyperparameters: dict[str, Any] = {}
    for field in dataclasses.fields(args) if dataclasses.is_dataclass(args) else []:
        name = field.name
        if name in trainer_fields or name in _NOT_HYPERPARAMETERS or _secret(name) or name.startswith("_"):
            continue
        if name in source_defaults and getattr(args, name, None) == source_defaults[name]:
            continue  # how models and data are loaded, at its default: not part of the method
        value = getattr(args, name, None)
        if name.startswith("cache_") and not getattr(args, "teacher_cache", None):
            continue  # settings of a teacher cache the run did not use
        if value is not None:
            hyperparameters[name] = _plain(value)
    for name in TRAINING_FIELDS:
        value = getattr(args, name, None)
        if value is not None and name not in hyperparameters:
            hyperparameters[name] = _plain(value)
    student = getattr(args, "model_name_or_path", None)
    teacher = getattr(args, "teacher_model_name_or_path", None)
    dataset = getattr(args, "dataset_name", None)
    return {
        "method": method,
        "student": student,
        "student_initialisation": "fresh weights from the student's config" if getattr(
            args, "init_student_from_config", False) else "pretrained weights",
        "teacher": teacher or (f"teacher-logit cache {args.teacher_cache}" if getattr(args, "teacher_cache", None)
                               else None),
        "datasets": [dataset] if dataset else [],
        "hyperparameters": hyperparameters,
    }


def write_run_summary(output_dir: str, summary: dict[str, Any]) -> str:
    path = os.path.join(output_dir, RUN_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return path


def read_run_summary(output_dir: str) -> dict[str, Any] | None:
    """``llmkd_run.json`` of ``output_dir``, else what its ``llmkd_recipe.yaml`` says, else None."""
    path = os.path.join(output_dir, RUN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    recipe = os.path.join(output_dir, RECIPE_FILE)
    if os.path.isfile(recipe):
        with open(recipe, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
        dataset = values.get("dataset_name")
        return {
            "method": values.get("method", "kd"), "student": values.get("model_name_or_path"),
            "teacher": values.get("teacher_model_name_or_path"), "datasets": [dataset] if dataset else [],
            "hyperparameters": {k: _plain(v) for k, v in values.items() if k not in _NOT_HYPERPARAMETERS
                                and k != "method" and not _secret(k)},
        }
    return None


# ---------------------------------------------------------------------------------------------- the card
def _is_hub_id(name: str | None) -> bool:
    """A Hub repository id (``org/name``), as opposed to a local path."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return False
    return name.count("/") == 1 and all(part and " " not in part for part in name.split("/"))


# pipeline tag -> (Auto model class, processing class) of the loading snippet
_MODEL_KINDS = {
    "text-generation": ("AutoModelForCausalLM", "AutoTokenizer"),
    "text-classification": ("AutoModelForSequenceClassification", "AutoTokenizer"),
    "image-classification": ("AutoModelForImageClassification", "AutoImageProcessor"),
    "image-text-to-text": ("AutoModelForImageTextToText", "AutoProcessor"),
}


def pipeline_tag(output_dir: str) -> str:
    """The Hub pipeline tag of the model saved in ``output_dir``, from its config's architectures."""
    path = os.path.join(output_dir, "config.json")
    architectures: list[str] = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        architectures = config.get("architectures") or []
        if config.get("vision_config") and config.get("text_config"):
            return "image-text-to-text"
    names = " ".join(architectures)
    if "ForSequenceClassification" in names:
        return "text-classification"
    if "ForImageClassification" in names or "DualHeadModel" in names:
        return "image-classification"
    return "text-generation"


def eval_results_for_card(results: dict | None, task_type: str = "text-generation") -> list:
    """The student's scores as huggingface_hub ``EvalResult`` entries (the card's ``model-index``);
    ``task_type``: the model's pipeline tag (lm-eval tasks are text generation)."""
    from huggingface_hub import EvalResult

    entries = []
    if not results:
        return entries
    for task, entry in results["student"]["scores"].items():
        kind = task_type if entry.get("kind") == "classification" else "text-generation"
        for metric, value in entry["metrics"].items():
            entries.append(EvalResult(
                task_type=kind, dataset_type=task, dataset_name=task,
                metric_type=metric, metric_name=metric, metric_value=round(float(value), 6),
            ))
    return entries


def build_model_card(output_dir: str, repo_id: str | None = None, *, summary: dict | None = None,
                     results: dict | None = None, plots: list[str] | None = None):
    """The ``huggingface_hub.ModelCard`` of a run in ``output_dir`` (its run summary, evaluation and report plots
    are read from there unless given)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .evaluation.results import markdown_table, read_results
    from .report import report_plots

    summary = summary if summary is not None else (read_run_summary(output_dir) or {})
    results = results if results is not None else read_results(output_dir)
    plots = plots if plots is not None else report_plots(output_dir)
    name = (repo_id or os.path.basename(os.path.abspath(output_dir))).split("/")[-1]
    method = summary.get("method") or "distillation"
    student, teacher = summary.get("student"), summary.get("teacher")
    datasets = [d for d in summary.get("datasets", []) if d]
    fresh = summary.get("student_initialisation", "").startswith("fresh")
    distillation: dict[str, Any] = {
        "method": method, "teacher": teacher, "student": student,
        "student_initialisation": summary.get("student_initialisation"),
        "datasets": datasets, "hyperparameters": summary.get("hyperparameters", {}),
    }
    if results and results.get("retention"):
        distillation["retention"] = results["retention"]
        distillation["teacher_scores"] = {t: e["metrics"] for t, e in results["teacher"]["scores"].items()}
    tag = pipeline_tag(output_dir)
    data = ModelCardData(
        model_name=name, library_name="transformers", pipeline_tag=tag,
        base_model=student if _is_hub_id(student) and not fresh else None,
        datasets=[d for d in datasets if _is_hub_id(d)] or None,
        tags=["llmkd", "distillation", "knowledge-distillation", method],
        eval_results=eval_results_for_card(results, tag) or None,
        llmkd=_plain(distillation),
    )
    lines = [f"# {name}", "",
             f"A student distilled with [llmkd](https://github.com/llmkd/llmkd), method **{method}**"
             + (f", from the teacher `{teacher}`" if teacher else "") + ".", ""]
    lines += ["## How it was made", "", "| | |", "|---|---|"]
    for label, value in (("method", method), ("teacher", teacher), ("student", student),
                         ("student initialisation", summary.get("student_initialisation")),
                         ("datasets", ", ".join(datasets) or None)):
        if value:
            lines.append(f"| {label} | `{value}` |")
    for key, value in summary.get("hyperparameters", {}).items():
        lines.append(f"| {key} | `{value}` |")
    lines.append("")
    if results:
        lines += ["## Evaluation", "",
                  "Scores of this student" + (", its teacher, and the retention ratio (how much of the teacher's "
                                              "score the student keeps; 1.0 = as good as the teacher)"
                                              if results.get("teacher") else "") + ".", "",
                  markdown_table(results)]
    if plots:
        lines += ["## Training curves", ""]
        lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots]
        lines.append("")
    model_class, processing_class = _MODEL_KINDS[tag]
    lines += ["## Use", "", "```python"]
    if summary.get("method") == "dho":
        lines.append("from llmkd import DualHeadModel  # registers the class with transformers' Auto classes")
    lines += [f"from transformers import {model_class}, {processing_class}", "",
              f'model = {model_class}.from_pretrained("{repo_id or name}")',
              f'processor = {processing_class}.from_pretrained("{repo_id or name}")', "```", ""]
    if os.path.isfile(os.path.join(output_dir, RECIPE_FILE)):
        lines += [f"The recipe that trained it is `{RECIPE_FILE}`: its effective settings, command-line overrides "
                  f"included (`llmkd train --config {RECIPE_FILE} --output_dir NEW_FOLDER` reruns it; local paths in "
                  "it are those of the machine that trained it).", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(output_dir: str, repo_id: str | None = None, **kwargs) -> str:
    """Write the card (:func:`build_model_card`) as ``output_dir/README.md``; return its path."""
    path = os.path.join(output_dir, CARD_FILE)
    build_model_card(output_dir, repo_id, **kwargs).save(path)
    return path


def create_trainer_model_card(trainer, **_trainer_card_arguments) -> None:
    """What ``Trainer.create_model_card`` does for an llmkd trainer: llmkd's card (and ``llmkd_run.json``) in
    ``output_dir``, so that ``trainer.push_to_hub()`` uploads the same card as ``llmkd publish``."""
    if not trainer.is_world_process_zero():
        return
    output_dir = trainer.args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    write_run_summary(output_dir, run_summary(trainer.args))
    write_model_card(output_dir, getattr(trainer.args, "hub_model_id", None))


# ------------------------------------------------------------------------------------------------ upload
def files_to_upload(output_dir: str) -> list[str]:
    """The files of ``output_dir`` that are published (relative paths, sorted). See the module docstring."""
    chosen = []
    for root, directories, files in os.walk(output_dir):
        directories[:] = [d for d in directories if not d.startswith((".", "checkpoint-", "runs"))]
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), output_dir).replace(os.sep, "/")
            if relative != CARD_FILE and any(fnmatch.fnmatch(relative, p) for p in UPLOAD_PATTERNS):
                chosen.append(relative)
    return sorted(chosen)


def check_publishable(output_dir: str) -> None:
    if not os.path.isdir(output_dir):
        raise PublishError(f"{output_dir!r} is not a folder: pass the output_dir of `llmkd train`.")
    if not glob.glob(os.path.join(output_dir, "*.safetensors")):
        pickles = [os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "*.bin"))
                   if os.path.basename(p) != "training_args.bin"]
        extra = (f" It holds pickle weights ({', '.join(pickles)}), which llmkd does not publish: re-save them with "
                 "save_pretrained (safetensors is the default)." if pickles else "")
        raise PublishError(f"{output_dir!r} holds no safetensors weights (*.safetensors): nothing to publish.{extra}")
    if not any(os.path.isfile(os.path.join(output_dir, n)) for n in ("config.json", "adapter_config.json")):
        raise PublishError(f"{output_dir!r} has no config.json (or adapter_config.json): save the model with "
                           "save_pretrained before publishing.")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures as huggingface_hub's HTTP client raises them (httpx, or its fork httpx2)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def publish(output_dir: str, repo_id: str, *, private: bool | None = None, revision: str | None = None,
            endpoint: str | None = None, commit_message: str | None = None) -> dict[str, Any]:
    """Upload a run's output directory to ``repo_id`` in one commit, with llmkd's model card.

    Creates the repository if needed (``private``: True / False, or None for the namespace's default; it applies
    to a new repository only) and the branch ``revision`` if given.
    Returns ``{"repo_id", "revision", "commit_url", "files"}``. Raises :class:`PublishError` on any failure; the
    local folder is then unchanged.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_publishable(output_dir)
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise PublishError(f"--repo-id {repo_id!r} is not a repository id: use ORG/NAME (or NAME for your "
                           "own namespace).")
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, which blocks every request to the Hub: "
                           "unset it to publish.")
    files = files_to_upload(output_dir)
    card = str(build_model_card(output_dir, repo_id)).encode("utf-8")
    api = HfApi(endpoint=endpoint)
    where = f"{repo_id} at {api.endpoint}"
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=os.path.join(output_dir, path))
                  for path in files]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE, path_or_fileobj=card))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(url.repo_id, operations, revision=revision,
                                 commit_message=commit_message or f"Upload {os.path.basename(output_dir)} "
                                 "(llmkd publish)")
    except HfHubHTTPError as error:
        server = getattr(error, "server_message", None) or str(error)
        status = getattr(getattr(error, "response", None), "status_code", "?")
        raise PublishError(f"Publishing {output_dir!r} to {where} failed (HTTP {status}): {server.strip()}\n"
                           f"Nothing in {output_dir!r} was changed. Check the repository id, that your token "
                           "(HF_TOKEN or `hf auth login`) may write to it, and the endpoint.") from None
    except _transport_errors() as error:
        raise PublishError(f"Publishing {output_dir!r} to {where} failed: {error}\n"
                           f"Nothing in {output_dir!r} was changed.") from None
    with open(os.path.join(output_dir, CARD_FILE), "wb") as handle:
        handle.write(card)
    logger.info("Published %d files and the model card to %s (%s)", len(files), where, info.commit_url)
    return {"repo_id": url.repo_id, "revision": revision or "main", "commit_url": info.commit_url,
            "files": files + [CARD_FILE]}
