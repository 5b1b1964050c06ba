"""DistillTrainer with a teacher of another tokenizer (cross_tokenizer_loss, docs/CROSS_TOKENIZER.md), end to end
on tiny models: a byte-level BPE student and a SentencePiece-style teacher, both tokenizers trained here."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from utils import make_tokenizer, prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer, TAIDConfig, TAIDTrainer
from llmkd.cross_tokenizer import RowAligner, TokenizerWithoutOffsetsError
from llmkd.teacher import VocabularyMismatchError
from llmkd.teacher_signals import CrossTokenizerTeacher
from llmkd.cross_tokenizer.dataset import STUDENT_SPANS, TEACHER_INPUT_IDS, TEACHER_SPANS, alignment_stats
from test_cross_tokenizer import metaspace_tokenizer

ALPHABET = [row["prompt"] + row["completion"] for row in prompt_completion_rows(200, seed=9)]


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return metaspace_tokenizer(120, alphabet_from=ALPHABET)


@pytest.fixture(scope="module")
def models(tokenizer, teacher_tokenizer):
    return tiny_llama(len(tokenizer), hidden=32, seed=1), tiny_llama(len(teacher_tokenizer), hidden=48, seed=2)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(prompt_completion_rows(48))


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=12, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, loss_chunk_size=8, max_length=64,
                  disable_tqdm=True, cross_tokenizer_loss="uld", kd_ratio=1.0)
    values.update(overrides)
    return DistillConfig(**values)


def trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, trainer_class=DistillTrainer, **overrides):
    student, teacher = (copy.deepcopy(m) for m in models)
    args = overrides.pop("args", None) or config(tmp_path, **overrides)
    return trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                         processing_class=tokenizer, teacher_processing_class=teacher_tokenizer)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


@pytest.mark.parametrize("loss", ["uld", "hybrid", "span"])
def test_loss_falls_weights_change_and_round_trip(tmp_path, tokenizer, teacher_tokenizer, models, dataset, loss):
    trainer = trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, cross_tokenizer_loss=loss)
    assert isinstance(trainer.teacher_signal, CrossTokenizerTeacher)
    student = trainer.model
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer.train()
    kd = logged(trainer, "kd_loss")
    assert len(kd) == 12
    assert sum(kd[-3:]) / 3 < 0.8 * sum(kd[:3]) / 3, kd
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed and any("layers.0" in k for k in changed)
    assert all(torch.equal(p, q) for p, q in zip(trainer.teacher.parameters(), models[1].parameters()))
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    ids = torch.tensor([tokenizer("what is two add three sum is five").input_ids])
    student.eval()
    torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)


def test_rows_carry_the_alignment(tmp_path, tokenizer, teacher_tokenizer, models, dataset):
    trainer = trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset)
    row = trainer.train_dataset[0]
    assert len(row[STUDENT_SPANS]) == len(row["input_ids"])
    assert len(row[TEACHER_SPANS]) == len(row[TEACHER_INPUT_IDS])
    # the teacher's tokens are its own tokenization of the row's text
    text = tokenizer.decode(row["input_ids"])
    assert teacher_tokenizer.decode(row[TEACHER_INPUT_IDS]) .replace(" ", "") == text.replace(" ", "")
    # spans are trained completion tokens only, and both sides hold the same spans
    spans = [s for s in row[STUDENT_SPANS] if s >= 0]
    assert spans and set(spans) == {s for s in row[TEACHER_SPANS] if s >= 0}
    assert all(label != -100 for label, s in zip(row["labels"], row[STUDENT_SPANS]) if s >= 0)
    stats = trainer.teacher_signal.alignment_stats["train"]
    assert stats["rows"] == len(dataset) and stats["spans"] > len(dataset) and stats["dropped_spans"] == 0


def test_chunked_and_dense_paths_agree(tmp_path, tokenizer, teacher_tokenizer, models, dataset):
    results = {}
    for chunked in (True, False):
        trainer = trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, cross_tokenizer_loss="hybrid",
                              use_chunked_loss=chunked, loss_chunk_size=3, temperature=2.0, kd_ratio=0.6,
                              max_steps=1, optim="sgd", learning_rate=0.5)
        trainer.train()
        results[chunked] = logged(trainer, "loss")[0], {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5)
    for key, value in results[False][1].items():
        torch.testing.assert_close(results[True][1][key], value, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tokenizer, teacher_tokenizer, models):
    rows = prompt_completion_rows(8)
    for i, row in enumerate(rows):
        row["completion"] = row["completion"] + " one two" * (i % 3)
    data = Dataset.from_list(rows)
    results = []
    for batch, accumulation in ((8, 1), (2, 4)):
        trainer = trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, data, cross_tokenizer_loss="span",
                              kd_ratio=0.7, max_steps=1, optim="sgd", learning_rate=0.5,
                              per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer.train()
        results.append((logged(trainer, "loss")[0], {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    for key, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], value, rtol=1e-5, atol=1e-6)


def test_taid_interpolates_on_the_shared_vocabulary(tmp_path, tokenizer, teacher_tokenizer, models, dataset):
    args = TAIDConfig(output_dir=str(tmp_path / "taid"), per_device_train_batch_size=4, max_steps=6,
                      learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", loss_chunk_size=8,
                      max_length=64, disable_tqdm=True, cross_tokenizer_loss="hybrid")
    trainer = trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, TAIDTrainer, args=args)
    objective = trainer.objective()
    assert type(objective.token_loss).__name__ == "HybridLoss"
    assert type(objective.token_loss.shared_loss).__name__ == "TAIDTokenLoss"
    trainer.train()
    assert len(logged(trainer, "kd_loss")) == 6 and all(v == v for v in logged(trainer, "kd_loss"))
    with pytest.raises(ValueError, match="hybrid"):
        bad = TAIDConfig(output_dir=str(tmp_path / "t2"), report_to="none", cross_tokenizer_loss="uld")
        trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, TAIDTrainer, args=bad)


def test_on_policy_samples_are_realigned(tmp_path, tokenizer, teacher_tokenizer, models, dataset):
    trainer = trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, lmbda=1.0, max_steps=2,
                          max_completion_length=8, cross_tokenizer_loss="hybrid")
    batches = []
    original = trainer.teacher_signal.completions_batch

    def spy(batch):
        out = original(batch)
        batches.append(out)
        return out

    trainer.teacher_signal.completions_batch = spy
    trainer.train()
    assert len(batches) == 2
    aligner = RowAligner(tokenizer, teacher_tokenizer)
    for batch in batches:
        for b in range(batch["input_ids"].shape[0]):
            keep = batch["attention_mask"][b].bool()
            expected = aligner.align(batch["input_ids"][b][keep].tolist(), batch["labels"][b][keep].tolist())
            assert batch[STUDENT_SPANS][b][keep].tolist() == expected.student_spans.tolist()
            length = len(expected.teacher_input_ids)
            assert batch[TEACHER_INPUT_IDS][b][:length].tolist() == expected.teacher_input_ids.tolist()
            assert batch[TEACHER_SPANS][b][:length].tolist() == expected.teacher_spans.tolist()
            assert (batch[TEACHER_SPANS][b][length:] == -1).all()
    assert logged(trainer, "on_policy_fraction") == [1.0, 1.0]


# ------------------------------------------------------------------------------------------------ bad input
def test_different_tokenizers_point_to_cross_tokenizer_loss(tmp_path, tokenizer, teacher_tokenizer, models, dataset):
    with pytest.raises(VocabularyMismatchError, match="cross_tokenizer_loss"):
        trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, cross_tokenizer_loss=None)


def test_a_slow_tokenizer_is_refused(tmp_path, tokenizer, teacher_tokenizer):
    class Slow:
        is_fast = False

    with pytest.raises(TokenizerWithoutOffsetsError, match="slow tokenizer.*use_fast=True"):
        RowAligner(tokenizer, Slow())
    with pytest.raises(TokenizerWithoutOffsetsError, match="student"):
        RowAligner(Slow(), teacher_tokenizer)


def test_text_normalised_differently_is_skipped_and_counted(tmp_path, tokenizer, models, dataset, caplog):
    lowercasing = metaspace_tokenizer(120, lowercase=True, alphabet_from=[t.lower() for t in ALPHABET])
    rows = [{"prompt": "what is one add two", "completion": " sum is Three"} for _ in range(8)]
    teacher = tiny_llama(len(lowercasing), hidden=48, seed=2)
    with caplog.at_level(logging.WARNING):
        trainer = trainer_for(tmp_path, tokenizer, lowercasing, (models[0], teacher), Dataset.from_list(rows))
    stats = trainer.teacher_signal.alignment_stats["train"]
    assert stats["dropped_spans"] == 8  # " Three" in every row: the teacher saw "three"
    assert "could not be aligned" in caplog.text
    # upper case everywhere: only the end-of-sequence token (the same special token on both sides) is left
    shouting = [{"prompt": "what is one add two", "completion": " SUM IS THREE"} for _ in range(4)]
    trainer = trainer_for(tmp_path, tokenizer, lowercasing, (models[0], teacher), Dataset.from_list(shouting))
    assert trainer.teacher_signal.alignment_stats["train"]["spans"] == 4
    nothing = Dataset.from_list([{"llmkd_spans": 0, "llmkd_dropped_spans": 3, "llmkd_one_sided_special": 0,
                                  "llmkd_student_spans": [-1, -1]}])
    with pytest.raises(ValueError, match="No span of the train rows could be aligned"):
        alignment_stats(nothing, "train")


def test_special_tokens_on_one_side_are_counted(tokenizer, teacher_tokenizer):
    aligner = RowAligner(tokenizer, teacher_tokenizer)
    user, assistant = tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"])
    ids = [user] + tokenizer("what is one")["input_ids"] + [assistant] + tokenizer(" sum is two")["input_ids"]
    ids.append(tokenizer.eos_token_id)
    row = aligner.align(ids)
    assert row.one_sided_special == 2  # the teacher has no chat-template tokens
    assert row.student_spans[0] == -1 and row.student_spans[ids.index(assistant)] == -1
    assert row.student_spans[-1] >= 0  # </s> is the teacher's </s>: a 1:1 span
    assert row.teacher_input_ids[-1] == teacher_tokenizer.eos_token_id


@pytest.mark.parametrize("overrides,match", [
    (dict(seq_kd=True), "seq_kd"),
    (dict(lmbda=1.0, on_policy_objective="sampled_token"), "sampled_token"),
])
def test_unsupported_combinations_are_refused(tmp_path, tokenizer, teacher_tokenizer, models, dataset, overrides,
                                              match):
    with pytest.raises(ValueError, match=match):
        trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, **overrides)


def test_sinkd_is_refused(tmp_path, tokenizer, teacher_tokenizer, models, dataset):
    from llmkd import SinKDConfig, SinKDTrainer

    args = SinKDConfig(output_dir=str(tmp_path / "s"), report_to="none", cross_tokenizer_loss="uld")
    with pytest.raises(ValueError, match="SinKDTrainer cannot distil across tokenizers"):
        trainer_for(tmp_path, tokenizer, teacher_tokenizer, models, dataset, SinKDTrainer, args=args)


def test_a_row_too_long_for_the_teacher_is_refused(tmp_path, tokenizer, teacher_tokenizer, dataset):
    student = tiny_llama(len(tokenizer), hidden=32, seed=1)
    teacher = tiny_llama(len(teacher_tokenizer), hidden=48, seed=2, max_position_embeddings=8)
    with pytest.raises(ValueError, match="teacher's tokenization"):
        trainer_for(tmp_path, tokenizer, teacher_tokenizer, (student, teacher), dataset)


def test_config_checks_the_loss_name(tmp_path):
    with pytest.raises(ValueError, match="cross_tokenizer_loss must be"):
        config(tmp_path, cross_tokenizer_loss="wasserstein")
