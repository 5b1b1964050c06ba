"""Recipes and the command line: every shipped recipe validates; bad keys and values fail clearly; train runs."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import yaml
from utils import write_local_run

from llmkd.methods import method_entry
from llmkd.paths import INPUT_PATH_FIELDS, MissingPathError, producing_recipe
from llmkd.recipes import RecipeError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, "recipes", "**", "*.yaml"), recursive=True)
                        if os.sep + "accelerate" + os.sep not in p)
ACCELERATE_RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "accelerate", "*.yaml")))


def test_recipes_exist():
    names = {os.path.relpath(p, ROOT) for p in METHOD_RECIPES + ACCELERATE_RECIPES}
    expected = {"recipes/kd/tiny.yaml", "recipes/kd/qwen2.5-7b-to-0.5b.yaml", "recipes/sinkd/tiny-cls.yaml",
                "recipes/sinkd/tiny-lm.yaml", "recipes/sinkd/bert-base-to-6layer-sst2.yaml",
                "recipes/cross_tokenizer/tiny.yaml", "recipes/cross_tokenizer/llama3.1-8b-to-qwen2.5-0.5b.yaml"} | {
        f"recipes/accelerate/{n}.yaml" for n in ("ddp", "zero2", "zero3", "zero3_offload", "fsdp2")}
    assert expected <= names


@pytest.mark.parametrize("path", METHOD_RECIPES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_method_recipe_validates(path):
    """Field names and types of every recipe, without loading any model."""
    with open(path) as handle:
        raw = yaml.safe_load(handle)
    # GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine: validate everything else
    overrides = ["--bf16", "False"] if raw.get("bf16") else []
    recipe_dir = os.path.dirname(path)
    try:
        method, config = load_config(path, overrides)
    except MissingPathError as error:
        # a later stage reads an earlier stage's output_dir: the error names the recipe to run first
        producer = producing_recipe(raw["model_name_or_path"], recipe_dir)
        assert producer is not None and os.path.basename(producer) in str(error), error
        method, config = load_config(path, overrides, resolve_paths=False)
    raw.pop("bf16", None)
    assert method == raw.get("method", "kd")
    assert isinstance(config, method_entry(method).config_class)
    for key, value in raw.items():
        if key == "method":
            continue
        parsed = getattr(config, key)
        if isinstance(value, float) or isinstance(parsed, float):
            assert float(parsed) == pytest.approx(float(value)), key
        elif key == "report_to":
            continue
        elif key in INPUT_PATH_FIELDS and isinstance(value, str) and parsed != value:
            # a shipped input path is relative to the recipe's folder, and resolved to an absolute one
            assert parsed == os.path.normpath(os.path.join(recipe_dir, value)) and os.path.exists(parsed), key
        elif isinstance(value, (bool, int, str)) and not hasattr(parsed, "value"):
            assert parsed == value, key
    assert config.model_name_or_path and config.dataset_name
    assert config.teacher_model_name_or_path or config.teachers or config.teacher_server


@pytest.mark.parametrize("path", ACCELERATE_RECIPES, ids=os.path.basename)
def test_accelerate_configs_are_valid(path):
    with open(path) as handle:
        config = yaml.safe_load(handle)
    assert config["distributed_type"] in {"MULTI_GPU", "DEEPSPEED", "FSDP"}
    if config["distributed_type"] == "DEEPSPEED":
        assert config["deepspeed_config"]["zero_stage"] in (2, 3)
    if config["distributed_type"] == "FSDP":
        assert config["fsdp_config"]["fsdp_version"] == 2


def _write(tmp_path, content: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    path = _write(tmp_path, {"method": "kd", "learning_rat": 1e-4, "output_dir": str(tmp_path)})
    with pytest.raises(RecipeError, match=r"Unknown key 'learning_rat'.*Did you mean 'learning_rate'"):
        load_config(path)


def test_unknown_override_is_refused(tmp_path):
    path = _write(tmp_path, {"method": "kd", "output_dir": str(tmp_path)})
    with pytest.raises(RecipeError, match=r"'temprature'.*'temperature'"):
        load_config(path, ["--temprature", "2.0"])


def test_bad_value_type_names_the_field(tmp_path):
    path = _write(tmp_path, {"method": "kd", "learning_rate": "fast", "output_dir": str(tmp_path)})
    with pytest.raises(RecipeError, match="learning_rate"):
        load_config(path)


def test_unknown_method(tmp_path):
    path = _write(tmp_path, {"method": "kdd", "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"Unknown method 'kdd'.*Did you mean 'kd'"):
        load_config(path)


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("method: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_config(str(path))


def test_overrides_win_over_the_file(tmp_path):
    path = _write(tmp_path, {"method": "kd", "learning_rate": 1e-3, "output_dir": str(tmp_path),
                             "lora_target_modules": ["q_proj", "v_proj"]})
    _, config = load_config(path, ["--learning_rate", "5e-4", "--kd_ratio=0.25"])
    assert config.learning_rate == 5e-4 and config.kd_ratio == 0.25
    assert config.lora_target_modules == ["q_proj", "v_proj"]


def test_cli_train_on_a_local_recipe(tmp_path):
    local = write_local_run(tmp_path)
    recipe = _write(tmp_path, {
        "method": "kd", **local,
        "output_dir": str(tmp_path / "out"), "max_steps": 4, "per_device_train_batch_size": 4,
        "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no",
    })
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "llmkd", "train", "--config", recipe, "--kd_ratio", "0.8"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert yaml.safe_load((out / "llmkd_recipe.yaml").read_text())["method"] == "kd"
    assert "'kd_loss'" in result.stdout + result.stderr


def test_cli_reports_unknown_keys(tmp_path):
    recipe = _write(tmp_path, {"method": "kd", "teacher": "x", "output_dir": str(tmp_path)})
    result = subprocess.run([sys.executable, "-m", "llmkd", "train", "--config", recipe], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "Unknown key 'teacher'" in result.stderr


@pytest.mark.parametrize("recipe", ["recipes/kd/tiny.yaml", "recipes/kd/abkd-tiny.yaml", "recipes/taid/tiny.yaml",
                                    "recipes/sinkd/tiny-lm.yaml", "recipes/on_policy/tiny.yaml",
                                    "recipes/sinkd/tiny-cls.yaml", "recipes/cross_tokenizer/tiny.yaml"])
def test_tiny_recipe_trains_offline_from_the_repository_root(tmp_path, recipe):
    """The offline recipes as shipped, shortened to a few steps; the recipe copy is the effective recipe."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "llmkd", "train", "--config", recipe, "--max_steps", "4",
               "--logging_steps", "1", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    saved = yaml.safe_load((tmp_path / "out" / "llmkd_recipe.yaml").read_text())
    shipped = yaml.safe_load(open(os.path.join(ROOT, recipe)).read())
    assert saved["max_steps"] == 4 and saved["output_dir"] == str(tmp_path / "out")
    assert saved["teacher_model_name_or_path"] == os.path.normpath(
        os.path.join(ROOT, os.path.dirname(recipe), shipped["teacher_model_name_or_path"]))
    assert {k: v for k, v in saved.items() if k not in (*INPUT_PATH_FIELDS, "max_steps", "output_dir",
                                                        "logging_steps")} == \
        {k: v for k, v in shipped.items() if k not in (*INPUT_PATH_FIELDS, "max_steps", "output_dir",
                                                       "logging_steps")}
    assert result.stdout.count("'kd_loss'") + result.stderr.count("'kd_loss'") == 4


@pytest.mark.parametrize("recipe,names", [("recipes/multi_teacher/tiny-routed.yaml", ("carry", "no_carry")),
                                          ("recipes/multi_teacher/tiny-mixed.yaml", ("a", "b"))])
def test_multi_teacher_recipes_train_offline(tmp_path, recipe, names):
    """The several-teacher recipes as shipped, shortened: each log names every teacher's loss and tokens (mixed:
    each teacher scores every token)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "llmkd", "train", "--config", recipe, "--max_steps", "2", "--logging_steps", "1",
               "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    import ast

    logs = [ast.literal_eval(line) for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("{'loss'")]
    assert len(logs) == 2
    for entry in logs:
        tokens = [float(entry[f"tokens/{name}"]) for name in names]
        assert all(float(entry[f"kd_loss/{name}"]) > 0 for name in names) and all(t > 0 for t in tokens)
        if "mixed" in recipe:
            assert tokens[0] == tokens[1]


def test_on_policy_recipe_samples_after_its_warm_start(tmp_path):
    """recipes/on_policy/tiny.yaml with its warm start shortened to 2 of 6 steps: the first steps are off-policy,
    then half of the micro-batches (lmbda 0.5) are the student's samples."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "llmkd", "train", "--config", "recipes/on_policy/tiny.yaml", "--max_steps", "6",
               "--off_policy_steps", "2", "--logging_steps", "1", "--output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = json.loads((tmp_path / "out" / "log_history.json").read_text())
    fractions = [h["on_policy_fraction"] for h in logs if "on_policy_fraction" in h]
    assert len(fractions) == 6 and fractions[:2] == [0.0, 0.0] and sum(fractions[2:]) > 0, fractions
