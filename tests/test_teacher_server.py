"""llmkd.teacher_server without a server: the conversion of a server's answer into targets, the tail, the retry
policy against a port nobody listens on, and the refusals of bad settings. The tests against a real vLLM server
are in tests/test_served_teacher.py (the vLLM environment)."""

from __future__ import annotations

import math
import socket
import time

import numpy as np
import pytest
import torch

from utils import make_tokenizer, tiny_llama
from llmkd import DistillConfig
from llmkd.cache.served_pass import ServedTeacherPass
from llmkd.teacher_server import TeacherServer, TeacherServerError, row_scores, tail_log_prob
from llmkd.teacher_signals import ServedTeacher
from llmkd.teacher_signals.served import open_teacher_server

# float32 log-probabilities rounded from float64 ones: |log p| < 20 here, so each is within 20 * 2^-24 ~ 1.2e-6
FLOAT32_LOGPROB = 2e-6


def served_answer(log_probs: np.ndarray, token_ids: list[int], k: int) -> list:
    """vLLM's ``prompt_logprobs`` of a row from float64 log-probabilities ``(L, V)`` (row u: the distribution
    after the prefix ``token_ids[:u + 1]``): None first, then per position the top-k by rank plus the row's own
    token, token ids as strings, log-probabilities as JSON floats of float32 values."""
    entries = [None]
    for u in range(len(token_ids) - 1):
        order = np.argsort(-log_probs[u], kind="stable")
        rank = {int(t): r + 1 for r, t in enumerate(order)}
        chosen = [int(t) for t in order[:k]] + [token_ids[u + 1]]
        entries.append({str(t): {"logprob": float(np.float32(log_probs[u, t])), "rank": rank[t], "decoded_token": "x"}
                        for t in chosen})
    return entries


def random_row(seed: int, length=7, vocab=40):
    generator = np.random.default_rng(seed)
    logits = generator.normal(size=(length - 1, vocab)) * 2.0
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return log_probs, [int(t) for t in generator.integers(0, vocab, size=length)]


@pytest.mark.parametrize("k", [1, 5, 40])
def test_row_scores_are_the_top_k_of_the_distribution(k):
    log_probs, ids = random_row(0)
    scores = row_scores(served_answer(log_probs, ids, k), ids, k)
    order = np.argsort(-log_probs, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(scores.ids, order)
    np.testing.assert_allclose(scores.log_probs, np.take_along_axis(log_probs, order, 1), rtol=0, atol=FLOAT32_LOGPROB)
    np.testing.assert_allclose(scores.token_log_probs, log_probs[np.arange(6), ids[1:]], rtol=0, atol=FLOAT32_LOGPROB)
    np.testing.assert_array_equal(scores.own_ids, ids[1:])
    rest = np.sort(log_probs, axis=1)[:, ::-1][:, k:]
    tail = np.log(np.exp(rest).sum(1)) if k < 40 else np.full(6, -np.inf)
    finite = np.isfinite(tail)
    # the tail mass from float32 top-k log-probs: exact to k * 1.2e-6 in mass, here relative to masses >= 1e-3
    np.testing.assert_allclose(np.exp(scores.tail[finite]), np.exp(tail[finite]), rtol=0, atol=k * FLOAT32_LOGPROB)


def test_tail_is_stable_near_a_full_top_k():
    # top-k holding all but 1e-5 of the mass: log(1 - sum) computed without cancellation
    values = np.log(np.array([[0.5, 0.3, 0.2 - 1e-5]], dtype=np.float64)).astype(np.float32)
    assert float(tail_log_prob(values)[0]) == pytest.approx(math.log(1e-5), abs=0.05)
    # rounding that makes the sum exceed 1: no mass left, -inf (never NaN)
    assert tail_log_prob(np.log(np.array([[0.6, 0.400001]], dtype=np.float32)))[0] == -np.inf
    assert tail_log_prob(np.zeros((2, 0), dtype=np.float32)).tolist() == [0.0, 0.0]  # k = 0: all mass outside


def test_targets_at_positions_and_the_sampled_token():
    log_probs, ids = random_row(1)
    scores = row_scores(served_answer(log_probs, ids, 3), ids, 3)
    positions = np.array([1, 2, 5])
    top, values, tail = scores.targets(positions, 40)
    np.testing.assert_array_equal(top, scores.ids[positions])
    np.testing.assert_array_equal(tail, scores.tail[positions])
    # sampled_token: the own next token is among the k with its exact log-probability; the tail is what is left
    top, values, tail = scores.targets(positions, 40, sampled_token=True)
    for row, u in enumerate(positions):
        own = ids[u + 1]
        assert own in top[row].tolist() and len(set(top[row].tolist())) == 3
        assert values[row, top[row].tolist().index(own)] == pytest.approx(log_probs[u, own], abs=FLOAT32_LOGPROB)
        kept = np.exp(log_probs[u, top[row]]).sum()
        assert math.exp(float(tail[row])) == pytest.approx(1 - kept, abs=3 * FLOAT32_LOGPROB)
    # k = V: no tail, as a local teacher pass writes it
    assert np.all(row_scores(served_answer(log_probs, ids, 40), ids, 40).targets(positions, 40)[2] == -np.inf)


def test_sampled_token_only_rows():
    log_probs, ids = random_row(2)
    scores = row_scores(served_answer(log_probs, ids, 0), ids, 0)
    assert scores.ids.shape == (6, 0)
    top, values, tail = scores.targets(np.arange(6), 40, sampled_token=True)
    np.testing.assert_array_equal(top[:, 0], ids[1:])
    np.testing.assert_allclose(values[:, 0], log_probs[np.arange(6), ids[1:]], atol=FLOAT32_LOGPROB)


def test_bad_answers_are_refused():
    log_probs, ids = random_row(3)
    answer = served_answer(log_probs, ids, 4)
    with pytest.raises(ValueError, match="prompt_logprobs=5"):
        row_scores(answer, ids, 5)  # the server returned fewer than asked (its --max-logprobs)
    with pytest.raises(ValueError, match="scored 7 positions of a 8-token row"):
        row_scores(answer, ids + [1], 4)
    with pytest.raises(ValueError, match="outside the 30-token vocabulary"):
        row_scores(answer, ids, 4).targets(np.arange(6), 30)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_retried_with_backoff_then_a_clear_error():
    started = time.monotonic()
    with pytest.raises(TeacherServerError, match=r"failed GET /v1/models 3 times.*ConnectionError.*resume"):
        TeacherServer(f"http://127.0.0.1:{closed_port()}", max_retries=2, backoff_s=0.2, timeout_s=2)
    assert time.monotonic() - started >= 0.2 + 0.4  # two waits: 0.2 s, then 0.4 s


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="http"):
        TeacherServer("127.0.0.1:8000")
    with pytest.raises(ValueError, match="teacher_server_top_k"):
        DistillConfig(output_dir="out", teacher_server="http://x", teacher_server_top_k=-1, report_to=[])
    tokenizer = make_tokenizer()
    student = tiny_llama(len(tokenizer))
    # the checks that come before any request (server=None would fail at the first one)
    with pytest.raises(ValueError, match="temperature 1"):
        ServedTeacher(None, student, tokenizer, top_k=8, temperature=2.0)
    with pytest.raises(ValueError, match="sampled tokens' log-probabilities only"):
        ServedTeacher(None, student, tokenizer, top_k=0)
    with pytest.raises(ValueError, match="cache_temperature: 1.0"):
        ServedTeacherPass(None, None, None, temperature=0.5, batch_size=4)

    def args(**fields):
        return DistillConfig(output_dir="out", teacher_server="http://127.0.0.1:1", report_to=[], **fields)

    with pytest.raises(ValueError, match="train from one of them"):
        open_teacher_server(args(), student, None, "causal_lm")
    with pytest.raises(ValueError, match="sequence classifiers"):
        open_teacher_server(args(), None, None, "sequence_classification")
    with pytest.raises(ValueError, match="seq_kd"):
        open_teacher_server(args(seq_kd=True), None, None, "causal_lm")
    assert open_teacher_server(DistillConfig(output_dir="out", report_to=[]), None, None, "causal_lm") is None


def test_served_targets_follow_the_valid_positions_of_padded_rows():
    """ServedTeacher.token_targets maps each valid padded position to its row's unpadded position (right and left
    padding), and a row repeated in a batch is requested once."""
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    rows = {}
    requests = []

    class Answers:  # the answers of a server, from known distributions (the HTTP part is tested against vLLM)
        def submit(self, ids, top_k):
            from concurrent.futures import Future

            requests.append(tuple(ids))
            key = tuple(ids)
            if key not in rows:
                rows[key] = random_row(len(rows), length=len(ids), vocab=vocab)[0]
            future = Future()
            future.set_result(row_scores(served_answer(rows[key], list(ids), top_k), list(ids), top_k))
            return future

        def check_tokenizer(self, tokenizer):
            pass

    signal = ServedTeacher(Answers(), tiny_llama(vocab), tokenizer, top_k=4)
    a, b = [5, 9, 11, 30, 7], [8, 12, 40]
    for side in ("right", "left"):
        requests.clear()
        pad = [0, 0]
        ids = torch.tensor([a, b + pad, a] if side == "right" else [a, pad + b, a])
        mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5] if side == "right" else
                            [[1] * 5, [0, 0, 1, 1, 1], [1] * 5])
        valid = torch.zeros(3, 4, dtype=torch.bool)
        valid[0, [1, 3]] = True
        valid[1, [1] if side == "right" else [3]] = True  # b's position 1 (predicts b[2])
        valid[2, [0]] = True
        signal.prefetch({"input_ids": ids, "attention_mask": mask})
        with signal.token_targets({"input_ids": ids, "attention_mask": mask}, valid) as targets:
            expected = [(tuple(a), 1), (tuple(a), 3), (tuple(b), 1), (tuple(a), 0)]
            for n, (row, u) in enumerate(expected):
                order = np.argsort(-rows[row][u], kind="stable")[:4]
                assert targets.ids[n].tolist() == order.tolist()
        assert sorted(requests) == sorted([tuple(a), tuple(b)])  # prefetched once, none requested again
