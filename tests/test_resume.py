"""Exact resume (issue 8), for every trainer: a run SIGKILLed right after its step-4 checkpoint and resumed from it
gives the uninterrupted run's losses, logs, method state (TAID's schedule, DHO's alpha/beta, the MoE student's
router weights) and final weights (CPU, one thread, tolerance 1e-6).

The runs are made by tests/resume_worker.py in one subprocess (each run in a process of its own, forked after the
imports); the tests here compare what they wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from resume_worker import CASES, KILL_AT, MAX_STEPS

TOLERANCE = 1e-6
HERE = os.path.dirname(os.path.abspath(__file__))
# logged values that legitimately differ between runs, or cover the whole run (train_loss averages the steps the
# process ran)
UNCOMPARED = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos",
              "eval_runtime", "eval_samples_per_second", "eval_steps_per_second")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, os.path.join(HERE, "resume_worker.py"), str(root), *CASES], env=env,
                          cwd=os.path.dirname(HERE), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-5000:]
    status = json.loads((root / "status.json").read_text())
    return root, status, done.stderr


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def training_logs(final: dict) -> dict[int, dict]:
    """The per-step training logs (and evaluation logs) by step, without timings."""
    logs = {}
    for entry in final["log_history"]:
        kind = "eval" if any(key.startswith("eval_") for key in entry) else "train"
        kept = {k: v for k, v in entry.items() if k not in UNCOMPARED}
        if kind == "train" and "loss" not in kept:
            continue  # the end-of-training summary
        logs[(entry["step"], kind)] = kept
    return logs


@pytest.mark.parametrize("case", CASES)
def test_a_killed_and_resumed_run_equals_the_uninterrupted_run(runs, case):
    root, status, stderr = runs
    runs_of = status[case]
    assert runs_of["whole"] == {"exit": 0}, f"{case}: the uninterrupted run failed:\n{stderr[-4000:]}"
    assert runs_of["killed"].get("signal") == signal.SIGKILL, f"{case}: {runs_of['killed']}\n{stderr[-4000:]}"
    assert runs_of["resumed"] == {"exit": 0}, f"{case}: the resumed run failed:\n{stderr[-4000:]}"
    whole, killed, resumed = (root / case / which for which in ("whole", "killed", "resumed"))

    # the killed run died right after writing checkpoint-4, and did the same first steps as the whole run
    assert runs_of["killed"]["checkpoints"] == [f"checkpoint-{KILL_AT}"]
    assert not (killed / "weights.pt").exists()
    whole_losses, killed_losses, resumed_losses = (lines(r / "losses.jsonl") for r in (whole, killed, resumed))
    assert [s for s, _ in whole_losses] == sorted(s for s, _ in whole_losses) and whole_losses[-1][0] == MAX_STEPS
    early = [entry for entry in whole_losses if entry[0] <= KILL_AT]
    assert [s for s, _ in killed_losses] == [s for s, _ in early]
    assert [v for _, v in killed_losses] == pytest.approx([v for _, v in early], abs=TOLERANCE)

    # the resumed run ran only the steps after the checkpoint, with the same losses (same data, same weights)
    late = [entry for entry in whole_losses if entry[0] > KILL_AT]
    assert [s for s, _ in resumed_losses] == [s for s, _ in late]
    assert [v for _, v in resumed_losses] == pytest.approx([v for _, v in late], abs=TOLERANCE)

    # the same method state after each step (TAID's t/m/prev, DHO's alpha/beta) and at the end
    whole_states = {s: state for s, state in lines(whole / "states.jsonl")}
    resumed_states = lines(resumed / "states.jsonl")
    assert [s for s, _ in resumed_states] == list(range(KILL_AT + 1, MAX_STEPS + 1))
    for step, state in resumed_states:
        assert state == pytest.approx(whole_states[step], abs=TOLERANCE), f"method state at step {step}"
    whole_final, resumed_final = (json.loads((r / "final.json").read_text()) for r in (whole, resumed))
    assert resumed_final["method_state"] == pytest.approx(whole_final["method_state"], abs=TOLERANCE)

    # the same logs (kd/ce, taid_t, moe loads, rewards, eval metrics): those of the steps after the checkpoint,
    # and those of the steps before it, which come back from the checkpoint's trainer_state.json
    whole_logs, resumed_logs = training_logs(whole_final), training_logs(resumed_final)
    assert sorted(resumed_logs) == sorted(whole_logs)
    for key, entry in whole_logs.items():
        assert sorted(resumed_logs[key]) == sorted(entry), key
        for name, value in entry.items():
            assert resumed_logs[key][name] == pytest.approx(value, abs=TOLERANCE), (key, name)

    # the same final weights (an MoE student's routers and experts included)
    whole_weights = torch.load(whole / "weights.pt")
    resumed_weights = torch.load(resumed / "weights.pt")
    assert sorted(resumed_weights) == sorted(whole_weights)
    for name, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=TOLERANCE, msg=lambda m: f"{name}: {m}")
    if case == "moe_mimic":  # the routers of the upcycled student are part of the compared weights
        assert any(name.endswith("mlp.gate.weight") for name in whole_weights)
    checkpoint = killed / "out" / f"checkpoint-{KILL_AT}"
    # the resumed steps drew samples (student and teacher for on_policy, student for cross_tokenizer), redrawn as in
    # the whole run
    if case in ("on_policy", "cross_tokenizer", "multi_teacher", "served"):
        fractions = [entry["on_policy_fraction"] for (step, kind), entry in whole_logs.items()
                     if kind == "train" and step > KILL_AT]
        assert any(f > 0 for f in fractions) and any(f < 1 for f in fractions), fractions
    if case in ("taid", "dho"):  # the state to restore is not the initial one
        assert whole_states[KILL_AT + 1] != whole_states[1]
    if case == "taid":
        saved = json.loads((checkpoint / "taid_schedule.json").read_text())
        assert saved == pytest.approx(whole_states[KILL_AT], abs=TOLERANCE)
    if case == "dho":  # the alpha/beta searched at step 4's evaluation are in the checkpoint's config
        saved = json.loads((checkpoint / "config.json").read_text())
        assert resumed_final["method_state"] == pytest.approx(whole_final["method_state"], abs=TOLERANCE)
        assert {"alpha": saved["alpha"], "beta": saved["beta"]} == pytest.approx(
            whole_states[KILL_AT + 1], abs=TOLERANCE)


def test_the_cases_cover_every_trainer():
    import llmkd.trainers as trainers

    assert set(CASES) == {"kd", "on_policy", "cross_tokenizer", "multi_teacher", "served", "taid", "sinkd",
                          "moe_mimic", "preference", "dho"}
    assert {"DistillTrainer", "TAIDTrainer", "SinKDTrainer", "MoEMimicTrainer", "PreferenceDistillTrainer",
            "DHOTrainer"} <= set(dir(trainers))


@pytest.mark.parametrize("trainer_name", ["DistillTrainer", "MoEMimicTrainer", "PreferenceDistillTrainer"])
def test_an_moe_students_experts_come_back_from_a_checkpoint(tmp_path, tokenizer, trainer_name):
    """transformers saves fused experts per expert; Trainer._load_from_checkpoint loaded the file unconverted and
    left the experts at their initial weights (llmkd's trainers now load them through from_pretrained)."""
    import llmkd
    from datasets import Dataset
    from test_preference_trainer import preference_rows
    from utils import prompt_completion_rows, tiny_llama

    student = llmkd.upcycle_to_moe(tiny_llama(len(tokenizer), 32, seed=1), num_experts=4, top_k=2, every=2)
    common = dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    if trainer_name == "PreferenceDistillTrainer":
        args, rows = llmkd.PreferenceDistillConfig(**common), preference_rows(8, 0)
    else:
        args = (llmkd.MoEMimicConfig(**common, moe_stage="d2s") if trainer_name == "MoEMimicTrainer"
                else llmkd.DistillConfig(**common))
        rows = prompt_completion_rows(8)
    trainer = getattr(llmkd, trainer_name)(model=student, teacher_model=tiny_llama(len(tokenizer), 48, seed=2),
                                           args=args, train_dataset=Dataset.from_list(rows),
                                           processing_class=tokenizer)
    model = trainer.model
    assert any(name.endswith("experts.gate_up_proj") for name, _ in model.named_parameters())
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))  # every expert different from its upcycled copy
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.save_model(str(tmp_path / "checkpoint"))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    trainer._load_from_checkpoint(str(tmp_path / "checkpoint"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == trainable
