"""`llmkd quickstart`: the shipped teacher is really trained, and a short run produces a table, a student that loads
back with the Auto classes, and PNG loss curves. Offline (conftest sets HF_HUB_OFFLINE=1), CPU, under a minute."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkd import DistillTrainer, TAIDTrainer
from llmkd.cli import main as cli_main
from llmkd.quickstart.evaluate import completion_perplexity, exact_match
from llmkd.quickstart.run import METHOD_SETTINGS, asset_path, format_table, new_student, parse_args, run
from llmkd.quickstart.task import is_held_out, make_split, make_tokenizer

# scripts/make_quickstart_teacher.py measured exact match 1.0000 and completion perplexity 1.0700 on 2000 held-out
# rows (the perplexity is above 1 because the teacher learned the 30% label noise of its training data).
TEACHER_MIN_EXACT_MATCH = 0.98
TEACHER_MAX_PERPLEXITY = 1.12
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("quickstart")
    args = parse_args(["--output_dir", str(output_dir), "--max_steps", "20", "--train_examples", "128",
                       "--held_out_examples", "128", "--seed", "3"])
    return run(args)


def test_task_splits_are_disjoint_and_deterministic():
    train, held_out = make_split("train", 500, seed=1), make_split("held_out", 500, seed=1)
    assert train == make_split("train", 500, seed=1)
    pairs = lambda rows: {row["prompt"] for row in rows}  # noqa: E731
    assert not pairs(train) & pairs(held_out)
    for row in train + held_out:
        a, b = (int(x[::-1]) for x in row["prompt"][:-1].split("+"))  # numbers are written lowest digit first
        assert int(row["completion"][::-1]) == a + b
        assert is_held_out(a, b) == (row in held_out)


def test_label_noise_changes_one_digit_of_the_chosen_fraction_of_training_answers():
    clean, noisy = make_split("train", 2000, seed=2), make_split("train", 2000, seed=2, label_noise=0.3)
    assert [row["prompt"] for row in clean] == [row["prompt"] for row in noisy]
    changed = [(c["completion"], n["completion"]) for c, n in zip(clean, noisy) if c != n]
    assert 0.25 < len(changed) / len(clean) < 0.35
    for right, wrong in changed:
        assert len(right) == len(wrong) and sum(a != b for a, b in zip(right, wrong)) == 1
    with pytest.raises(ValueError, match="only the train split can be noisy"):
        make_split("held_out", 10, seed=0, label_noise=0.1)


def test_tokenizer_is_character_level_and_prompt_is_a_prefix():
    tokenizer = make_tokenizer()
    prompt, completion = "743+985=", "639"
    ids = tokenizer(prompt + completion)["input_ids"]
    assert len(ids) == len(prompt + completion)
    assert ids[: len(prompt)] == tokenizer(prompt)["input_ids"]
    assert tokenizer.decode(ids) == prompt + completion
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None


def test_shipped_teacher_is_good_on_held_out_data():
    teacher_dir = asset_path("teacher")
    size = os.path.getsize(os.path.join(teacher_dir, "model.safetensors"))
    assert size < 8 * 2**20, f"the shipped teacher is {size / 2**20:.1f} MiB; keep it under 8 MiB"
    torch.set_num_threads(min(2, torch.get_num_threads()))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = make_split("held_out", 1000, seed=0)
    accuracy = exact_match(teacher, tokenizer, rows)
    perplexity = completion_perplexity(teacher, tokenizer, rows)
    assert accuracy >= TEACHER_MIN_EXACT_MATCH, f"teacher held-out exact match {accuracy:.3f}"
    assert perplexity <= TEACHER_MAX_PERPLEXITY, f"teacher held-out completion perplexity {perplexity:.3f}"


def test_students_start_from_the_same_weights_and_are_smaller():
    first, second = new_student(5), new_student(5)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    teacher = AutoModelForCausalLM.from_pretrained(asset_path("teacher"), use_safetensors=True)
    assert first.num_parameters() < teacher.num_parameters() / 4
    assert first.config.num_hidden_layers < teacher.config.num_hidden_layers
    assert first.config.vocab_size == teacher.config.vocab_size


def test_table_values_are_in_range(quickstart):
    results = quickstart["results"]
    with open(os.path.join(os.path.dirname(results["distilled_student_dir"]), "results.json")) as handle:
        assert json.load(handle) == results
    assert list(results["models"]) == ["teacher", "SFT student", "distilled student"]
    vocab_size = quickstart["student"].config.vocab_size
    for name, row in results["models"].items():
        assert 0.0 <= row["exact_match"] <= 1.0, name
        assert math.isfinite(row["perplexity"]) and 1.0 <= row["perplexity"] < 2 * vocab_size, (name, row)
    teacher, sft, distilled = results["models"].values()
    assert teacher["exact_match"] >= TEACHER_MIN_EXACT_MATCH - 0.05  # 128 rows only
    assert teacher["perplexity"] < min(sft["perplexity"], distilled["perplexity"])
    assert sft["parameters"] == distilled["parameters"] < teacher["parameters"]
    assert sft["train_seconds"] > 0 and distilled["train_seconds"] > 0
    assert results["wall_seconds"] > 0  # recorded; speed is not asserted in tests (machine load varies)
    table = format_table(results)
    for name in results["models"]:
        assert name in table


def test_distilled_student_loads_back_with_the_auto_classes(quickstart):
    student_dir = quickstart["results"]["distilled_student_dir"]
    assert os.path.exists(os.path.join(student_dir, "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(student_dir, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    texts = [row["prompt"] + row["completion"] for row in make_split("held_out", 8, seed=0)]
    encoded = tokenizer(texts, return_tensors="pt", padding=True)
    assert encoded["input_ids"].tolist() == quickstart["tokenizer"](texts, padding=True)["input_ids"]
    student = quickstart["student"].eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**encoded).logits, student(**encoded).logits, rtol=0, atol=0)


def test_loss_curves_are_png_images(quickstart):
    plots = quickstart["results"]["plots"]
    assert len(plots) == 2
    for path in plots:
        with open(path, "rb") as handle:
            data = handle.read()
        assert data[:8] == PNG_MAGIC, path
        assert data[12:16] == b"IHDR", path
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 300 and height >= 200, (path, width, height)
        assert len(data) > 10_000, f"{path} is only {len(data)} bytes"


def test_default_method_is_kd_with_its_recorded_settings(quickstart):
    assert parse_args([]).method == "kd"
    results, trainer = quickstart["results"], quickstart["trainer"]
    assert results["method"] == "kd" and results["method_settings"] == METHOD_SETTINGS["kd"]
    assert type(trainer) is DistillTrainer
    for field, value in METHOD_SETTINGS["kd"].items():
        assert getattr(trainer.args, field) == value, field


def test_taid_method_runs_with_its_settings_and_schedule(tmp_path):
    out = run(parse_args(["--output_dir", str(tmp_path), "--method", "taid", "--max_steps", "6", "--train_examples",
                          "64", "--held_out_examples", "16", "--batch_size", "16"]))
    results, trainer = out["results"], out["trainer"]
    assert type(trainer) is TAIDTrainer
    assert results["method"] == "taid" and results["method_settings"] == METHOD_SETTINGS["taid"]
    for field, value in METHOD_SETTINGS["taid"].items():
        assert getattr(trainer.args, field) == value, field
    ts = [entry["taid_t"] for entry in trainer.state.log_history if "taid_t" in entry]
    assert ts and ts[0] == pytest.approx(METHOD_SETTINGS["taid"]["t_start"])
    assert all(later >= earlier for earlier, later in zip(ts, ts[1:]))
    # the floor's 0-based step index reaches (max_steps - 1) / max_steps of the way to t_end at the last update
    settings = METHOD_SETTINGS["taid"]
    assert trainer.schedule.t >= settings["t_start"] + (settings["t_end"] - settings["t_start"]) * 5 / 6 - 1e-12
    assert 0.0 <= results["models"]["distilled student"]["exact_match"] <= 1.0


def test_on_policy_variant_samples_after_its_warm_start(tmp_path):
    out = run(parse_args(["--output_dir", str(tmp_path), "--method", "on_policy", "--max_steps", "6",
                          "--train_examples", "64", "--held_out_examples", "16", "--batch_size", "16"]))
    results, trainer = out["results"], out["trainer"]
    assert type(trainer) is DistillTrainer and results["method"] == "on_policy"
    assert results["method_settings"] == {**METHOD_SETTINGS["on_policy"], "off_policy_steps": 2}
    assert trainer.args.lmbda == 0.5 and trainer.args.off_policy_steps == 2
    fractions = [h["on_policy_fraction"] for h in trainer.state.log_history if "on_policy_fraction" in h]
    assert fractions[:2] == [0.0, 0.0] and sum(fractions[2:]) > 0, fractions
    assert 0.0 <= results["models"]["distilled student"]["exact_match"] <= 1.0


def test_unknown_method_fails_fast_with_the_available_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown method 'kdd'.*Did you mean 'kd'"):
        run(parse_args(["--output_dir", str(tmp_path), "--method", "kdd"]))


def test_cli_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["quickstart", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--output_dir", "--method", "--max_steps", "--seed"):
        assert option in out


# Measured 2026-12-02 (docs/QUICKSTART.md), 2-core CPU, seeds 0-6, held-out exact match:
#   SFT  0.859 / 0.826 / 0.153 / 0.900 / 0.854 / 0.809 / 0.820
#   kd   0.954 / 0.980 / 0.937 / 0.963 / 0.978 / 0.960 / 0.720   (the default; below SFT on seed 6)
# 1500 AdamW steps are chaotic: another machine's float order acts like another seed (with one torch thread instead
# of two, earlier runs changed which seeds failed). So the claim is held over seeds, not for one trajectory: seed 0
# must clear the bar, or else seed 1 must (measured per-seed failure rate of kd: 1 in 7).
SEEDS_TRIED = (0, 1)
MIN_EXACT_MATCH = 0.92  # the lowest successful seed above: 0.937
MIN_MARGIN_OVER_SFT = 0.03  # the smallest successful margin above: 0.064 (seed 3)


@pytest.mark.slow
def test_full_quickstart_distillation_beats_sft(tmp_path, capsys):
    """The default run (kd) through the CLI, about 1 to 2 minutes per seed on 2 idle CPU cores."""
    seen = []
    for seed in SEEDS_TRIED:
        output_dir = tmp_path / f"seed{seed}"
        assert cli_main(["quickstart", "--output_dir", str(output_dir), "--seed", str(seed)]) == 0
        assert "distilled student" in capsys.readouterr().out
        with open(output_dir / "results.json") as handle:
            models = json.load(handle)["models"]
        teacher, sft, distilled = (models[name] for name in ("teacher", "SFT student", "distilled student"))
        assert teacher["exact_match"] >= TEACHER_MIN_EXACT_MATCH
        seen.append((seed, sft, distilled))
        if (distilled["exact_match"] >= MIN_EXACT_MATCH
                and distilled["exact_match"] >= sft["exact_match"] + MIN_MARGIN_OVER_SFT
                and distilled["perplexity"] < sft["perplexity"]):
            return
    pytest.fail("the distilled student did not beat SFT on any seed tried: " + "; ".join(
        f"seed {seed}: exact match {d['exact_match']:.3f} vs SFT {s['exact_match']:.3f}, perplexity "
        f"{d['perplexity']:.3f} vs {s['perplexity']:.3f}" for seed, s, d in seen))
