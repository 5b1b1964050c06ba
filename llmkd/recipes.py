"""Recipes: flat YAML files whose keys are the fields of a method's config, plus ``method:``.

    method: kd
    model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
    teacher_model_name_or_path: Qwen/Qwen2.5-7B-Instruct
    dataset_name: trl-lib/Capybara
    learning_rate: 2.0e-5

Command-line overrides (``--learning_rate 1e-4``) win over the file. Unknown keys are an error that names the key
and the closest valid one. Files are read with ``yaml.safe_load`` (no arbitrary Python objects).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
from typing import Any

import yaml
from transformers import HfArgumentParser

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
        if isinstance(value, (list, tuple)):
            argv.append(f"--{key}")
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.extend([f"--{key}", json.dumps(value)])
        else:
            argv.extend([f"--{key}", str(value)])
    return argv


def _overrides_as_dict(overrides: list[str]) -> dict[str, Any]:
    keys = [item[2:].split("=", 1)[0].replace("-", "_") for item in overrides if item.startswith("--")]
    return {key: None for key in keys}


def load_config(path: str | None, overrides: list[str] | None = None, method: str | None = None):
    """Parse a recipe plus command-line overrides into ``(method, config)``.

    Types are checked by the config's argument parser (``learning_rate: abc`` is an error naming the field).
    """
    overrides = list(overrides or [])
    values = read_recipe(path) if path else {}
    method = method or values.pop("method", None) or "kd"
    values.pop("method", None)
    entry = method_entry(method)
    config_class = entry.config_class
    check_keys(values.keys(), config_class, f"recipe {path!r}" if path else "the config")
    check_keys(_overrides_as_dict(overrides).keys(), config_class, "the command line")
    none_keys = [k for k, v in values.items() if v is None]
    parser = HfArgumentParser(config_class, exit_on_error=False)
    try:
        (config,) = parser.parse_args_into_dataclasses(args=_as_arguments(values) + overrides)
    except (argparse.ArgumentError, ValueError, TypeError) as error:
        raise RecipeError(f"Invalid value in {path or 'the config'}: {error}") from error
    for key in none_keys:
        setattr(config, key, None)
    return method, config


__all__ = ["RecipeError", "load_config", "read_recipe", "check_keys", "METHODS"]
