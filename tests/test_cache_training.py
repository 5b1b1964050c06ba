"""Training from the offline teacher cache (``teacher_cache=PATH``): at k = V (lossless) it is the same training as
with the live teacher, for every token-level trainer; at small k it still distils; mismatches stop the run."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from utils import prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer, SinKDConfig, SinKDTrainer, TAIDConfig, TAIDTrainer
from llmkd.cache import CacheMismatchError, write_teacher_cache
from llmkd.data import prepare_dataset
from llmkd.losses import forward_kl

MAX_LENGTH = 48
METHODS = {
    "kd": (DistillConfig, DistillTrainer, dict(kd_ratio=0.5, temperature=1.0)),
    "taid": (TAIDConfig, TAIDTrainer, dict(t_start=0.4, alpha=0.05, beta=0.5)),
    "sinkd": (SinKDConfig, SinKDTrainer, dict(temperature=1.0, sinkhorn_block=8, sinkhorn_scale=0.05)),
}


@pytest.fixture(scope="module")
def rows():
    return Dataset.from_list(prompt_completion_rows(24, seed=5))


@pytest.fixture(scope="module")
def models(tokenizer):
    # heads of len(tokenizer) rows: the online run distils over the same vocabulary the cache holds
    return tiny_llama(len(tokenizer), hidden=32, seed=1), tiny_llama(len(tokenizer), hidden=48, seed=2)


def write_cache(path, teacher, rows, tokenizer, k, bits=32, temperature=1.0, max_length=MAX_LENGTH):
    prepared = prepare_dataset(rows, tokenizer, max_length=max_length, completion_only_loss=True)
    write_teacher_cache(copy.deepcopy(teacher).eval(), prepared, tokenizer, str(path), top_k=k,
                        temperature=temperature, shard_rows=8, batch_size=4, logprob_bits=bits, progress=False)
    return str(path)


def config(method, tmp_path, name, **overrides):
    config_class, _, fields = METHODS[method]
    values = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=5, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                  max_length=MAX_LENGTH, loss_chunk_size=16, **fields)
    values.update(overrides)
    return config_class(**values)


def step_logs(trainer):
    """Per logged step: loss, kd_loss, teacher_ce_loss (flattened)."""
    return [e[key] for e in trainer.state.log_history if "kd_loss" in e
            for key in ("loss", "kd_loss", "teacher_ce_loss")]


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, models, rows, tokenizer):
    return write_cache(tmp_path_factory.mktemp("cache") / "full", models[1], rows, tokenizer, k=len(tokenizer))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_training_from_a_full_cache_equals_online_training(method, tmp_path, models, rows, tokenizer, full_cache):
    trainer_class = METHODS[method][1]
    runs = {}
    for source in ("online", "cache"):
        student = copy.deepcopy(models[0])
        extra = {"teacher_model": copy.deepcopy(models[1])} if source == "online" else {}
        overrides = {"teacher_cache": full_cache} if source == "cache" else {}
        trainer = trainer_class(model=student, args=config(method, tmp_path, source, **overrides),
                                train_dataset=rows, processing_class=tokenizer, **extra)
        if source == "cache":
            assert trainer.teacher is None
        trainer.train()
        runs[source] = (step_logs(trainer), {k: v.detach().clone() for k, v in student.state_dict().items()})
    (online_logs, online_weights), (cached_logs, cached_weights) = runs["online"], runs["cache"]
    assert len(online_logs) == 5 * 3
    assert cached_logs == pytest.approx(online_logs, rel=1e-4, abs=1e-6)
    for name, weight in online_weights.items():
        torch.testing.assert_close(cached_weights[name], weight, rtol=1e-3, atol=1e-5)


def test_training_from_a_top_k_cache_distils(tmp_path, models, rows, tokenizer):
    student, teacher = copy.deepcopy(models[0]), copy.deepcopy(models[1])
    with torch.no_grad():
        teacher.lm_head.weight.mul_(25.0)  # a peaked teacher, as real LMs are: its top 8 hold 86% of its mass
    cache = write_cache(tmp_path / "k8", teacher, rows, tokenizer, k=8, bits=8)
    trainer = DistillTrainer(model=student, processing_class=tokenizer, train_dataset=rows,
                             args=config("kd", tmp_path, "k8run", teacher_cache=cache, kd_ratio=1.0, max_steps=12))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    valid = batch["labels"][:, 1:] != -100

    def teacher_kl():
        with torch.no_grad():
            s, t = student.eval()(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1]
        return forward_kl(s, t, valid).item()

    before = teacher_kl()
    trainer.train()
    assert teacher_kl() < 0.6 * before  # the full-vocabulary KL to the teacher falls, learned from its top 8


def test_mismatched_or_misused_caches_stop_the_run(tmp_path, models, rows, tokenizer, full_cache):
    student = copy.deepcopy(models[0])
    with pytest.raises(CacheMismatchError, match="dataset"):
        DistillTrainer(model=student, processing_class=tokenizer, train_dataset=rows,
                       args=config("kd", tmp_path, "a", teacher_cache=full_cache, completion_only_loss=False))
    with pytest.raises(CacheMismatchError, match="dataset"):
        DistillTrainer(model=student, processing_class=tokenizer, train_dataset=rows.select(range(1, 24)),
                       args=config("kd", tmp_path, "b", teacher_cache=full_cache))
    with pytest.raises(ValueError, match="temperature 1.0 but the run uses temperature 2.0"):
        DistillTrainer(model=student, processing_class=tokenizer, train_dataset=rows,
                       args=config("kd", tmp_path, "c", teacher_cache=full_cache, temperature=2.0))
    with pytest.raises(ValueError, match="training rows only"):
        DistillTrainer(model=student, processing_class=tokenizer, train_dataset=rows, eval_dataset=rows,
                       args=config("kd", tmp_path, "d", teacher_cache=full_cache))
    with pytest.raises(ValueError, match="Both a teacher model and teacher_cache"):
        DistillTrainer(model=student, teacher_model=copy.deepcopy(models[1]), processing_class=tokenizer,
                       train_dataset=rows, args=config("kd", tmp_path, "e", teacher_cache=full_cache))
