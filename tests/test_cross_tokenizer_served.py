"""A teacher with another tokenizer behind a server (docs/SERVED_TEACHERS.md, docs/CROSS_TOKENIZER.md): the server
scores the teacher's own tokens of each aligned row, and its top-k + tail become the cross-tokenizer losses'
targets, as a cache of the same k gives them. Against tests/sglang_standin.py serving the teacher with its
SentencePiece-style tokenizer (the client's vLLM side is held to a real vLLM server in tests/test_served_teacher.py;
the path from answers to targets is the same).

Tolerances: tests/test_served_teacher.py's LOGPROB_BOUND (1e-3) between the server's log-probabilities (one row
per forward) and the local pass's (padded batches): float32 rounding of the same sums, relative ~1e-6. Training
from the server is compared with training from the local pass's cache at the same k (32-bit log-probabilities):
the same targets within the bound, so each SGD step moves the weights by lr * gradient within lr * bound.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset
from sglang_standin import SGLangStandIn
from test_cache_training import EQUIVALENCE
from test_cross_tokenizer import metaspace_tokenizer
from test_cross_tokenizer_cache import aligned_rows
from test_cross_tokenizer_trainer import ALPHABET
from test_served_teacher import LOGPROB_BOUND, assert_same_cache
from utils import prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer
from llmkd.cache import write_teacher_cache
from llmkd.teacher_server import TeacherServer, TeacherServerError

MAX_LENGTH = 48
TOP_K = 8
STEPS = 3


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return metaspace_tokenizer(120, alphabet_from=ALPHABET)


@pytest.fixture(scope="module")
def teacher(teacher_tokenizer):
    return tiny_llama(len(teacher_tokenizer), hidden=48, seed=2).eval()


@pytest.fixture(scope="module")
def rows():
    return Dataset.from_list(prompt_completion_rows(16, seed=5))


@pytest.fixture(scope="module")
def server(teacher, teacher_tokenizer):
    running = SGLangStandIn(teacher, teacher_tokenizer)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory, teacher, rows, tokenizer, teacher_tokenizer):
    path = tmp_path_factory.mktemp("cross_served") / "local"
    write_teacher_cache(teacher, aligned_rows(rows, tokenizer, teacher_tokenizer), tokenizer, str(path), top_k=TOP_K,
                        temperature=1.0, shard_rows=8, batch_size=4, logprob_bits=32, progress=False,
                        teacher_tokenizer=teacher_tokenizer)
    return str(path)


def test_the_server_is_checked_against_the_teachers_tokenizer(server, tokenizer, teacher_tokenizer):
    client = TeacherServer(server.url)
    client.check_tokenizer(teacher_tokenizer)
    with pytest.raises(TeacherServerError, match="tokenizer differs"):
        client.check_tokenizer(tokenizer)


def test_cache_from_the_server_equals_the_local_teacher_pass(server, local_cache, rows, tokenizer, teacher_tokenizer,
                                                             tmp_path):
    from llmkd.cache import TeacherCache

    served = write_teacher_cache(TeacherServer(server.url, concurrency=4),
                                 aligned_rows(rows, tokenizer, teacher_tokenizer), tokenizer, str(tmp_path / "served"),
                                 top_k=TOP_K, temperature=1.0, shard_rows=8, batch_size=8, logprob_bits=32,
                                 progress=False, teacher_tokenizer=teacher_tokenizer)
    local = TeacherCache(local_cache)
    assert served.vocab_size == len(teacher_tokenizer) and served.num_tokens == local.num_tokens
    assert_same_cache(served, local, list(range(len(rows))))


def train(tmp_path, student, rows, tokenizer, teacher_tokenizer, loss, **source):
    initial = [p.detach().clone() for p in student.parameters()]
    args = DistillConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, logging_steps=1,
                         save_strategy="no", report_to="none", seed=0, disable_tqdm=True, max_length=MAX_LENGTH,
                         loss_chunk_size=16, cross_tokenizer_loss=loss, use_cpu=True, **EQUIVALENCE, **source)
    trainer = DistillTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer,
                             teacher_processing_class=teacher_tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, initial, [p.detach().clone() for p in student.parameters()], losses


@pytest.mark.parametrize("loss", ["hybrid", "span", "uld"])
def test_training_from_the_server_equals_training_from_the_cache(server, local_cache, rows, tokenizer,
                                                                 teacher_tokenizer, tmp_path, loss):
    student = tiny_llama(len(tokenizer), hidden=32, seed=1)
    served, initial, weights_served, losses_served = train(
        tmp_path / "served", copy.deepcopy(student), rows, tokenizer, teacher_tokenizer, loss,
        teacher_server=server.url, teacher_server_top_k=TOP_K)
    _, _, weights_cached, losses_cached = train(tmp_path / "cached", copy.deepcopy(student), rows, tokenizer,
                                                teacher_tokenizer, loss, teacher_cache=local_cache)
    assert served.teacher is None and served.teacher_signal.served is not None
    for a, b in zip(weights_served, weights_cached):
        torch.testing.assert_close(a, b, rtol=0, atol=STEPS * EQUIVALENCE["learning_rate"] * LOGPROB_BOUND)
    np.testing.assert_allclose(losses_served, losses_cached, rtol=0, atol=LOGPROB_BOUND)
    assert max((a - b).abs().max() for a, b in zip(weights_served, initial)) > 1e-3
    requests = served.teacher_signal.served
    # every teacher row was requested ahead of its step, by the collator's prefetch
    assert requests.rows_prefetched == requests.rows_requested > 0


def test_the_teachers_tokenizer_is_needed(server, rows, tokenizer, tmp_path):
    args = DistillConfig(output_dir=str(tmp_path), report_to="none", max_length=MAX_LENGTH, use_cpu=True,
                         cross_tokenizer_loss="span", teacher_server=server.url)
    with pytest.raises(ValueError, match="needs the teacher's tokenizer.*teacher_model_name_or_path"):
        DistillTrainer(model=tiny_llama(len(tokenizer), hidden=32, seed=1), args=args, train_dataset=rows,
                       processing_class=tokenizer)


def test_on_policy_samples_are_scored_by_the_server(server, teacher, rows, tokenizer, teacher_tokenizer, tmp_path):
    """lmbda = 1: the student's samples, re-tokenized for the teacher, are scored by the server when drawn. At
    k = the teacher's whole vocabulary the server's targets are its full distribution (tail -inf), so the run
    equals the run with the local teacher online (the same samples: the same student, seed and sampler)."""
    student = tiny_llama(len(tokenizer), hidden=32, seed=1)
    on_policy = dict(lmbda=1.0, max_completion_length=6)
    served, initial, weights_served, losses_served = train(
        tmp_path / "served", copy.deepcopy(student), rows, tokenizer, teacher_tokenizer, "hybrid",
        teacher_server=server.url, teacher_server_top_k=len(teacher_tokenizer), **on_policy)
    online = DistillConfig(output_dir=str(tmp_path / "online"), per_device_train_batch_size=4, max_steps=STEPS,
                           logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                           max_length=MAX_LENGTH, loss_chunk_size=16, cross_tokenizer_loss="hybrid", use_cpu=True,
                           **EQUIVALENCE, **on_policy)
    local_student = copy.deepcopy(student)
    trainer = DistillTrainer(model=local_student, teacher_model=copy.deepcopy(teacher), args=online, train_dataset=rows,
                             processing_class=tokenizer, teacher_processing_class=teacher_tokenizer)
    trainer.train()
    losses_online = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    np.testing.assert_allclose(losses_served, losses_online, rtol=0, atol=LOGPROB_BOUND)
    for a, b in zip(weights_served, local_student.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=STEPS * EQUIVALENCE["learning_rate"] * LOGPROB_BOUND)
    assert max((a - b).abs().max() for a, b in zip(weights_served, initial)) > 1e-3
    requests = served.teacher_signal.served
    assert requests.rows_requested > requests.rows_prefetched  # the samples were requested when drawn


def test_cache_teacher_command_with_a_server_of_another_tokenizer(server, teacher, local_cache, rows, tokenizer,
                                                                 teacher_tokenizer, tmp_path):
    """``llmkd cache-teacher --teacher_server URL`` with ``cross_tokenizer_loss``: the teacher's tokenizer comes from
    ``teacher_model_name_or_path`` (only its tokenizer is loaded), and the cache equals the local pass's."""
    import json
    import subprocess
    import sys

    import yaml

    from llmkd.cache import TeacherCache

    student_dir, teacher_dir = tmp_path / "student", tmp_path / "teacher"  # as on the Hub: config and tokenizer
    tiny_llama(len(tokenizer), hidden=32, seed=1).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    teacher.config.save_pretrained(teacher_dir)
    teacher_tokenizer.save_pretrained(teacher_dir)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": str(student_dir), "teacher_model_name_or_path": str(teacher_dir),
        "cross_tokenizer_loss": "hybrid", "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
        "teacher_cache": str(tmp_path / "cache"), "cache_top_k": TOP_K, "cache_shard_rows": 8,
        "max_length": MAX_LENGTH, "report_to": "none", "disable_tqdm": True}))
    result = subprocess.run([sys.executable, "-m", "llmkd", "cache-teacher", "--config", str(recipe), "--teacher_server",
                             server.url, "--logprob_bits", "32"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = TeacherCache(tmp_path / "cache")
    assert written.vocab_size == len(teacher_tokenizer) and written.verify()["rows"] == len(rows)
    assert_same_cache(written, TeacherCache(local_cache), list(range(len(rows))))
