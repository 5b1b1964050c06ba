"""The training report: report.html and valid PNGs for the losses, every method curve (TAID's t, MoE expert loads,
...) and the evaluation; and the end of ``llmkd train`` (evaluation, report, card) on a tiny TAID run."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from llmkd.cli import main as cli_main
from llmkd.report import method_curves, report_plots, write_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "llmkd", "assets", "quickstart")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_history(steps: int = 6) -> list[dict]:
    history = []
    for step in range(1, steps + 1):
        history.append({"loss": 2.0 / step, "kd_loss": 1.0 / step, "ce_loss": 1.5 / step, "taid_t": 0.4 + 0.1 * step,
                        "learning_rate": 1e-3, "grad_norm": 1.0, "epoch": step / steps, "step": step,
                        **{f"moe_load_e{e}": (e + step) / 10 for e in range(4)}})  # as MoE runs log
        if step % 3 == 0:
            history.append({"eval_loss": 2.5 / step, "eval_kd_loss": 1.2 / step, "eval_runtime": 0.1, "step": step,
                            "epoch": step / steps})
    history.append({"train_runtime": 1.0, "train_loss": 1.0, "total_flos": 10.0, "step": steps})
    return history


def assert_valid_png(path: str) -> tuple[int, int]:
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()  # checks the chunks and their CRCs
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width > 100 and image.height > 100
        # not a blank canvas: a plot has more than a couple of colours
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 5
        return image.size


def test_method_curves_are_every_non_standard_numeric_key():
    groups = method_curves(synthetic_history())
    assert groups == {"kd_loss": ["kd_loss", "eval_kd_loss"], "ce_loss": ["ce_loss"], "taid_t": ["taid_t"],
                      "moe_load_e_N": [f"moe_load_e{e}" for e in range(4)]}


def test_report_files_and_valid_pngs(tmp_path):
    results = {"student": {"model": "s", "scores": {"llmkd_addition_choice": {
        "metrics": {"acc": 0.5}, "higher_is_better": {"acc": True}, "samples": 8, "kind": "lm-eval"}}},
        "teacher": {"model": "t", "scores": {"llmkd_addition_choice": {
            "metrics": {"acc": 0.8}, "higher_is_better": {"acc": True}, "samples": 8, "kind": "lm-eval"}}},
        "retention": {"llmkd_addition_choice": {"acc": 0.625}}, "settings": {}}
    history = synthetic_history()
    path = write_report(str(tmp_path), history, results=results,
                        summary={"method": "taid", "teacher": "<b>t</b>", "hyperparameters": {"t_start": 0.4}})
    assert path == str(tmp_path / "report.html")
    plots = report_plots(str(tmp_path))
    assert plots == ["report/ce_loss.png", "report/evaluation.png", "report/kd_loss.png", "report/losses.png",
                     "report/moe_load_e_N.png", "report/taid_t.png"]
    for plot in plots:
        assert_valid_png(str(tmp_path / plot))
    page = (tmp_path / "report.html").read_text()
    for plot in plots:
        assert f"<img src='{plot}'" in page
    assert "&lt;b&gt;t&lt;/b&gt;" in page and "<b>t</b>" not in page  # values are escaped
    assert "<td>0.6250</td>" in page  # the retention of the evaluation table
    assert "learning_rate.png" not in page and "grad_norm" not in " ".join(plots)
    assert json.loads((tmp_path / "log_history.json").read_text()) == history


def test_report_without_logs_or_evaluation(tmp_path):
    write_report(str(tmp_path), [])
    assert report_plots(str(tmp_path)) == []
    assert "Nothing was logged" in (tmp_path / "report.html").read_text()


@pytest.fixture(scope="module")
def taid_run(tmp_path_factory):
    """A 6-step TAID run of the offline recipe, with end-of-training evaluation on the three local tasks."""
    out = tmp_path_factory.mktemp("taid") / "run"
    code = cli_main([
        "train", "--config", os.path.join(ROOT, "recipes", "taid", "tiny.yaml"), "--output_dir", str(out),
        "--model_name_or_path", os.path.join(ASSETS, "student"),
        "--teacher_model_name_or_path", os.path.join(ASSETS, "teacher"),
        "--dataset_name", os.path.join(ROOT, "recipes", "data", "addition_train.jsonl"),
        "--max_steps", "6", "--logging_steps", "2", "--per_device_train_batch_size", "16", "--use_cpu", "True",
        "--eval_tasks", "llmkd_addition_exact_match,llmkd_addition_choice,llmkd_addition_perplexity",
        "--eval_limit", "6",
    ])
    assert code == 0
    return out


def test_train_leaves_evaluation_report_and_card(taid_run):
    out = taid_run
    results = json.loads((out / "results.json").read_text())
    assert list(results["student"]["scores"]) == ["llmkd_addition_exact_match", "llmkd_addition_choice",
                                                  "llmkd_addition_perplexity"]
    teacher_em = results["teacher"]["scores"]["llmkd_addition_exact_match"]["metrics"]["exact_match"]
    assert teacher_em == 1.0  # the shipped teacher adds
    assert results["retention"]["llmkd_addition_exact_match"]["exact_match"] == \
        results["student"]["scores"]["llmkd_addition_exact_match"]["metrics"]["exact_match"]
    assert results["settings"]["limit"] == 6
    plots = report_plots(str(out))
    assert {"report/losses.png", "report/taid_t.png", "report/kd_loss.png", "report/evaluation.png"} <= set(plots)
    for plot in plots:
        assert_valid_png(str(out / plot))
    history = json.loads((out / "log_history.json").read_text())
    assert [entry["taid_t"] for entry in history if "taid_t" in entry]  # the curve had data
    summary = json.loads((out / "llmkd_run.json").read_text())
    assert summary["method"] == "taid" and summary["hyperparameters"]["t_start"] == 0.4
    assert summary["hyperparameters"]["max_steps"] == 6  # the command-line override, not the recipe's 1500
    card = (out / "README.md").read_text()
    assert "method: taid" in card and "![taid_t](report/taid_t.png)" in card
    assert (out / "llmkd_recipe.yaml").is_file() and (out / "model.safetensors").is_file()


def test_report_can_be_turned_off(tmp_path):
    out = tmp_path / "run"
    code = cli_main([
        "train", "--config", os.path.join(ROOT, "recipes", "kd", "tiny.yaml"), "--output_dir", str(out),
        "--model_name_or_path", os.path.join(ASSETS, "student"),
        "--teacher_model_name_or_path", os.path.join(ASSETS, "teacher"),
        "--dataset_name", os.path.join(ROOT, "recipes", "data", "addition_train.jsonl"),
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--use_cpu", "True", "--report", "False",
    ])
    assert code == 0
    assert not (out / "report.html").exists() and not (out / "results.json").exists()
    assert (out / "README.md").is_file() and (out / "llmkd_run.json").is_file()


def test_finish_run_for_the_moe_and_preference_trainers(tmp_path):
    """The end of a run works for any llmkd trainer: MoEMimicTrainer (its per-expert load curves grouped in one
    plot) and PreferenceDistillTrainer (a TRL DPOTrainer; the teacher is its ref_model)."""
    import random

    from datasets import Dataset
    from utils import make_tokenizer, prompt_completion_rows, tiny_llama

    from llmkd import MoEMimicConfig, MoEMimicTrainer, PreferenceDistillConfig, PreferenceDistillTrainer
    from llmkd.finish import finish_run

    tokenizer = make_tokenizer()
    common = dict(per_device_train_batch_size=4, max_steps=3, logging_steps=1, save_strategy="no", report_to="none",
                  disable_tqdm=True, use_cpu=True, eval_tasks="llmkd_addition_choice", eval_limit=4)
    moe = MoEMimicTrainer(model=tiny_llama(len(tokenizer), seed=1), teacher_model=tiny_llama(len(tokenizer), 48, seed=2),
                          args=MoEMimicConfig(output_dir=str(tmp_path / "moe"), loss_chunk_size=16, **common),
                          train_dataset=Dataset.from_list(prompt_completion_rows(16)), processing_class=tokenizer)
    moe.train()
    moe.save_model()
    done = finish_run(moe)
    assert "report/moe_load_e_N.png" in report_plots(str(tmp_path / "moe"))
    assert_valid_png(str(tmp_path / "moe" / "report" / "moe_load_e_N.png"))
    assert set(done["results"]["retention"]) == {"llmkd_addition_choice"}
    assert json.loads((tmp_path / "moe" / "llmkd_run.json").read_text())["method"] == "moe_mimic"

    rng = random.Random(0)
    names = ["one", "two", "three", "four", "five", "the"]
    rows = []
    for _ in range(12):
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        rows.append({"prompt": f"what is {names[a]} add {names[b]}", "chosen": f" sum is {names[(a + b) % 6]}",
                     "rejected": f" sum is {names[(a + b + 1) % 6]}"})
    preference = PreferenceDistillTrainer(
        model=tiny_llama(len(tokenizer), seed=1), teacher_model=tiny_llama(len(tokenizer), seed=2),
        args=PreferenceDistillConfig(output_dir=str(tmp_path / "pref"), beta=0.1, **common),
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    preference.train()
    preference.save_model()
    done = finish_run(preference)
    teacher_scores = done["results"]["teacher"]["scores"]["llmkd_addition_choice"]["metrics"]
    assert 0.0 <= teacher_scores["acc"] <= 1.0  # the teacher (the DPO reference model) was scored
    plots = report_plots(str(tmp_path / "pref"))
    assert "report/losses.png" in plots and any("rewards" in p for p in plots), plots
    card = (tmp_path / "pref" / "README.md").read_text()
    assert "method: preference" in card and "beta: 0.1" in card


def test_unknown_eval_task_fails_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli_main(["train", "--config", os.path.join(ROOT, "recipes", "kd", "tiny.yaml"), "--output_dir", str(out),
                     "--model_name_or_path", os.path.join(ASSETS, "student"),
                     "--teacher_model_name_or_path", os.path.join(ASSETS, "teacher"),
                     "--dataset_name", os.path.join(ROOT, "recipes", "data", "addition_train.jsonl"),
                     "--max_steps", "2", "--use_cpu", "True", "--eval_tasks", "llmkd_addition_choise"])
    assert code == 2
    assert "llmkd train: EvaluationError:" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


@pytest.mark.distributed
def test_end_of_training_evaluation_under_zero3_reloads_the_sharded_models(tmp_path):
    """Under ZeRO-3 (2 CPU processes) student and teacher are partitioned: the main process re-loads them from
    output_dir and teacher_model_name_or_path, and scores what a later `llmkd eval` of the saved folder scores."""
    import subprocess
    import sys

    import yaml

    pytest.importorskip("deepspeed", reason="ZeRO-3 needs deepspeed (extra 'deepspeed')")
    from distributed.launcher import CHILD_ENV, TESTS_DIR, free_port
    from utils import write_local_run

    local = write_local_run(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "kd", **local, "output_dir": str(tmp_path / "out"), "max_steps": 2,
        "per_device_train_batch_size": 2, "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no",
        "disable_tqdm": True, "eval_tasks": "llmkd_addition_choice", "eval_limit": 4,
    }))
    patch_dir = tmp_path / "patch"
    patch_dir.mkdir()
    (patch_dir / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "from distributed.launcher import patch_accelerate_cpu_backend\npatch_accelerate_cpu_backend()\n")
    env = dict(os.environ, **CHILD_ENV, PYTHONPATH=f"{patch_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "recipes", "accelerate", "zero3.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "llmkd", "train",
               "--config", str(recipe)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, cwd=str(tmp_path))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "README.md").is_file()
    again = tmp_path / "again"
    assert cli_main(["eval", "--model", str(tmp_path / "out"), "--teacher", local["teacher_model_name_or_path"],
                     "--tasks", "llmkd_addition_choice", "--limit", "4", "--output_dir", str(again),
                     "--device", "cpu"]) == 0
    reference = json.loads((again / "results.json").read_text())
    for part in ("student", "teacher"):
        assert results[part]["scores"] == reference[part]["scores"], part
