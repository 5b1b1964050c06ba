"""TAIDTrainer end to end: learning, once-per-optimizer-step schedule updates, checkpointed schedule, resume.

(The agreement with the official schedule, input and step index, is tests/test_taid_official.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from utils import prompt_completion_rows, tiny_llama

from llmkd import TAIDConfig, TAIDTrainer
from llmkd.losses import forward_kl


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_llama(len(tokenizer), hidden=32, seed=1), tiny_llama(len(tokenizer), hidden=48, seed=2)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(prompt_completion_rows(32))


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=12, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                  t_start=0.4, alpha=0.05, beta=0.5, loss_chunk_size=16)
    values.update(overrides)
    return TAIDConfig(**values)


def _teacher_kl(student, teacher, batch):
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return forward_kl(s, t, batch["labels"][:, 1:] != -100).item()


def test_taid_learns_t_rises_and_round_trip(tmp_path, tokenizer, models, dataset):
    student, teacher = (copy.deepcopy(m) for m in models)
    trainer = TAIDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), train_dataset=dataset,
                          processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])
    kl_before = _teacher_kl(student, teacher, batch)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    ts = [e["taid_t"] for e in trainer.state.log_history if "taid_t" in e]
    assert len(ts) == 12 and all(b >= a for a, b in zip(ts, ts[1:]))
    assert ts[0] == pytest.approx(0.4) and ts[-1] > 0.4 + 0.6 * 11 / 12 - 1e-9  # at least the linear floor
    assert _teacher_kl(student, teacher, batch) < 0.7 * kl_before
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    torch.testing.assert_close(reloaded(batch["input_ids"]).logits, student.eval()(batch["input_ids"]).logits)


@pytest.mark.parametrize("schedule_loss", ["cross_entropy", "kl"])
def test_schedule_updates_once_per_optimizer_step_with_the_step_mean(tmp_path, tokenizer, models, dataset,
                                                                     schedule_loss):
    """One update per optimizer step (not per micro-batch), with the official 0-based step index, fed the step's
    token-weighted mean over its 3 micro-batches of the loss schedule_loss names: the cross-entropy (logged as
    taid_ce) or the KL (logged as kd_loss). (Earlier versions fed the KL with the 1-based index; the default now
    follows the official code, see tests/test_taid_official.py.)"""
    student, teacher = (copy.deepcopy(m) for m in models)
    args = _config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=4,
                   schedule_loss=schedule_loss)
    trainer = TAIDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                          processing_class=tokenizer)
    calls = []
    original = trainer.schedule.update
    trainer.schedule.update = lambda J, step, max_steps: calls.append((J, step, max_steps)) or original(J, step,
                                                                                                       max_steps)
    trainer.train()
    assert [c[1] for c in calls] == [0, 1, 2, 3] and all(c[2] == 4 for c in calls)
    logged_name = "taid_ce" if schedule_loss == "cross_entropy" else "kd_loss"
    logged = [e[logged_name] for e in trainer.state.log_history if logged_name in e]
    assert len(logged) == 4
    assert [c[0] for c in calls] == pytest.approx(logged, abs=1e-6)  # logs round to 6 decimals
    # the cross-entropy is KL + H(p_t): several nats above the KL
    ce, kl = ([e[k] for e in trainer.state.log_history if "taid_ce" in e] for k in ("taid_ce", "kd_loss"))
    assert all(c > k + 1.0 for c, k in zip(ce, kl))


def test_resume_continues_the_same_schedule_and_losses(tmp_path, tokenizer, models, dataset):
    def run(output, **extra):
        student, teacher = (copy.deepcopy(m) for m in models)
        args = _config(tmp_path, output_dir=str(output), max_steps=8, save_strategy="steps", save_steps=4, **extra)
        trainer = TAIDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                              processing_class=tokenizer)
        return trainer, student

    whole, whole_student = run(tmp_path / "whole")
    whole.train()
    saved = json.loads((tmp_path / "whole" / "checkpoint-4" / "taid_schedule.json").read_text())
    assert saved["prev_loss"] is not None and saved["t"] > 0.4

    resumed, resumed_student = run(tmp_path / "whole")  # same output_dir: resume from its checkpoint-4
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-4"))

    for key, value in whole.schedule.state_dict().items():
        if isinstance(value, str):  # schedule_loss
            assert resumed.schedule.state_dict()[key] == value
        else:
            assert resumed.schedule.state_dict()[key] == pytest.approx(value, rel=1e-6)
    late = lambda tr: [e["kd_loss"] for e in tr.state.log_history if "kd_loss" in e and e["step"] > 4]  # noqa: E731
    assert late(resumed) == pytest.approx(late(whole), rel=1e-5)
    for key, value in whole_student.state_dict().items():
        torch.testing.assert_close(resumed_student.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_resume_from_a_non_taid_checkpoint_is_refused(tmp_path, tokenizer, models, dataset):
    (tmp_path / "checkpoint-1").mkdir()
    trainer = TAIDTrainer(model=copy.deepcopy(models[0]), teacher_model=copy.deepcopy(models[1]),
                          args=_config(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(FileNotFoundError, match="taid_schedule.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


def test_resume_refuses_a_schedule_driven_by_the_other_loss(tmp_path, tokenizer, models, dataset):
    """A checkpoint's prev loss and momentum measure the loss that drove it; a schedule file without
    schedule_loss comes from a version that fed the KL."""
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "taid_schedule.json").write_text(json.dumps({"t": 0.45, "momentum": 0.01, "prev_loss": 0.3}))
    trainer = TAIDTrainer(model=copy.deepcopy(models[0]), teacher_model=copy.deepcopy(models[1]),
                          args=_config(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(ValueError, match="schedule_loss='kl'"):
        trainer.train(resume_from_checkpoint=str(folder))


def test_bad_schedule_settings_fail_at_config_time(tmp_path):
    with pytest.raises(ValueError, match="t_start <= t_end"):
        _config(tmp_path, t_start=0.9, t_end=0.5)
    with pytest.raises(ValueError, match="schedule_loss must be one of"):
        _config(tmp_path, schedule_loss="ce")
