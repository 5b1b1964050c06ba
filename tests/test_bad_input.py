"""The bad-input matrix (RELIABILITY.md): each case goes through a real entry point (the trainer, the loader) and
the error names the problem and the fix. Cases already proven elsewhere are listed in RELIABILITY.md, not repeated."""

from __future__ import annotations

import copy
import errno
import json
import os

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from utils import prompt_completion_rows, tiny_llama

from llmkd import (DistillConfig, DistillTrainer, PreferenceDistillConfig, PreferenceDistillTrainer, TAIDConfig,
                   TAIDTrainer)
from llmkd.loading import ModelLoadError
from llmkd.trainers.guards import CheckpointWriteError, NonFiniteLossError, last_complete_checkpoint


def _config(tmp_path, **overrides) -> DistillConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, loss_chunk_size=16, max_length=64,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_llama(len(tokenizer), hidden=32, layers=1, seed=1), tiny_llama(len(tokenizer), hidden=32, layers=1,
                                                                                 seed=2)


def _trainer(tmp_path, tokenizer, models, dataset, **overrides):
    return DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=copy.deepcopy(models[1]),
                          args=_config(tmp_path, **overrides), train_dataset=dataset, processing_class=tokenizer)


# ---------------------------------------------------------------------------------------------------- data


def test_missing_columns_name_the_columns_and_the_fix(tmp_path, tokenizer, models):
    dataset = Dataset.from_list([{"question": "what is one", "answer": " one"}] * 4)
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path, tokenizer, models, dataset)
    message = str(error.value)
    assert "['answer', 'question']" in message  # what was seen
    assert "rename_column" in message and "'prompt'" in message and "'completion'" in message  # how to fix


@pytest.mark.parametrize("empty", [Dataset.from_dict({"prompt": [], "completion": []}), []],
                         ids=["dataset", "list"])
def test_empty_dataset_is_named(tmp_path, tokenizer, models, empty):
    with pytest.raises(ValueError, match="empty") as error:
        _trainer(tmp_path, tokenizer, models, empty)
    assert "split" in str(error.value)  # the fix: which split / file to check


def test_rows_emptied_by_truncation_are_named(tmp_path, tokenizer, models):
    rows = [{"prompt": "what is one add two " * 4, "completion": " sum is three"}] * 3
    with pytest.raises(ValueError, match=r"All 3 rows .* were dropped") as error:
        _trainer(tmp_path, tokenizer, models, Dataset.from_list(rows), max_length=4)
    assert "max_length=4" in str(error.value)


def test_long_sequences_are_truncated_to_max_length(tmp_path, tokenizer, models):
    """The policy: right truncation, the first max_length tokens are kept; training runs on them."""
    rows = [{"text": " ".join(["the cat sat on the mat"] * 20)}] * 8
    full = tokenizer(rows[0]["text"])["input_ids"]
    assert len(full) > 16
    trainer = _trainer(tmp_path, tokenizer, models, Dataset.from_list(rows), max_length=16)
    lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    assert lengths == {16}
    assert trainer.train_dataset[0]["input_ids"] == full[:16]
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


# ---------------------------------------------------------------------------------------------------- models


def test_student_that_does_not_exist_is_named_with_the_fix(tmp_path, tokenizer, models):
    nowhere = str(tmp_path / "no-such-student")
    with pytest.raises(ModelLoadError) as error:
        DistillTrainer(model=nowhere, teacher_model=copy.deepcopy(models[1]), args=_config(tmp_path),
                       train_dataset=Dataset.from_list(prompt_completion_rows(8)))
    message = str(error.value)
    assert "student model" in message and nowhere in message
    assert "does not exist" in message and "save_pretrained" in message  # a path, never a Hub error


def _pickle_only_folder(folder, model, tokenizer):
    """A model folder whose weights are a pickle (pytorch_model.bin), as older checkpoints are."""
    model.config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return str(folder)


def test_pickle_weights_are_refused_for_student_and_teacher(tmp_path, tokenizer, models):
    folder = _pickle_only_folder(tmp_path / "pickled", models[0], tokenizer)
    rows = Dataset.from_list(prompt_completion_rows(8))
    with pytest.raises(ModelLoadError, match=r"student model .*pytorch_model\.bin.*pickle") as error:
        DistillTrainer(model=folder, teacher_model=copy.deepcopy(models[1]), args=_config(tmp_path),
                       train_dataset=rows)
    assert "save_pretrained" in str(error.value)  # the fix: re-save as safetensors
    with pytest.raises(ModelLoadError, match=r"teacher model .*pytorch_model\.bin.*pickle"):
        DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=folder, args=_config(tmp_path),
                       train_dataset=rows, processing_class=tokenizer)


def test_remote_code_is_not_run_unless_the_recipe_allows_it(tmp_path, tokenizer, models):
    folder = tmp_path / "custom"
    models[0].save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llmkd_custom", auto_map={"AutoConfig": "custom_code.CustomConfig",
                                                       "AutoModelForCausalLM": "custom_code.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "custom_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    assert DistillConfig(output_dir=str(tmp_path)).trust_remote_code is False
    with pytest.raises(ModelLoadError, match="trust_remote_code") as error:
        DistillTrainer(model=str(folder), teacher_model=copy.deepcopy(models[1]), args=_config(tmp_path),
                       train_dataset=Dataset.from_list(prompt_completion_rows(8)))
    assert "student" in str(error.value)
    assert not marker.exists(), "the folder's code was executed"
    # the teacher, its tokenizer and a processor go through the same loaders with the same default
    with pytest.raises(ModelLoadError, match="trust_remote_code") as error:
        DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=str(folder), args=_config(tmp_path),
                       train_dataset=Dataset.from_list(prompt_completion_rows(8)), processing_class=tokenizer)
    assert "teacher" in str(error.value)
    assert not marker.exists(), "the folder's code was executed"


def test_pickle_weights_load_only_when_the_recipe_allows_them(tmp_path, tokenizer, models, caplog):
    folder = _pickle_only_folder(tmp_path / "pickled", models[0], tokenizer)
    assert DistillConfig(output_dir=str(tmp_path)).allow_pickle_weights is False
    with caplog.at_level("WARNING", logger="llmkd.loading"):
        trainer = DistillTrainer(model=folder, teacher_model=copy.deepcopy(models[1]),
                                 args=_config(tmp_path, allow_pickle_weights=True),
                                 train_dataset=Dataset.from_list(prompt_completion_rows(8)))
    assert "can run arbitrary code" in caplog.text
    for name, value in models[0].state_dict().items():  # the pickled weights were loaded, not fresh ones
        assert torch.equal(trainer.model.state_dict()[name], value), name



# ---------------------------------------------------------------------------------------------------- NaN / inf


def _nan_at_call(trainer, bad_call: int, value: float = float("nan")):
    """Make the loss of the ``bad_call``-th training micro-batch (1-based) non-finite, keeping its graph."""
    original, calls = trainer.compute_loss, []

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        result = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return result
        calls.append(1)
        if len(calls) != bad_call:
            return result
        return (result[0] * value, result[1]) if return_outputs else result * value

    trainer.compute_loss = compute_loss


class _Snapshots(TrainerCallback):
    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_nonfinite_loss_stops_with_the_step_by_default(tmp_path, tokenizer, models):
    trainer = _trainer(tmp_path, tokenizer, models, Dataset.from_list(prompt_completion_rows(24)), max_steps=5)
    assert trainer.args.nonfinite_loss == "stop"
    _nan_at_call(trainer, 3)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan .* at optimizer step 3 of 5") as error:
        trainer.train()
    assert "nonfinite_loss='skip'" in str(error.value)  # the fix
    assert trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters()), "the NaN reached the weights"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_loss_skip_drops_the_step_and_counts_it(tmp_path, tokenizer, models, value):
    snapshots = _Snapshots()
    trainer = _trainer(tmp_path, tokenizer, models, Dataset.from_list(prompt_completion_rows(24)), max_steps=5,
                       nonfinite_loss="skip")
    trainer.add_callback(snapshots)
    _nan_at_call(trainer, 3, value)
    trainer.train()
    assert trainer.state.global_step == 5
    weights = snapshots.weights
    assert all(torch.equal(weights[2][k], weights[1][k]) for k in weights[1]), "the skipped step moved weights"
    assert any(not torch.equal(weights[3][k], weights[2][k]) for k in weights[2]), "training did not go on"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    counts = [e["nonfinite_steps"] for e in trainer.state.log_history if "nonfinite_steps" in e]
    assert counts == [0, 0, 1, 1, 1]


def test_nonfinite_loss_from_a_broken_teacher_stops_a_method_trainer(tmp_path, tokenizer, models):
    """A real NaN (a teacher weight), through a method trainer (TAID) that inherits the check."""
    teacher = copy.deepcopy(models[1])
    with torch.no_grad():
        teacher.lm_head.weight[3, 0] = float("nan")
    args = TAIDConfig(output_dir=str(tmp_path / "taid"), per_device_train_batch_size=4, max_steps=3,
                      report_to="none", save_strategy="no", max_length=64, loss_chunk_size=16, disable_tqdm=True,
                      verify_logit_head=False, kd_ratio=1.0)
    trainer = TAIDTrainer(model=copy.deepcopy(models[0]), teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_list(prompt_completion_rows(12)), processing_class=tokenizer)
    with pytest.raises(NonFiniteLossError, match="at optimizer step 1 of 3"):
        trainer.train()


def test_nonfinite_loss_choice_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"nonfinite_loss must be one of \('stop', 'skip'\), got 'ignore'"):
        DistillConfig(output_dir=str(tmp_path), nonfinite_loss="ignore")


def test_nonfinite_loss_skip_in_the_preference_trainer(tmp_path, tokenizer, models):
    """The TRL-based trainer shares the policy: a NaN teacher (the DPO reference) makes every step's loss NaN;
    every step is skipped and counted, the student is unchanged."""
    teacher = copy.deepcopy(models[1])
    with torch.no_grad():
        teacher.lm_head.weight[:, 0] = float("nan")
    student = copy.deepcopy(models[0])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    rows = [{"prompt": "what is one add two", "chosen": " sum is three", "rejected": " sum is four"}] * 8
    args = PreferenceDistillConfig(output_dir=str(tmp_path / "pref"), per_device_train_batch_size=4, max_steps=3,
                                   learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                                   disable_tqdm=True, nonfinite_loss="skip")
    trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    assert [e["nonfinite_steps"] for e in trainer.state.log_history if "nonfinite_steps" in e] == [1, 2, 3]
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


# ---------------------------------------------------------------------------------------------------- full disk


def test_full_disk_mid_checkpoint_keeps_the_previous_checkpoint_for_resume(tmp_path, tokenizer, models):
    dataset = Dataset.from_list(prompt_completion_rows(24))
    out = tmp_path / "out"
    trainer = _trainer(tmp_path, tokenizer, models, dataset, max_steps=4, save_strategy="steps", save_steps=2)
    write_rest = trainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(output_dir):
        if trainer.state.global_step == 4:  # the weights of checkpoint-4 are written already
            raise OSError(errno.ENOSPC, "No space left on device", output_dir)
        write_rest(output_dir)

    trainer._save_optimizer_and_scheduler = disk_full_at_step_4
    with pytest.raises(CheckpointWriteError, match="No space left on device") as error:
        trainer.train()
    message = str(error.value)
    assert "checkpoint-4" in message and f"{out / 'checkpoint-2'}, is intact" in message
    assert "Free disk space" in message and "resume_from_checkpoint=True" in message
    assert error.value.errno == errno.ENOSPC
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # the partial folder is gone
    # a partial folder that was not cleaned (a killed run) is skipped too
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"half")
    assert last_complete_checkpoint(str(out)) == str(out / "checkpoint-2")

    resumed = _trainer(tmp_path, tokenizer, models, dataset, max_steps=4, save_strategy="steps", save_steps=2)
    steps_run = _Snapshots()
    resumed.add_callback(steps_run)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and len(steps_run.weights) == 2  # steps 3 and 4 only
    # it went on from checkpoint-2 (not from the partial checkpoint-3): steps 3 and 4 repeat the first run's
    losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    resumed_losses = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert sorted(resumed_losses) == [1, 2, 3, 4]
    assert [resumed_losses[s] for s in (3, 4)] == pytest.approx([losses[s] for s in (3, 4)], rel=1e-5)
    assert os.path.isfile(out / "checkpoint-4" / "trainer_state.json")
