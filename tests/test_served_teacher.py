"""A teacher behind a real vLLM server (vLLM's CPU build serving a tiny teacher on 127.0.0.1): the cache written
from the server against the cache of the local teacher pass, training from the server against training from that
cache, on-policy scoring, the checks at start, and a server killed while a cache is written.

Runs in the vLLM environment (``bash scripts/setup_vllm.sh`` then ``.venv-vllm/bin/python -m pytest -m vllm_env``);
skipped where vLLM is not installed. Tolerances: both sides compute the same float32 model (hidden 64, 2 layers,
vocabulary 318, |log p| < 10) with different kernels, so their log-probabilities differ by float32 rounding of the
same sums, relative ~1e-6; LOGPROB_BOUND is 1e-3 as in tests/test_vllm.py, far below what another weight or
another position moves (> 0.1, asserted).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset

from utils import make_tokenizer, prompt_completion_rows, tiny_llama
from llmkd import DistillConfig, DistillTrainer
from llmkd.cache import TeacherCache, write_teacher_cache
from llmkd.data import prepare_dataset
from llmkd.teacher_server import TeacherServer, TeacherServerError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed: bash scripts/setup_vllm.sh, then run "
                                ".venv-vllm/bin/python -m pytest -m vllm_env")

LOGPROB_BOUND = 1e-3
TOP_K = 8
MAX_LOGPROBS = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving ``model_dir`` in float32 on 127.0.0.1."""

    def __init__(self, model_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        self.log = open(log, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
             "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-logprobs", str(MAX_LOGPROBS),
             "--max-model-len", "256", "--served-model-name", "tiny-teacher"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import requests

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server exited: {Path(log).read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/v1/models", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError("vLLM server did not start within 600 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served") / "teacher"
    tokenizer = make_tokenizer()
    tiny_llama(len(tokenizer), hidden=64, seed=3, num_attention_heads=2, num_key_value_heads=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(teacher_dir):
    running = VLLMServer(teacher_dir, teacher_dir.parent / "server.log")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local_teacher(teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()


def prepared_rows(tokenizer, n=24):
    return prepare_dataset(Dataset.from_list(prompt_completion_rows(n)), tokenizer, max_length=128,
                           completion_only_loss=False)


def assert_same_cache(served: TeacherCache, local: TeacherCache, rows: list[int]) -> None:
    ids_s, values_s, tail_s = served.rows(rows)
    ids_l, values_l, tail_l = local.rows(rows)
    # the same top-k ids wherever neighbouring log-probabilities are further apart than the bound (ties may swap)
    gaps = (values_l[:, :-1] - values_l[:, 1:]).abs()
    decided = torch.cat([gaps > LOGPROB_BOUND, torch.ones_like(gaps[:, :1], dtype=torch.bool)], 1) & \
        torch.cat([torch.ones_like(gaps[:, :1], dtype=torch.bool), gaps > LOGPROB_BOUND], 1)
    assert decided.float().mean() > 0.9
    assert torch.equal(ids_s[decided], ids_l[decided])
    torch.testing.assert_close(values_s, values_l, rtol=0, atol=LOGPROB_BOUND)
    # tails are stored as float16 (relative 2^-11) on both sides
    torch.testing.assert_close(tail_s.exp(), tail_l.exp(), rtol=2e-3, atol=LOGPROB_BOUND)


def check_cache_from_the_server(client: TeacherServer, local_teacher, tmp_path, root: str) -> None:
    """The cache written through ``client`` equals the cache of the local teacher pass (and the comparison can
    fail: another weight moves it far beyond the bound); ``root`` is the model the server says it serves."""
    tokenizer = make_tokenizer()
    prepared = prepared_rows(tokenizer)
    settings = dict(top_k=TOP_K, temperature=1.0, shard_rows=10, logprob_bits=32, progress=False)
    local = write_teacher_cache(local_teacher, prepared, tokenizer, tmp_path / "local", batch_size=4, **settings)
    served = write_teacher_cache(client, prepared, tokenizer, tmp_path / "served", batch_size=16, **settings)
    assert served.metadata["teacher"] == root
    assert served.num_tokens == local.num_tokens
    assert_same_cache(served, local, list(range(len(prepared))))
    assert served.verify()["rows"] == len(prepared)
    other = tiny_llama(len(tokenizer), hidden=64, seed=4, num_attention_heads=2, num_key_value_heads=2)
    moved = write_teacher_cache(other, prepared, tokenizer, tmp_path / "other", batch_size=4, **settings)
    assert (moved.rows([0])[1] - local.rows([0])[1]).abs().max() > 0.1


def test_cache_from_the_server_equals_the_local_teacher_pass(server, local_teacher, teacher_dir, tmp_path):
    check_cache_from_the_server(TeacherServer(server.url, concurrency=4), local_teacher, tmp_path, str(teacher_dir))


def test_cache_teacher_command_with_a_server(server, teacher_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    import json

    data.write_text("\n".join(json.dumps(r) for r in prompt_completion_rows(12)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": str(teacher_dir), "dataset_name": str(data), "output_dir": str(tmp_path / "out"),
        "teacher_cache": str(tmp_path / "cache"), "cache_top_k": TOP_K, "cache_shard_rows": 5, "max_length": 128,
        "report_to": "none", "disable_tqdm": True}))
    result = subprocess.run([sys.executable, "-m", "llmkd", "cache-teacher", "--config", str(recipe),
                             "--teacher_server", server.url], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cache = TeacherCache(tmp_path / "cache")
    assert cache.num_rows == 12 and cache.k == TOP_K and cache.verify()["shards"] == 3
    # a temperature the server cannot give is refused before any request
    result = subprocess.run([sys.executable, "-m", "llmkd", "cache-teacher", "--config", str(recipe),
                             "--teacher_server", server.url, "--cache_temperature", "2.0", "--output_dir",
                             str(tmp_path / "hot")], capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "cache_temperature: 1.0" in result.stderr


def train(tmp_path, tokenizer, data, **fields):
    student = tiny_llama(len(tokenizer), hidden=32, seed=5)
    initial = [p.detach().clone() for p in student.parameters()]
    args = DistillConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, optim="sgd",
                         learning_rate=0.5, report_to=[], save_strategy="no", logging_steps=1, max_length=128,
                         seed=0, use_cpu=True, disable_tqdm=True, **fields)
    trainer = DistillTrainer(model=student, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, initial, [p.detach().clone() for p in student.parameters()], losses


def check_training_from_the_server(url: str, local_teacher, tmp_path, **server_fields):
    """Three SGD steps from the server at ``url`` equal three steps from the local teacher's cache at the same k;
    every row was requested once, ahead of its step, by the collator's prefetch. Returns the served run's
    trainer."""
    tokenizer = make_tokenizer()
    data = Dataset.from_list(prompt_completion_rows(16))
    prepared = prepare_dataset(data, tokenizer, max_length=128, completion_only_loss=True)
    write_teacher_cache(local_teacher, prepared, tokenizer, tmp_path / "cache", top_k=TOP_K, temperature=1.0,
                        shard_rows=8, batch_size=4, logprob_bits=32, progress=False)
    served, initial, weights_served, losses_served = train(tmp_path, tokenizer, data, teacher_server=url,
                                                           teacher_server_top_k=TOP_K, **server_fields)
    _, _, weights_cached, losses_cached = train(tmp_path, tokenizer, data, teacher_cache=str(tmp_path / "cache"))
    # SGD: the weights move by lr * gradient, whose difference is bounded by the targets' (LOGPROB_BOUND per
    # log-probability, times the mean over tokens): within lr * LOGPROB_BOUND per step
    for a, b in zip(weights_served, weights_cached):
        torch.testing.assert_close(a, b, rtol=0, atol=3 * 0.5 * LOGPROB_BOUND)
    np.testing.assert_allclose(losses_served, losses_cached, rtol=0, atol=LOGPROB_BOUND)
    assert losses_served[-1] < losses_served[0]
    assert max((a - b).abs().max() for a, b in zip(weights_served, initial)) > 0.01
    assert served.teacher_signal.rows_prefetched == served.teacher_signal.rows_requested
    return served


def test_training_from_the_server_equals_training_from_the_local_cache(server, local_teacher, tmp_path):
    served = check_training_from_the_server(server.url, local_teacher, tmp_path)
    assert served.teacher_signal.server.api == "vllm"


def test_on_policy_samples_are_scored_by_the_server(server, local_teacher, tmp_path):
    """lmbda = 1 with the sampled-token objective and only the sampled tokens' log-probabilities (k = 0): the
    targets the server gives are the local teacher's log-probabilities of the student's samples."""
    tokenizer = make_tokenizer()
    data = Dataset.from_list(prompt_completion_rows(8))
    trainer, initial, weights, losses = train(
        tmp_path, tokenizer, data, teacher_server=server.url, teacher_server_top_k=0, lmbda=1.0,
        on_policy_objective="sampled_token", max_completion_length=8)
    assert all(np.isfinite(losses)) and max((a - b).abs().max() for a, b in zip(weights, initial)) > 0
    signal_ = trainer.teacher_signal
    assert signal_.rows_requested > signal_.rows_prefetched  # the samples were scored when drawn
    ids = torch.tensor([[5, 40, 77, 81, 12, 9, 30]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    with signal_.token_targets({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, valid) as targets:
        log_p = torch.log_softmax(local_teacher(input_ids=ids).logits[0, :-1].float(), -1)
        expected = log_p[torch.arange(6), ids[0, 1:]]
        assert torch.equal(targets.ids[:, 0], ids[0, 1:])
        torch.testing.assert_close(targets.log_probs[:, 0], expected, rtol=0, atol=LOGPROB_BOUND)


def test_the_server_is_checked_at_start(server):
    with pytest.raises(TeacherServerError, match="does not serve 'other'.*tiny-teacher"):
        TeacherServer(server.url, model="other")
    client = TeacherServer(server.url + "/v1")
    assert client.model == "tiny-teacher" and client.max_model_len == 256
    client.check_tokenizer(make_tokenizer())
    with pytest.raises(TeacherServerError, match="tokenizer differs"):
        client.check_tokenizer(make_tokenizer(vocab_size=300))
    with pytest.raises(TeacherServerError, match="max_model_len is 256"):
        client.check_lengths([300])
    with pytest.raises(TeacherServerError, match="HTTP 400.*--max-logprobs"):
        client.score([5, 6, 7], MAX_LOGPROBS + 1)


def test_a_killed_server_gives_a_clear_error_and_keeps_the_shards(server, local_teacher, teacher_dir, tmp_path):
    tokenizer = make_tokenizer()
    prepared = prepared_rows(tokenizer, n=40)
    doomed = VLLMServer(teacher_dir, tmp_path / "doomed.log")
    folder = tmp_path / "cache"
    settings = dict(top_k=TOP_K, temperature=1.0, shard_rows=4, logprob_bits=32, progress=False)

    def kill_after_two_shards():
        deadline = time.monotonic() + 300
        while len(list(folder.glob("shard-*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        doomed.stop()

    killer = threading.Thread(target=kill_after_two_shards)
    try:
        client = TeacherServer(doomed.url, max_retries=2, backoff_s=0.1, timeout_s=5)
        killer.start()
        with pytest.raises(TeacherServerError, match="failed POST /v1/completions 3 times.*resume"):
            write_teacher_cache(client, prepared, tokenizer, folder, batch_size=2, **settings)
    finally:
        killer.join()
        doomed.stop()
    written = sorted(p.name for p in folder.glob("shard-*.arrow"))
    assert 2 <= len(written) < 10 and not (folder / "metadata.json").exists()
    # the same command against a live server resumes: only the missing shards are requested
    resumed = write_teacher_cache(TeacherServer(server.url), prepared, tokenizer, folder, batch_size=2, **settings)
    local = write_teacher_cache(local_teacher, prepared, tokenizer, tmp_path / "local", batch_size=4, **settings)
    assert_same_cache(resumed, local, list(range(len(prepared))))
    shutil.rmtree(folder)


def test_a_teacher_with_another_tokenizer_behind_the_server(tmp_path):
    """vLLM serving a teacher with a SentencePiece-style tokenizer (cross_tokenizer_loss): the server's /tokenize
    agrees with that tokenizer, and three SGD steps of the hybrid loss from the server equal three steps from the
    local pass's cross-tokenizer cache at the same k (tests/test_cross_tokenizer_served.py runs the rest of this
    against a protocol stand-in)."""
    from test_cross_tokenizer import metaspace_tokenizer
    from test_cross_tokenizer_cache import aligned_rows
    from test_cross_tokenizer_trainer import ALPHABET

    tokenizer, teacher_tokenizer = make_tokenizer(), metaspace_tokenizer(120, alphabet_from=ALPHABET)
    folder = tmp_path / "cross-teacher"
    teacher = tiny_llama(len(teacher_tokenizer), hidden=64, seed=2, num_attention_heads=2, num_key_value_heads=2)
    teacher.save_pretrained(folder)
    teacher_tokenizer.save_pretrained(folder)
    rows = Dataset.from_list(prompt_completion_rows(12, seed=5))
    write_teacher_cache(teacher.eval(), aligned_rows(rows, tokenizer, teacher_tokenizer), tokenizer,
                        tmp_path / "cache", top_k=TOP_K, temperature=1.0, shard_rows=8, batch_size=4,
                        logprob_bits=32, progress=False, teacher_tokenizer=teacher_tokenizer)
    server = VLLMServer(folder, tmp_path / "server.log")
    try:
        TeacherServer(server.url).check_tokenizer(teacher_tokenizer)
        runs = {}
        for source, fields in (("served", {"teacher_server": server.url, "teacher_server_top_k": TOP_K}),
                               ("cached", {"teacher_cache": str(tmp_path / "cache")})):
            student = tiny_llama(len(tokenizer), hidden=32, seed=1)
            args = DistillConfig(output_dir=str(tmp_path / source), max_steps=3, per_device_train_batch_size=4,
                                 optim="sgd", learning_rate=0.5, report_to=[], save_strategy="no", logging_steps=1,
                                 max_length=48, seed=0, use_cpu=True, disable_tqdm=True, cross_tokenizer_loss="hybrid",
                                 **fields)
            trainer = DistillTrainer(model=student, args=args, train_dataset=rows, processing_class=tokenizer,
                                     teacher_processing_class=teacher_tokenizer)
            trainer.train()
            runs[source] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                            [p.detach().clone() for p in student.parameters()])
    finally:
        server.stop()
    np.testing.assert_allclose(runs["served"][0], runs["cached"][0], rtol=0, atol=LOGPROB_BOUND)
    for a, b in zip(runs["served"][1], runs["cached"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=3 * 0.5 * LOGPROB_BOUND)
