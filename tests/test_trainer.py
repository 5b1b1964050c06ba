"""DistillTrainer end to end on tiny models: learning, invariances, chunked == dense, LoRA, 4-bit teacher, VLMs."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from utils import make_tokenizer, prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer
from llmkd.losses import DIVERGENCES, forward_kl
from llmkd.teacher import VocabularyMismatchError


def _config(tmp_path, **overrides) -> DistillConfig:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=12, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, loss_chunk_size=16, max_length=64,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillConfig(**values)


@pytest.fixture(scope="module")
def models(tokenizer):
    student = tiny_llama(len(tokenizer), hidden=32, layers=2, seed=1)
    teacher = tiny_llama(len(tokenizer) + 9, hidden=48, layers=2, seed=2)  # padded head: aligned automatically
    return student, teacher


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list(prompt_completion_rows(48))


def _losses(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_distillation_loss_falls_weights_change_and_round_trip(tmp_path, tokenizer, models, dataset):
    student, teacher = (copy.deepcopy(m) for m in models)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = DistillTrainer(
        model=student, teacher_model=teacher, args=_config(tmp_path, kd_ratio=1.0), train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    kd = _losses(trainer, "kd_loss")
    assert len(kd) == 12
    assert sum(kd[-3:]) / 3 < 0.6 * sum(kd[:3]) / 3, kd
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed and any("layers.0" in k for k in changed)
    assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), models[1].parameters())), "teacher moved"
    # the teacher-CE metric is the teacher's CE on the student's tokens: constant as the teacher is frozen
    teacher_ce = _losses(trainer, "teacher_ce_loss")
    assert max(teacher_ce) - min(teacher_ce) < 1.0

    trainer.save_model(str(tmp_path / "student"))
    tokenizer.save_pretrained(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    ids = torch.tensor([tokenizer("what is two add three sum is five").input_ids])
    student.eval()
    torch.testing.assert_close(reloaded(ids).logits, student(ids).logits)
    assert (tmp_path / "student" / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(str(tmp_path / "student")).get_vocab() == tokenizer.get_vocab()


def _one_step_loss(tmp_path, tokenizer, models, dataset, **overrides):
    student, teacher = (copy.deepcopy(m) for m in models)
    args = _config(tmp_path, max_steps=1, optim="sgd", learning_rate=0.5, **overrides)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    return _losses(trainer, "loss")[0], {k: v.clone() for k, v in student.state_dict().items()}


def test_gradient_accumulation_equals_one_large_batch(tmp_path, tokenizer, models):
    # rows with different numbers of completion tokens make a per-micro-batch mean differ from the token mean
    rows = prompt_completion_rows(8)
    for i, row in enumerate(rows):
        row["completion"] = row["completion"] + " one two" * (i % 3)
    data = Dataset.from_list(rows)
    big_loss, big = _one_step_loss(tmp_path, tokenizer, models, data, per_device_train_batch_size=8,
                                   kd_ratio=0.7, divergence="jsd")
    acc_loss, acc = _one_step_loss(tmp_path, tokenizer, models, data, per_device_train_batch_size=1,
                                   gradient_accumulation_steps=8, kd_ratio=0.7, divergence="jsd")
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    for key in big:
        torch.testing.assert_close(acc[key], big[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_chunked_and_dense_paths_agree(tmp_path, tokenizer, models, dataset, divergence):
    chunked_loss, chunked = _one_step_loss(tmp_path, tokenizer, models, dataset, divergence=divergence,
                                           temperature=2.0, loss_chunk_size=5, use_chunked_loss=True)
    dense_loss, dense = _one_step_loss(tmp_path, tokenizer, models, dataset, divergence=divergence,
                                       temperature=2.0, use_chunked_loss=False)
    assert chunked_loss == pytest.approx(dense_loss, rel=1e-5)
    for key in dense:
        torch.testing.assert_close(chunked[key], dense[key], rtol=1e-5, atol=1e-6)


def test_loss_matches_formula_on_one_batch(tmp_path, tokenizer, models, dataset):
    """The logged step-0 loss equals (1-r) CE + r FKL computed by hand from both models' full logits."""
    student, teacher = models
    args = _config(tmp_path, max_steps=1, kd_ratio=0.3, temperature=1.5)
    trainer = DistillTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=args,
                             train_dataset=dataset, processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = t[..., : s.shape[-1]]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        kd = forward_kl(s, t, mask, temperature=1.5)
        ce = torch.nn.functional.cross_entropy(s[mask], labels[mask])
    assert loss.item() == pytest.approx((0.7 * ce + 0.3 * kd).item(), rel=1e-5)


def test_different_tokenizers_are_refused(tmp_path, tokenizer, models, dataset):
    other = make_tokenizer(vocab_size=290)
    with pytest.raises(VocabularyMismatchError, match="cross_tokenizer_loss"):
        DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=copy.deepcopy(models[1]), args=_config(tmp_path),
                       train_dataset=dataset, processing_class=tokenizer, teacher_processing_class=other)


def test_padded_vocabularies_are_aligned_and_logged(tmp_path, tokenizer, models, dataset, caplog):
    with caplog.at_level(logging.INFO, logger="llmkd.teacher"):
        trainer = DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=copy.deepcopy(models[1]),
                                 args=_config(tmp_path), train_dataset=dataset, processing_class=tokenizer)
    assert trainer.vocab_size == len(tokenizer)
    assert "shared token ids" in caplog.text


def test_head_smaller_than_tokenizer_is_refused(tmp_path, tokenizer, dataset):
    small = tiny_llama(len(tokenizer) - 5, seed=3)
    with pytest.raises(VocabularyMismatchError, match="resize_token_embeddings"):
        DistillTrainer(model=small, teacher_model=tiny_llama(len(tokenizer), seed=4), args=_config(tmp_path),
                       train_dataset=dataset, processing_class=tokenizer)


def test_missing_teacher_is_a_clear_error(tmp_path, tokenizer, models, dataset):
    with pytest.raises(ValueError, match="No teacher"):
        DistillTrainer(model=copy.deepcopy(models[0]), args=_config(tmp_path), train_dataset=dataset,
                       processing_class=tokenizer)


def test_unloadable_teacher_names_the_role(tmp_path, tokenizer, models, dataset):
    from llmkd.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="teacher"):
        DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=str(tmp_path / "nowhere"),
                       args=_config(tmp_path), train_dataset=dataset, processing_class=tokenizer)


def test_lora_student_trains_only_adapters(tmp_path, tokenizer, models, dataset):
    student, teacher = (copy.deepcopy(m) for m in models)
    base = {k: v.clone() for k, v in student.state_dict().items()}
    args = _config(tmp_path, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_steps=6, kd_ratio=1.0)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    trainer.train()
    kd = _losses(trainer, "kd_loss")
    assert kd[-1] < kd[0]
    trained = trainer.model
    lora = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert any(not torch.all(p == 0) for n, p in lora.items() if "lora_B" in n), "adapters did not move"
    merged = trained.merge_and_unload()
    assert any(not torch.equal(merged.state_dict()[k], base[k]) for k in base if "proj" in k)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_four_bit_teacher_from_path(tmp_path, tokenizer, models, dataset):
    pytest.importorskip("bitsandbytes", reason="the 4-bit teacher needs bitsandbytes (extra 'bitsandbytes')")
    teacher_dir = tmp_path / "teacher"
    teacher = tiny_llama(len(tokenizer), hidden=64, layers=2, seed=5)
    teacher.save_pretrained(str(teacher_dir))
    tokenizer.save_pretrained(str(teacher_dir))
    args = _config(tmp_path, teacher_load_in_4bit=True, max_steps=4, kd_ratio=1.0)
    trainer = DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=str(teacher_dir), args=args,
                             train_dataset=dataset, processing_class=tokenizer)
    linear_types = {type(m).__name__ for m in trainer.teacher.modules()}
    assert "Linear4bit" in linear_types
    trainer.train()
    kd = _losses(trainer, "kd_loss")
    assert all(torch.isfinite(torch.tensor(kd))) and kd[-1] < kd[0]


def test_evaluation_reports_distillation_metrics(tmp_path, tokenizer, models, dataset):
    trainer = DistillTrainer(model=copy.deepcopy(models[0]), teacher_model=copy.deepcopy(models[1]),
                             args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset.select(range(8)),
                             processing_class=tokenizer)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_kd_loss", "eval_ce_loss", "eval_teacher_ce_loss"} <= set(metrics)
    expected = 0.5 * metrics["eval_kd_loss"] + 0.5 * metrics["eval_ce_loss"]
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-3)


def test_student_initialised_from_a_config(tmp_path, tokenizer, models, dataset):
    """init_student_from_config builds fresh, seeded weights from a config folder that holds no weights."""
    folder = tmp_path / "student_config"
    models[0].config.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    args = _config(tmp_path, model_name_or_path=str(folder), init_student_from_config=True, seed=3, max_steps=2)
    first = DistillTrainer(teacher_model=copy.deepcopy(models[1]), args=args, train_dataset=dataset)
    second = DistillTrainer(teacher_model=copy.deepcopy(models[1]), args=args, train_dataset=dataset)
    weights = first.model.state_dict()
    assert all(torch.equal(v, second.model.state_dict()[k]) for k, v in weights.items())
    assert not torch.equal(weights["lm_head.weight"], models[0].state_dict()["lm_head.weight"])
    first.train()
    assert _losses(first, "kd_loss")
