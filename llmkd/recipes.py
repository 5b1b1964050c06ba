"""Recipes: flat YAML files whose keys are the fields of a method's config, plus ``method:``.

    method: kd
    model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
    teacher_model_name_or_path: Qwen/Qwen2.5-7B-Instruct
    dataset_name: trl-lib/Capybara
    learning_rate: 2.0e-5

Command-line overrides (``--learning_rate 1e-4``) win over the file. Unknown keys are an error that names the key
and the closest valid one. Files are read with ``yaml.safe_load`` (no arbitrary Python objects).

Relative input paths (models, data, a teacher cache) are looked up in the recipe's folder first, then in the
current directory; outputs are relative to the current directory (:mod:`llmkd.paths`). ``llmkd train`` saves the
effective recipe (overrides applied, paths absolute) as ``llmkd_recipe.yaml`` next to the model: rerunning it
reproduces the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from typing import Any

import yaml

from .methods import METHODS, method_entry


class RecipeError(ValueError):
    """A recipe (or an override) is invalid."""


def read_recipe(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise RecipeError(f"Recipe {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        try:
            content = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise RecipeError(f"Recipe {path!r} is not valid YAML: {error}") from error
    if content is None:
        content = {}
    if not isinstance(content, dict):
        raise RecipeError(f"Recipe {path!r} must be a mapping of config fields, got {type(content).__name__}.")
    return content


def _field_names(config_class) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class) if f.init]


def check_keys(keys, config_class, source: str) -> None:
    valid = _field_names(config_class)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"Unknown key {key!r} in {source} for {config_class.__name__}.{hint}")


def _as_arguments(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value):
            argv.extend([f"--{key}", json.dumps(list(value))])  # a list of mappings (teachers): one JSON value
        elif isinstance(value, (list, tuple)):
            argv.append(f"--{key}")
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.extend([f"--{key}", json.dumps(value)])
        else:
            argv.extend([f"--{key}", str(value)])
    return argv


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["--max_steps", "5", "--kd_ratio=0.3", "--lora_target_modules", "q", "v"]`` -> ``{"max_steps": 5,
    "kd_ratio": 0.3, "lora_target_modules": ["q", "v"]}`` (each value read as a YAML scalar; a flag alone is True)."""
    parsed: dict[str, Any] = {}
    key = None
    for item in overrides:
        if item.startswith("--"):
            name, has_value, value = item[2:].partition("=")
            key = name.replace("-", "_")
            parsed[key] = [value] if has_value else []
            if has_value:
                key = None
        elif key is not None:
            parsed[key].append(item)
        else:
            raise RecipeError(f"Unexpected argument {item!r} on the command line: overrides are --field value.")

    def scalar(text: str):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, (str, int, float, bool)) else text

    return {k: (True if not v else scalar(v[0]) if len(v) == 1 else [scalar(x) for x in v]) for k, v in parsed.items()}


@dataclasses.dataclass
class Recipe:
    """A recipe as ``llmkd train`` runs it.

    ``effective`` is what reproduces the run: the file's settings with the command-line overrides applied and every
    local input path absolute (``output_dir`` too): :func:`write_effective_recipe` saves it as ``llmkd_recipe.yaml``.
    """

    method: str
    config: Any
    effective: dict[str, Any]
    source: str | None
    overrides: list[str]


def _blamed_source(error: Exception, path: str | None, override_keys) -> str:
    text = str(error)
    for key in override_keys:
        if f"--{key}" in text:
            return "on the command line"
    return f"in recipe {path!r}" if path else "in the config"


def load_recipe(path: str | None, overrides: list[str] | None = None, method: str | None = None,
                resolve_paths: bool = True, output_fields: tuple[str, ...] = ()) -> Recipe:
    """Parse a recipe plus command-line overrides into a :class:`Recipe` (method, config, effective settings).

    Types are checked by the config's argument parser (``learning_rate: abc`` is an error naming the field and
    where it came from). With ``resolve_paths``, relative input paths are looked up in the recipe's folder, then
    the current directory (overrides: the current directory first), and a missing local path is a
    :class:`~llmkd.paths.MissingPathError` (:mod:`llmkd.paths`) raised before anything is loaded. A value the
    command line overrides is not looked up. ``output_fields`` names input-path fields that this command writes
    instead of reading (``teacher_cache`` for ``llmkd cache-teacher``): they are made absolute from the current
    directory, like ``output_dir``.
    """
    from transformers import HfArgumentParser

    from .paths import OUTPUT_PATH_FIELDS, resolve_input_paths

    overrides = list(overrides or [])
    values = read_recipe(path) if path else {}
    method = method or values.pop("method", None) or "kd"
    values.pop("method", None)
    entry = method_entry(method)
    config_class = entry.config_class
    override_values = parse_overrides(overrides)
    check_keys(values.keys(), config_class, f"recipe {path!r}" if path else "the config")
    check_keys(override_values.keys(), config_class, "the command line")
    if resolve_paths:
        recipe_dir = os.path.dirname(os.path.abspath(path)) if path else None
        here = os.getcwd()
        from_file = {k: v for k, v in values.items() if k not in override_values and k not in output_fields}
        values.update(resolve_input_paths(from_file, (recipe_dir, here) if recipe_dir else (here,), recipe_dir))
        from_line = {k: v for k, v in override_values.items() if k not in output_fields}
        resolved_overrides = {**override_values,
                              **resolve_input_paths(from_line, (here, recipe_dir) if recipe_dir else (here,))}
        overrides = overrides + _as_arguments({k: v for k, v in resolved_overrides.items()
                                               if v != override_values[k]})
        override_values = resolved_overrides
    none_keys = [k for k, v in values.items() if v is None]
    parser = HfArgumentParser(config_class, exit_on_error=False)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=_as_arguments(values) + overrides)
    except (argparse.ArgumentError, ValueError, TypeError) as error:
        raise RecipeError(f"Invalid value {_blamed_source(error, path, override_values)}: {error}") from error
    for key in none_keys:
        setattr(config, key, None)
    effective = {"method": method, **values, **override_values}
    for key in (*OUTPUT_PATH_FIELDS, *output_fields):
        if isinstance(effective.get(key), str):
            effective[key] = os.path.abspath(os.path.expanduser(effective[key]))
    return Recipe(method, config, effective, os.path.abspath(path) if path else None, overrides)


def load_config(path: str | None, overrides: list[str] | None = None, method: str | None = None,
                resolve_paths: bool = True, output_fields: tuple[str, ...] = ()):
    """``(method, config)`` of :func:`load_recipe`."""
    recipe = load_recipe(path, overrides, method, resolve_paths, output_fields)
    return recipe.method, recipe.config


def write_effective_recipe(recipe: Recipe, folder: str, command: str | None = None) -> str:
    """Save ``recipe.effective`` as ``folder/llmkd_recipe.yaml``: ``llmkd train --config`` on it reruns the run."""
    path = os.path.join(folder, "llmkd_recipe.yaml")
    header = ["# The effective settings of this run (the recipe, the command-line overrides applied, local paths",
              "# absolute). Rerun it with:  llmkd train --config llmkd_recipe.yaml --output_dir NEW_FOLDER"]
    if recipe.source:
        header.append(f"# from: {recipe.source}")
    if command:
        header.append(f"# command: {command}")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(header) + "\n")
        yaml.safe_dump(recipe.effective, handle, sort_keys=False, allow_unicode=True)
    return path


__all__ = ["RecipeError", "Recipe", "load_config", "load_recipe", "parse_overrides", "read_recipe", "check_keys",
           "write_effective_recipe", "METHODS"]
