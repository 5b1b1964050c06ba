"""Where evaluation tasks come from: llmkd's offline tasks (``eval/`` in the repository) and lm-eval's registry.

- Language-model tasks are lm-eval task YAMLs: llmkd's own in ``eval/tasks/`` (offline data in ``eval/data/``) and
  every task lm-eval ships (its data is fetched by ``datasets`` when reachable).
- Classification tasks (for text and image classifier students) are small YAMLs in ``eval/classification/`` naming
  a data file of GLUE-style rows or a saved dataset folder; a path to such a file (jsonl/json/csv/parquet) or
  folder (``PATH[:split]``) works as a task name too.

The ``eval/`` folder is found next to the installed package (a source checkout or an editable install); set
``LLMKD_EVAL_DIR`` to use another one.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import lru_cache

import yaml

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class EvaluationError(ValueError):
    """An evaluation was asked for something that cannot be evaluated (unknown task, missing model, ...)."""


def eval_dir() -> str:
    """The folder holding llmkd's task definitions and data (``LLMKD_EVAL_DIR`` or ``<repository>/eval``)."""
    override = os.environ.get("LLMKD_EVAL_DIR")
    if override:
        return os.path.abspath(override)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "eval")


def lm_tasks_dir() -> str:
    return os.path.join(eval_dir(), "tasks")


def parse_task_list(tasks: str | list[str] | None) -> list[str]:
    """``"a,b , c"`` -> ``["a", "b", "c"]``; duplicates are dropped, order kept."""
    if tasks is None:
        return []
    items = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names: list[str] = []
    for item in (str(i).strip() for i in items):
        if item and item not in names:
            names.append(item)
    return names


class _IgnoreTags(yaml.SafeLoader):
    """Reads task YAMLs for their names without running lm-eval's ``!function`` tags."""


_IgnoreTags.add_multi_constructor("!", lambda loader, suffix, node: None)


@lru_cache(maxsize=8)
def _local_lm_task_names(folder: str) -> tuple[str, ...]:
    names = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith((".yaml", ".yml")):
                with open(os.path.join(folder, name), encoding="utf-8") as handle:
                    content = yaml.load(handle, Loader=_IgnoreTags) or {}
                if isinstance(content, dict) and content.get("task"):
                    names.append(str(content["task"]))
    return tuple(names)


def local_lm_tasks() -> list[str]:
    """The names of llmkd's offline lm-eval tasks."""
    return list(_local_lm_task_names(lm_tasks_dir()))


@dataclass(frozen=True)
class ClassificationTask:
    """A held-out set of labelled rows scored with ``evaluate``'s accuracy and F1 of a classifier's argmax: text rows
    in a GLUE layout (``sentence`` / ``sentence1``+``sentence2`` / ..., ``label``) or images (``image_column``,
    ``label``). ``data_path`` is a data file, or a folder written by ``Dataset(Dict).save_to_disk`` (then ``split``
    picks the split)."""

    name: str
    data_path: str
    split: str | None = None
    image_column: str = "image"
    label_column: str = "label"
    metrics: tuple[str, ...] = ("accuracy", "f1")


def repository_root() -> str:
    return os.path.dirname(eval_dir())


def local_classification_tasks() -> dict[str, ClassificationTask]:
    """llmkd's offline classification tasks (``eval/classification/*.yaml``): ``data_file`` is relative to
    ``eval/data``, ``dataset_dir`` to the repository root."""
    folder = os.path.join(eval_dir(), "classification")
    tasks: dict[str, ClassificationTask] = {}
    if not os.path.isdir(folder):
        return tasks
    for name in sorted(os.listdir(folder)):
        if not name.endswith((".yaml", ".yml")):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as handle:
            spec = yaml.safe_load(handle) or {}
        if "data_file" in spec:
            path = os.path.join(eval_dir(), "data", spec["data_file"])
        else:
            path = os.path.join(repository_root(), spec["dataset_dir"])
        tasks[spec["task"]] = ClassificationTask(
            spec["task"], path, spec.get("split"), spec.get("image_column", "image"), spec.get("label_column", "label"),
            tuple(spec.get("metrics", ("accuracy", "f1"))))
    return tasks


def classification_task(name: str) -> ClassificationTask | None:
    """The classification task ``name``: a local task, a data file (jsonl/json/csv/parquet), or a folder saved with
    ``save_to_disk`` optionally followed by ``:split`` (``digits:test``); None if it is none of these."""
    local = local_classification_tasks()
    if name in local:
        return local[name]
    if name.endswith(DATA_SUFFIXES) and os.path.isfile(name):
        return ClassificationTask(name, os.path.abspath(name))
    path, _, split = name.rpartition(":") if ":" in name else (name, "", "")
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, marker)) for marker in
                                   ("dataset_dict.json", "dataset_info.json", "state.json")):
        return ClassificationTask(name, os.path.abspath(path), split or None)
    return None


def task_manager(names: list[str], include_path: str | None = None):
    """An lm-eval ``TaskManager`` that knows ``names``: llmkd's local tasks (plus ``include_path``), and lm-eval's
    built-in registry only when a name is not local (indexing it takes seconds). Unknown names are an
    :class:`EvaluationError` naming the closest known task."""
    paths = [lm_tasks_dir()] + ([os.path.abspath(include_path)] if include_path else [])
    paths = tuple(p for p in paths if os.path.isdir(p))
    manager = _task_manager(paths, include_defaults=False)
    if any(name not in manager.all_tasks for name in names):
        manager = _task_manager(paths, include_defaults=True)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks + list(local_classification_tasks()), n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        raise EvaluationError(
            f"Unknown evaluation task {', '.join(hints)}. llmkd's offline tasks: {', '.join(local_lm_tasks())} "
            f"(language models), {', '.join(local_classification_tasks()) or 'none'} (classifiers); any lm-eval task "
            f"name works too (`lm-eval ls tasks` lists them), or a folder of task YAMLs via include_path."
        )
    return manager


@lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], include_defaults: bool):
    """One index per set of folders and process (indexing lm-eval's ~15k built-in task YAMLs takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=include_defaults)


def validate_tasks(tasks: str | list[str] | None, include_path: str | None = None) -> list[str]:
    """Check that every task name is known (an offline classification task, a data file or dataset folder,
    ``eval_dataset``, or an lm-eval task) before any work; returns the names. Raises :class:`EvaluationError`."""
    names = parse_task_list(tasks)
    lm_names = [n for n in names if n != "eval_dataset" and classification_task(n) is None]
    if lm_names:
        task_manager(lm_names, include_path)
    return names
