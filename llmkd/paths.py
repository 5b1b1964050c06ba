"""Local paths versus Hub names, where a relative path is looked up, and what a missing one is reported as.

A model or dataset is named by a local path or a Hub id (``Qwen/Qwen2.5-0.5B``). transformers and datasets try
the Hub for anything that is not an existing local path, so a mistyped folder, or one that a previous stage has
not written yet, comes back as a network error ("couldn't connect to huggingface.co", or a Hub-id format error).
llmkd decides first:

- a name *looks like a path* when it starts with ``.``, ``/`` or ``~``, contains a backslash or more than one
  ``/`` (a Hub id has at most one), or ends with a data-file extension (``.jsonl``, ``.csv``, ...);
- in a recipe, a relative path is looked up in the recipe's folder first, then in the current directory; the
  first that exists is used (as an absolute path). Command-line overrides are looked up in the current directory
  first. Outputs (``output_dir``) are relative to the current directory, like any command's;
- a missing path-like name is a :class:`MissingPathError` naming the places looked in and, when another recipe
  of the same folder writes it (its ``output_dir``), that recipe: the stage to run first;
- anything else is a Hub id; :func:`hub_is_reachable` tells, in well under a second when offline, whether the Hub
  can be asked at all (``llmkd train`` then sets ``HF_HUB_OFFLINE=1`` instead of waiting for retries).
"""

from __future__ import annotations

import glob
import os
import re
import urllib.error
import urllib.request

# Config fields that name an input file or folder (or a Hub id), and the fields that name outputs.
INPUT_PATH_FIELDS = ("model_name_or_path", "teacher_model_name_or_path", "dataset_name", "teacher_cache",
                     "class_names_file", "deepspeed")
LOCAL_ONLY_FIELDS = ("teacher_cache", "class_names_file", "deepspeed")  # never a Hub id
OUTPUT_PATH_FIELDS = ("output_dir", "logging_dir")
DATA_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".yaml", ".yml", ".safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class MissingPathError(FileNotFoundError):
    """A local file or folder named in a recipe (or given to a loader) does not exist."""

    def __str__(self) -> str:  # FileNotFoundError's own str() shows errno fields
        return str(self.args[0]) if self.args else ""


def looks_like_path(name: str) -> bool:
    """True for names that can only be local paths (see the module docstring), False for possible Hub ids."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if os.path.splitext(name)[1].lower() in DATA_EXTENSIONS:
        return True
    return not _HUB_ID.match(name)


def find_local(name: str, bases: tuple[str, ...]) -> str | None:
    """The absolute path of ``name`` if it exists (as given, or relative to one of ``bases`` in order), else None."""
    expanded = os.path.expanduser(name)
    if os.path.isabs(expanded):
        return expanded if os.path.exists(expanded) else None
    for base in bases:
        candidate = os.path.normpath(os.path.join(base, expanded))
        if os.path.exists(candidate):
            return candidate
    return None


def producing_recipe(name: str, recipe_dir: str) -> str | None:
    """A recipe in ``recipe_dir`` whose ``output_dir`` is ``name`` (the stage that writes it), or None."""
    import yaml

    wanted = os.path.normpath(name)
    for path in sorted(glob.glob(os.path.join(recipe_dir, "*.yaml"))):
        try:
            with open(path, encoding="utf-8") as handle:
                values = yaml.safe_load(handle)
        except (OSError, yaml.YAMLError):
            continue
        output = values.get("output_dir") if isinstance(values, dict) else None
        if isinstance(output, str) and os.path.normpath(output) == wanted:
            return path
    return None


def missing_path_error(field: str, name: str, looked_in: tuple[str, ...], recipe_dir: str | None = None,
                       producer: str | None = None) -> MissingPathError:
    places = " and ".join(dict.fromkeys(os.path.normpath(os.path.join(b, os.path.expanduser(name)))
                                        for b in looked_in)) or os.path.abspath(os.path.expanduser(name))
    message = f"{field} {name!r} does not exist (looked for {places})."
    if producer is not None:
        relative = os.path.relpath(producer)
        relative = producer if relative.startswith("..") else relative
        message += (f" It is the output_dir of {relative}: run `llmkd train --config {relative}` first, from the "
                    "directory you run this one from.")
    elif field == "dataset_name":
        message += " Give an existing .json/.jsonl/.csv/.parquet file, a folder saved with save_to_disk, or a Hub " \
                   "dataset id (namespace/name)."
    else:
        message += " Give an existing folder (saved with save_pretrained) or a Hub id (namespace/name)."
    if recipe_dir is not None:
        message += " Relative paths in a recipe are looked up in the recipe's folder, then the current directory."
    return MissingPathError(message)


def resolve_input_paths(values: dict, bases: tuple[str, ...], recipe_dir: str | None = None) -> dict:
    """``values`` with every existing input path made absolute; a missing path-like one raises MissingPathError.

    A name that does not exist locally and could be a Hub id stays as it is, unless another recipe of
    ``recipe_dir`` writes it (then it is a folder that a previous stage must produce).
    """
    resolved = dict(values)
    for field in INPUT_PATH_FIELDS:
        resolved[field] = _resolved(field, values.get(field), bases, recipe_dir)
    teachers = values.get("teachers")
    if isinstance(teachers, list):  # several teachers: each entry's model and cache, like the single fields
        resolved["teachers"] = [
            {**entry, **{key: _resolved(field, entry.get(key), bases, recipe_dir)
                         for key, field in TEACHER_ENTRY_FIELDS.items() if key in entry}}
            if isinstance(entry, dict) else entry for entry in teachers]
    return {key: value for key, value in resolved.items() if key in values}


#: the path keys of a ``teachers`` entry, and the single-teacher field each one resolves like
TEACHER_ENTRY_FIELDS = {"model_name_or_path": "teacher_model_name_or_path", "teacher_cache": "teacher_cache"}


def _resolved(field: str, name, bases: tuple[str, ...], recipe_dir: str | None):
    if not isinstance(name, str) or not name:
        return name
    found = find_local(name, bases)
    if found is not None:
        return found
    producer = producing_recipe(name, recipe_dir) if recipe_dir else None
    if producer is not None or field in LOCAL_ONLY_FIELDS or looks_like_path(name):
        raise missing_path_error(field, name, bases, recipe_dir, producer)
    return name


def hub_names(values: dict) -> list[str]:
    """The input names of ``values`` that are neither existing paths nor path-like: they will be asked of the Hub."""
    return [v for f in INPUT_PATH_FIELDS if f not in LOCAL_ONLY_FIELDS and isinstance(v := values.get(f), str) and v
            and not os.path.exists(v) and not looks_like_path(v)]


def hub_is_offline() -> bool:
    """Whether huggingface_hub answers from its local cache only: ``HF_HUB_OFFLINE`` in the environment, or in
    huggingface_hub's constants once it is imported (it reads the variable at import time)."""
    import sys

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    constants = sys.modules.get("huggingface_hub.constants")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_is_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers at all (any HTTP status counts); False fast on a machine without network."""
    url = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout)  # noqa: S310
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True
