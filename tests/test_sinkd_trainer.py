"""SinKDTrainer end to end: sequence classifiers (BERT encoder, Llama decoder) and causal LMs (batch and sequence
modes), the objective against the formula written out, learning, save/load round trips, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from sinkhorn_reference import reference_sinkhorn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from utils import classification_rows, prompt_completion_rows, tiny_bert_classifier, tiny_llama, tiny_llama_classifier

from llmkd import SinKDConfig, SinKDTrainer
from llmkd.losses import forward_kl, sinkhorn_blocks


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=20, learning_rate=5e-3,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, max_length=64)
    values.update(overrides)
    return SinKDConfig(**values)


@pytest.fixture(scope="module")
def classification_data():
    return Dataset.from_list(classification_rows(64))


def _trained(classifier, tokenizer, rows, steps=60):
    """Fit a classifier to the rows with plain cross-entropy (full batch, Adam), so that the teacher knows the
    task: a fresh head predicts nearly 1/C everywhere, which a student matches at once."""
    batch = tokenizer([r["sentence"] for r in rows], padding=True, return_tensors="pt",
                      return_token_type_ids=False)
    labels = torch.tensor([r["label"] for r in rows])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    classifier.train()
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(classifier(**batch).logits, labels).backward()
        optimizer.step()
    return classifier.eval()


@pytest.fixture(scope="module")
def bert_teacher(tokenizer):
    return _trained(tiny_bert_classifier(len(tokenizer), hidden=48, layers=2, seed=2), tokenizer,
                    classification_rows(64))


def _bert_pair(tokenizer, num_labels=2):
    return (tiny_bert_classifier(len(tokenizer), hidden=32, layers=1, seed=1, num_labels=num_labels),
            tiny_bert_classifier(len(tokenizer), hidden=48, layers=2, seed=2, num_labels=num_labels))


def _reference_objective(student_logits, teacher_logits, labels, args):
    """a * KL(p_T || q_T) + (1 - a) * CE + b * scale * sum(Plan * W), per example means; float64."""
    s, t = student_logits.double(), teacher_logits.double()
    p, log_q = F.softmax(t / args.temperature, -1), F.log_softmax(s / args.temperature, -1)
    kd = (p * (p.log() - log_q)).sum(-1).mean()
    ce = F.cross_entropy(s, labels)
    sink = reference_sinkhorn(s, t, tau=args.sinkhorn_temperature, eps=args.sinkhorn_epsilon,
                              iterations=args.sinkhorn_iterations, scale=args.sinkhorn_scale,
                              detach_plan=args.sinkhorn_detach_plan)
    return args.kd_ratio * kd + (1 - args.kd_ratio) * ce + args.sinkhorn_weight * sink


# ----------------------------------------------------------------------------------------------------------------
# Sequence classifiers
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("detach_plan", [True, False])
def test_classifier_objective_equals_the_formula(tmp_path, tokenizer, classification_data, detach_plan):
    student, teacher = _bert_pair(tokenizer)
    args = _config(tmp_path, sinkhorn_scale=0.05, sinkhorn_detach_plan=detach_plan)
    trainer = SinKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data,
                           processing_class=tokenizer)
    assert trainer.is_classification and trainer.num_labels == 2
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    assert set(batch) >= {"input_ids", "attention_mask", "labels"} and batch["labels"].shape == (8,)
    loss = trainer.compute_loss(student, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    student_logits = student(**inputs).logits
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    expected = _reference_objective(student_logits, teacher_logits, batch["labels"], args)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    params = [student.classifier.weight, student.bert.encoder.layer[0].output.dense.weight]
    grads = torch.autograd.grad(loss, params)
    expected_grads = torch.autograd.grad(expected, params)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-7)


def _dataset_kl(student, teacher, trainer, temperature=2.0):
    """KL(p_T || q_T) averaged over the whole training set, with both models in eval mode."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        log_q = F.log_softmax(student.eval()(**inputs).logits / temperature, -1)
        log_p = F.log_softmax(teacher.eval()(**inputs).logits / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def test_classifier_learns_and_round_trips(tmp_path, tokenizer, classification_data, bert_teacher):
    student, teacher = tiny_bert_classifier(len(tokenizer), hidden=32, layers=1, seed=1), copy.deepcopy(bert_teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = _config(tmp_path, max_steps=24, learning_rate=1e-2, lr_scheduler_type="constant")
    trainer = SinKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data,
                           eval_dataset=classification_data, processing_class=tokenizer)
    kl_before = _dataset_kl(student, teacher, trainer)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logs) == 24 and all(e["sinkhorn_loss"] > 0 for e in logs)
    assert _dataset_kl(student, teacher, trainer) < 0.3 * kl_before
    metrics = trainer.evaluate()  # accuracy by default for classifiers, beside the distillation terms
    everything = trainer.data_collator([trainer.eval_dataset[i] for i in range(len(trainer.eval_dataset))])
    with torch.no_grad():
        predictions = student.eval()(**{k: v for k, v in everything.items() if k != "labels"}).logits.argmax(-1)
    assert metrics["eval_accuracy"] == pytest.approx((predictions == everything["labels"]).float().mean().item())
    assert metrics["eval_sinkhorn_loss"] > 0 and metrics["eval_kd_loss"] > 0
    assert all(not torch.equal(v, before[k]) for k, v in student.state_dict().items() if "classifier" in k)
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "student"))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(reloaded.eval()(**inputs).logits, student.eval()(**inputs).logits)


def test_decoder_classifier_learns(tmp_path, tokenizer, classification_data):
    pad = tokenizer.pad_token_id
    student = tiny_llama_classifier(len(tokenizer), hidden=32, layers=1, seed=1, pad_token_id=pad)
    teacher = _trained(tiny_llama_classifier(len(tokenizer), hidden=48, layers=2, seed=2, pad_token_id=pad),
                       tokenizer, classification_rows(64))
    args = _config(tmp_path, max_steps=40, learning_rate=3e-3, lr_scheduler_type="constant")
    trainer = SinKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=classification_data,
                           processing_class=tokenizer)
    assert trainer.is_classification
    assert "token_type_ids" not in trainer.train_dataset.column_names  # Llama has no segment embeddings
    before = student.score.weight.detach().clone()
    kl_before = _dataset_kl(student, teacher, trainer)
    trainer.train()
    assert _dataset_kl(student, teacher, trainer) < 0.2 * kl_before
    assert not torch.equal(student.score.weight, before)


def test_classifier_input_errors(tmp_path, tokenizer, classification_data):
    student, _ = _bert_pair(tokenizer)
    _, teacher3 = _bert_pair(tokenizer, num_labels=3)
    with pytest.raises(ValueError, match="2 classes and the teacher into 3"):
        SinKDTrainer(model=student, teacher_model=teacher3, args=_config(tmp_path),
                     train_dataset=classification_data, processing_class=tokenizer)
    student, teacher = _bert_pair(tokenizer)
    for model, names in ((student, {0: "negative", 1: "positive"}), (teacher, {0: "positive", 1: "negative"})):
        model.config.id2label = names
    with pytest.raises(ValueError, match="id by id"):
        SinKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path),
                     train_dataset=classification_data, processing_class=tokenizer)
    student, teacher = _bert_pair(tokenizer)
    with pytest.raises(ValueError, match="needs a text column"):
        SinKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), processing_class=tokenizer,
                     train_dataset=classification_data.rename_column("sentence", "body"))
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        SinKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), processing_class=tokenizer,
                     train_dataset=Dataset.from_list([{"sentence": "the cat", "label": -1}]))
    with pytest.raises(ValueError, match="sinkhorn_mode"):
        _config(tmp_path, sinkhorn_mode="tokens")


# ----------------------------------------------------------------------------------------------------------------
# Causal LMs
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_data():
    return Dataset.from_list(prompt_completion_rows(32))


def _lm_pair(tokenizer):
    return tiny_llama(len(tokenizer), hidden=32, seed=1), tiny_llama(len(tokenizer), hidden=48, seed=2)


@pytest.mark.parametrize("mode,block", [("batch", 512), ("batch", 5), ("sequence", 512), ("sequence", 3)])
def test_lm_objective_chunked_equals_dense_and_the_formula(tmp_path, tokenizer, lm_data, mode, block):
    student, teacher = _lm_pair(tokenizer)
    args = _config(tmp_path, sinkhorn_mode=mode, sinkhorn_block=block, sinkhorn_scale=0.05)
    trainer = SinKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_data,
                           processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    params = [student.lm_head.weight, student.model.layers[0].mlp.down_proj.weight]

    loss = trainer.compute_loss(student, batch)
    grads = torch.autograd.grad(loss, params)
    trainer.args.use_chunked_loss = False
    dense = trainer.compute_loss(student, batch)
    dense_grads = torch.autograd.grad(dense, params)

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    valid = batch["labels"][:, 1:] != -100
    zs = student(**inputs).logits[:, :-1][valid]
    with torch.no_grad():
        zt = teacher(**inputs).logits[:, :-1][valid]
    targets = batch["labels"][:, 1:][valid]
    p, log_q = F.softmax(zt.double() / 2, -1), F.log_softmax(zs.double() / 2, -1)
    kd = (p * (p.log() - log_q)).sum()
    ce = F.cross_entropy(zs.double(), targets, reduction="sum")
    blocks = sinkhorn_blocks(valid, mode, block)
    if (mode, block) == ("sequence", 512):
        assert len(blocks) == int((valid.sum(1) > 0).sum())  # one transport problem per sequence
    sink = sum((end - start) * reference_sinkhorn(zs[start:end], zt[start:end], scale=0.05) for start, end in blocks)
    expected = (0.9 * kd + 0.1 * ce + 0.8 * sink) / valid.sum()
    expected_grads = torch.autograd.grad(expected, params)

    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert dense.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, dense_got, want in zip(grads, dense_grads, expected_grads):
        torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(dense_got, want.float(), rtol=1e-3, atol=1e-6)


def test_lm_learns_and_round_trips(tmp_path, tokenizer, lm_data):
    student, teacher = _lm_pair(tokenizer)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher: KD_T (at T = 2) dominates the objective
    before = {k: v.clone() for k, v in student.state_dict().items()}
    args = _config(tmp_path, per_device_train_batch_size=4, max_steps=16, learning_rate=1e-2, sinkhorn_block=16,
                   sinkhorn_top_k=32, sinkhorn_scale=0.05)
    trainer = SinKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=lm_data,
                           processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(16)])

    def teacher_kl():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            s, t = student.eval()(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
        return forward_kl(s, t, batch["labels"][:, 1:] != -100, temperature=2.0).item()

    kl_before = teacher_kl()
    trainer.train()
    logs = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert len(logs) == 16 and all(e["sinkhorn_loss"] > 0 for e in logs)
    assert teacher_kl() < 0.75 * kl_before
    assert all(not torch.equal(v, before[k]) for k, v in student.state_dict().items() if "rotary" not in k)
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    ids = batch["input_ids"][:2]
    torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


def test_lm_sinkhorn_term_changes_the_gradient(tmp_path, tokenizer, lm_data):
    """b = 0 removes the term: the gradients then differ, and the logged sinkhorn_loss is still measured."""
    student, teacher = _lm_pair(tokenizer)
    grads = {}
    for weight in (0.0, 0.8):
        trainer = SinKDTrainer(model=student, teacher_model=copy.deepcopy(teacher), processing_class=tokenizer,
                               args=_config(tmp_path, sinkhorn_weight=weight, sinkhorn_scale=0.05),
                               train_dataset=lm_data)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        (grads[weight],) = torch.autograd.grad(trainer.compute_loss(student, batch), [student.lm_head.weight])
    assert not torch.allclose(grads[0.0], grads[0.8])


def test_lora_classifier_trains_adapters_and_its_new_head(tmp_path, tokenizer, classification_data, bert_teacher):
    """use_peft on a classifier: LoRA adapters on the encoder, the classification head trained in full (peft's
    SEQ_CLS task), the base weights frozen."""
    student = tiny_bert_classifier(len(tokenizer), hidden=32, layers=1, seed=1)
    base = {k: v.clone() for k, v in student.state_dict().items()}
    args = _config(tmp_path, max_steps=6, learning_rate=1e-2, use_peft=True, lora_r=4, lora_alpha=8,
                   lora_dropout=0.0)
    trainer = SinKDTrainer(model=student, teacher_model=copy.deepcopy(bert_teacher), args=args,
                           train_dataset=classification_data, processing_class=tokenizer)
    trainer.train()
    peft_model = trainer.model
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trained) and any("classifier" in n for n in trained)
    merged = peft_model.merge_and_unload()
    state = merged.state_dict()
    assert not torch.equal(state["classifier.weight"], base["classifier.weight"])
    assert torch.equal(state["bert.embeddings.word_embeddings.weight"], base["bert.embeddings.word_embeddings.weight"])
    changed = [k for k in base if "encoder" in k and "weight" in k and not torch.equal(state[k], base[k])]
    assert changed, "the LoRA adapters did not change the encoder's merged weights"
