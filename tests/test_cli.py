"""A new user's first hour with `llmkd`: fast help, one-line errors, paths, offline Hubs, reproducible recipes.

Every `llmkd` command here runs as a user runs it (a subprocess of `python -m llmkd`), from a directory that is not
the repository root, unless the test is about the Python API.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading

import pytest
import yaml
from utils import make_tokenizer, prompt_completion_rows, tiny_bert_classifier, tiny_llama, write_local_run

from llmkd.paths import MissingPathError, hub_is_reachable, looks_like_path
from llmkd.recipes import load_recipe, parse_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def llmkd(*args, cwd, env=ENV, timeout=300):
    return subprocess.run([sys.executable, "-m", "llmkd", *args], capture_output=True, text=True, cwd=str(cwd),
                          env=env, timeout=timeout)


def _recipe(tmp_path, **fields) -> str:
    local = write_local_run(tmp_path)
    values = {"method": "kd", **local, "output_dir": str(tmp_path / "out"), "max_steps": 3,
              "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no",
              "report_to": "none", **fields}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


# ------------------------------------------------------------------------------------------------- help
def test_help_imports_no_heavy_library(tmp_path):
    code = ("import sys; from llmkd.cli import main; main(['--help']); "
            "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'deepspeed') if m in sys.modules); "
            "print('heavy:', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                            env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: llmkd" in result.stdout and "heavy: []" in result.stdout


def test_train_help_lists_the_methods_and_each_methods_fields(tmp_path):
    from llmkd.methods import METHODS

    result = llmkd("train", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for method in METHODS:
        assert f"  {method} " in result.stdout, method
    assert "--method taid --help" in result.stdout
    fields = llmkd("train", "--method", "taid", "--help", cwd=tmp_path)
    assert fields.returncode == 0
    assert "--t_start" in fields.stdout and "--schedule_loss" in fields.stdout and "--divergence" in fields.stdout
    assert "--per_device_train_batch_size" not in fields.stdout  # TrainingArguments' own fields are pointed to
    assert "TrainingArguments" in fields.stdout


# --------------------------------------------------------------------------------------- one-line errors
def _one_line_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].endswith("[traceback: --debug]")
    return lines[0]


def test_a_stage_that_has_not_run_yet_is_named(tmp_path):
    result = llmkd("train", "--config", os.path.join(ROOT, "recipes", "moe", "tiny-llm-d2s.yaml"), cwd=tmp_path)
    line = _one_line_error(result)
    assert line.startswith("llmkd train: MissingPathError: model_name_or_path 'outputs/moe-tiny-llm-d2d' does not")
    assert "It is the output_dir of" in line and "tiny-llm-d2d.yaml" in line
    assert "huggingface.co" not in result.stderr


def test_errors_say_what_is_wrong_in_one_line(tmp_path):
    recipe = _recipe(tmp_path)
    line = _one_line_error(llmkd("train", "--config", recipe, "--max_steps", "ten", cwd=tmp_path))
    assert "RecipeError: Invalid value on the command line" in line and "'ten'" in line

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    line = _one_line_error(llmkd("train", "--config", recipe, "--dataset_name", str(empty), cwd=tmp_path))
    assert "The dataset is empty (0 rows" in line and "empty.jsonl" in line

    line = _one_line_error(llmkd("train", "--config", recipe, "--dataset_name", "data/absent.jsonl", cwd=tmp_path))
    assert "MissingPathError: dataset_name 'data/absent.jsonl' does not exist" in line
    assert str(tmp_path / "data" / "absent.jsonl") in line

    line = _one_line_error(llmkd("train", "--config", recipe, "--resume_from_checkpoint", "latest", cwd=tmp_path))
    assert "holds no complete checkpoint-N folder" in line and "--resume_from_checkpoint auto" in line

    line = _one_line_error(llmkd("train", cwd=tmp_path))
    assert "needs --config RECIPE.yaml" in line

    line = _one_line_error(llmkd("train", "--config", recipe, "--teacher_model_name_or_path", "./teacher-v2",
                                 cwd=tmp_path))
    assert "teacher_model_name_or_path './teacher-v2' does not exist" in line

    debug = llmkd("train", "--config", recipe, "--max_steps", "ten", "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_a_hub_name_on_a_machine_without_network_fails_at_once(tmp_path):
    """No HF_HUB_OFFLINE: the Hub is probed once (a closed port here), then only the local cache is used."""
    closed = _closed_port()
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed}", HF_HOME=str(tmp_path / "hf-home"))
    recipe = _recipe(tmp_path, teacher_model_name_or_path="nobody/teacher-7b")
    result = llmkd("train", "--config", recipe, cwd=tmp_path, env=env, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "cannot be reached" in lines[0] and "'nobody/teacher-7b'" in lines[0]
    assert lines[-1].startswith("llmkd train: ModelLoadError: The teacher model 'nobody/teacher-7b' is not a local")
    assert "hf download nobody/teacher-7b" in lines[-1]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def test_hub_is_reachable_tells_a_server_from_no_server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server's name
            self.send_response(404)  # any answer counts
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert hub_is_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert not hub_is_reachable(f"http://127.0.0.1:{_closed_port()}", timeout=2)


# ------------------------------------------------------------------------------------------ paths
def test_names_that_can_only_be_paths():
    for name in ("./model", "../data/train.jsonl", "/abs/model", "~/model", "a/b/c", "data.jsonl", "x\\y"):
        assert looks_like_path(name), name
    for name in ("Qwen/Qwen2.5-0.5B", "gpt2", "trl-lib/Capybara", "outputs/moe-tiny-llm-d2d"):
        assert not looks_like_path(name), name


def test_relative_paths_resolve_from_the_recipe_folder_then_the_current_directory(tmp_path, monkeypatch):
    recipes, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    recipes.mkdir()
    elsewhere.mkdir()
    (recipes / "data.jsonl").write_text("{}\n")
    (elsewhere / "data.jsonl").write_text("{}\n")
    (elsewhere / "only-here.jsonl").write_text("{}\n")
    recipe = recipes / "r.yaml"
    monkeypatch.chdir(elsewhere)

    def resolved(fields, overrides=()):
        recipe.write_text(yaml.safe_dump({"method": "kd", "output_dir": "out", **fields}))
        return load_recipe(str(recipe), list(overrides))

    run = resolved({"dataset_name": "data.jsonl", "model_name_or_path": "Qwen/Qwen2.5-0.5B"})
    assert run.config.dataset_name == str(recipes / "data.jsonl")  # the recipe's folder first
    assert run.config.model_name_or_path == "Qwen/Qwen2.5-0.5B"  # a Hub id stays one
    assert run.effective["output_dir"] == str(elsewhere / "out")  # outputs: the current directory
    assert resolved({"dataset_name": "only-here.jsonl"}).config.dataset_name == str(elsewhere / "only-here.jsonl")
    override = resolved({"dataset_name": "only-here.jsonl"}, ["--dataset_name", "data.jsonl"])
    assert override.config.dataset_name == str(elsewhere / "data.jsonl")  # the command line: the current directory
    assert override.effective["dataset_name"] == str(elsewhere / "data.jsonl")
    with pytest.raises(MissingPathError, match=r"dataset_name 'data/missing.jsonl' does not exist \(looked for "):
        resolved({"dataset_name": "data/missing.jsonl"})
    with pytest.raises(MissingPathError, match="teacher_cache"):
        resolved({"teacher_cache": "caches/tiny"})  # never a Hub id


def test_parse_overrides_reads_values_as_the_command_line_gives_them():
    assert parse_overrides(["--max_steps", "5", "--kd_ratio=0.3", "--lora_target_modules", "q", "v", "--bf16",
                            "--output_dir", "out"]) == {
        "max_steps": 5, "kd_ratio": 0.3, "lora_target_modules": ["q", "v"], "bf16": True, "output_dir": "out"}


def test_a_missing_model_folder_is_named_by_the_python_api(tmp_path):
    from llmkd.loading import ModelLoadError, load_causal_lm

    with pytest.raises(ModelLoadError, match=r"The teacher model './teacher-v2' does not exist"):
        load_causal_lm("./teacher-v2", role="teacher")


def test_the_data_is_checked_before_the_models_load(tmp_path, monkeypatch):
    import llmkd.loading as loading
    from llmkd import DistillConfig, DistillTrainer

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(loading, "load_causal_lm", no_loading)
    monkeypatch.setattr(loading, "init_causal_lm_from_config", no_loading)
    local = write_local_run(tmp_path)
    args = DistillConfig(output_dir=str(tmp_path / "out"), model_name_or_path=local["model_name_or_path"],
                         teacher_model_name_or_path=local["teacher_model_name_or_path"],
                         dataset_name=str(tmp_path / "absent" / "train.jsonl"), report_to="none")
    with pytest.raises(MissingPathError, match="does not exist"):
        DistillTrainer(args=args)


# ------------------------------------------------------------------------- the run, the recipe copy
def test_the_saved_recipe_reproduces_the_run(tmp_path):
    """Overrides and relative paths survive into llmkd_recipe.yaml; rerun from another directory, it gives the same
    losses. Both runs: one process, one thread, same machine: the same operations on the same bits, so equal."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    local = write_local_run(first_dir)
    (first_dir / "recipe.yaml").write_text(yaml.safe_dump({
        "method": "kd", "model_name_or_path": "student", "teacher_model_name_or_path": "teacher",
        "dataset_name": "train.jsonl", "output_dir": "out", "max_steps": 2, "per_device_train_batch_size": 4,
        "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "report_to": "none"}))
    assert os.path.isdir(local["model_name_or_path"])
    first = llmkd("train", "--config", "recipe.yaml", "--max_steps", "4", "--kd_ratio", "0.8", cwd=first_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = first_dir / "out" / "llmkd_recipe.yaml"
    effective = yaml.safe_load(saved.read_text())
    assert effective["max_steps"] == 4 and effective["kd_ratio"] == 0.8
    assert effective["model_name_or_path"] == str(first_dir / "student")
    assert effective["output_dir"] == str(first_dir / "out")
    assert "--max_steps 4" in saved.read_text()  # the command, in the header
    done = [line for line in first.stdout.splitlines() if line.startswith("llmkd train: done.")]
    assert len(done) == 1 and str(first_dir / "out") in done[0] and "README.md" in done[0]
    for noise in ("gemm_4bit_forward", "pin_memory", "Setting accelerator to CPU"):
        assert noise not in first.stdout + first.stderr, noise

    second = llmkd("train", "--config", str(saved), "--output_dir", str(second_dir / "again"), cwd=second_dir)
    assert second.returncode == 0, second.stderr[-3000:]

    def losses(folder):
        history = json.loads((folder / "log_history.json").read_text())
        return [(e["step"], e["loss"], e["kd_loss"], e["ce_loss"]) for e in history if "loss" in e]

    assert len(losses(first_dir / "out")) == 4
    assert losses(second_dir / "again") == losses(first_dir / "out")


def test_resume_says_which_checkpoint_and_auto_starts_fresh_when_there_is_none(tmp_path):
    recipe = _recipe(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    fresh = llmkd("train", "--config", recipe, "--resume_from_checkpoint", "auto", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "no checkpoint in" in fresh.stderr and "starting a new run" in fresh.stderr
    resumed = llmkd("train", "--config", recipe, "--resume_from_checkpoint", "latest", "--max_steps", "3",
                    cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {tmp_path / 'out' / 'checkpoint-2'}" in resumed.stderr
    steps = [e["step"] for e in json.loads((tmp_path / "out" / "log_history.json").read_text()) if "loss" in e]
    assert steps == [1, 2, 3]  # 1-2 restored with the checkpoint's state, 3 trained after the resume


# ---------------------------------------------------------------------------- checks before training
def _train(tmp_path, student, teacher, rows, **fields):
    from llmkd import DistillConfig, DistillTrainer

    tokenizer = make_tokenizer()
    args = DistillConfig(**{"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 2,
                            "report_to": "none", "use_cpu": True, **fields})
    return DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                          processing_class=tokenizer, teacher_processing_class=tokenizer)


def test_rows_longer_than_the_models_positions_are_refused(tmp_path):
    vocab = len(make_tokenizer())
    long_rows = [{"prompt": "one two three four five " * 4, "completion": " six seven eight nine ten " * 4}] * 4
    short = tiny_llama(vocab, seed=1, max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"rows of up to \d+ tokens \(max_length 1024\), more than the models' "
                                         r"positions \(the student has 32, the teacher has 256"):
        _train(tmp_path, short, tiny_llama(vocab, seed=2), long_rows)
    # rows that fit pass whatever max_length says; max_length <= the positions is never measured
    _train(tmp_path, tiny_llama(vocab, seed=1, max_position_embeddings=32), tiny_llama(vocab, seed=2),
           prompt_completion_rows(4), max_length=1024)
    _train(tmp_path, tiny_llama(vocab, seed=1, max_position_embeddings=32), tiny_llama(vocab, seed=2), long_rows,
           max_length=32)

    from datasets import Dataset

    bert_rows = Dataset.from_list([{"sentence": "the cat sat on the mat " * 20, "label": i % 2} for i in range(4)])
    with pytest.raises(ValueError, match="the student has 64, the teacher has 64"):
        _train(tmp_path, tiny_bert_classifier(vocab, seed=1, max_position_embeddings=64),
               tiny_bert_classifier(vocab, seed=2, max_position_embeddings=64), bert_rows, max_length=256)


def test_a_warmup_as_long_as_the_run_is_said(tmp_path, caplog):
    vocab = len(make_tokenizer())
    trainer = _train(tmp_path, tiny_llama(vocab, seed=1), tiny_llama(vocab, seed=2), prompt_completion_rows(4),
                     warmup_steps=75, max_steps=5)
    with caplog.at_level(logging.WARNING, logger="llmkd.trainers.guards"):
        trainer.create_optimizer_and_scheduler(num_training_steps=5)
    assert "The warmup (75 steps) is as long as the whole run (5 steps)" in caplog.text


def test_recipes_run_from_any_directory(tmp_path):
    """The shipped tiny recipe, from a directory that is not the repository root (paths relative to the recipe)."""
    result = llmkd("train", "--config", os.path.join(ROOT, "recipes", "kd", "tiny.yaml"), "--max_steps", "2",
                   "--logging_steps", "1", "--report", "False", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "outputs" / "kd-tiny" / "model.safetensors").exists()  # outputs: the current directory
    shutil.rmtree(tmp_path / "outputs")
