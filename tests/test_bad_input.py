"""The bad-input matrix (RELIABILITY.md): each case goes through a real entry point (the trainer, the loader) and
the error names the problem and the fix. Cases already proven elsewhere are listed in RELIABILITY.md, not repeated."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import Dataset
from utils import prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer
from llmkd.loading import ModelLoadError


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
    assert "Check that the path exists" in message


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

