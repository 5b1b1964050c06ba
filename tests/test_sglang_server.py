"""A teacher behind an SGLang server (its native ``/generate`` API), against tests/sglang_standin.py: a real HTTP
server on 127.0.0.1 answering SGLang's documented protocol with a real tiny model's log-probabilities (SGLang
itself has no CPU build this machine can install; the stand-in's docstring says why and what it follows). The
cache written through it against the local teacher pass, training through it against training from that cache
(alone, and as one of two routed teachers), sampled-token scoring, the API detection, retries, a run stopped by a
failing server, and the refusal of malformed answers.

Tolerances: the stand-in runs the local teacher's own float32 weights one row at a time, the local pass in padded
batches of 4, so the two differ by float32 rounding of the same sums (relative ~1e-6 of |log p| < 10); the bound
is tests/test_served_teacher.py's LOGPROB_BOUND (1e-3), far below what another weight moves (> 0.1, asserted
there and here).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from sglang_standin import SGLangStandIn
from test_served_teacher import (
    LOGPROB_BOUND,
    TOP_K,
    check_cache_from_the_server,
    check_training_from_the_server,
    train,
)
from utils import make_tokenizer, prompt_completion_rows, tiny_llama
from llmkd.cache import write_teacher_cache
from llmkd.data import prepare_dataset
from llmkd.teacher_server import TeacherServer, TeacherServerError, sglang_row_scores


@pytest.fixture(scope="module")
def teacher():
    return tiny_llama(len(make_tokenizer()), hidden=64, seed=3, num_attention_heads=2, num_key_value_heads=2).eval()


@pytest.fixture(scope="module")
def server(teacher):
    running = SGLangStandIn(teacher, make_tokenizer())
    yield running
    running.stop()


def test_the_api_is_detected_and_the_server_checked(server):
    client = TeacherServer(server.url)
    assert client.api == "sglang" and client.model == "tiny-teacher" and client.max_model_len == 256
    assert client.model_root == "/models/tiny"
    client.check_tokenizer(make_tokenizer())
    with pytest.raises(TeacherServerError, match="tokenizer differs"):
        client.check_tokenizer(make_tokenizer(vocab_size=300))
    # told it is vLLM, the client asks for /v1/completions, which SGLang's native server refuses with 404
    with pytest.raises(TeacherServerError, match=r"refused POST /v1/completions \(HTTP 404\)"):
        TeacherServer(server.url, api="vllm").score([5, 6, 7], 2)
    with pytest.raises(ValueError, match="teacher_server_api must be one of"):
        TeacherServer(server.url, api="tgi")


def test_scores_are_the_models_log_probabilities(server, teacher):
    ids = [5, 40, 77, 81, 12, 9, 30]
    scores = TeacherServer(server.url).score(ids, 4)
    log_p = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1).detach()
    top = torch.topk(log_p, 4)
    np.testing.assert_array_equal(scores.ids, top.indices.numpy())
    np.testing.assert_allclose(scores.log_probs, top.values.numpy(), rtol=0, atol=LOGPROB_BOUND)
    np.testing.assert_allclose(scores.token_log_probs, log_p[torch.arange(6), ids[1:]].numpy(), rtol=0,
                               atol=LOGPROB_BOUND)
    rest = torch.logsumexp(torch.sort(log_p, -1, descending=True).values[:, 4:], -1)
    np.testing.assert_allclose(np.exp(scores.tail), rest.exp().numpy(), rtol=0, atol=4 * LOGPROB_BOUND)


def test_cache_from_the_server_equals_the_local_teacher_pass(server, teacher, tmp_path):
    check_cache_from_the_server(TeacherServer(server.url, concurrency=4), teacher, tmp_path, "/models/tiny")


def test_training_from_the_server_equals_training_from_the_local_cache(server, teacher, tmp_path):
    served = check_training_from_the_server(server.url, teacher, tmp_path, teacher_server_api="sglang")
    assert served.teacher_signal.server.api == "sglang"


def test_sampled_tokens_only(server, teacher):
    """top_logprobs_num 0: the row's own tokens' log-probabilities alone (the sampled-token objective)."""
    ids = [5, 40, 77, 81, 12]
    scores = TeacherServer(server.url).score(ids, 0)
    assert scores.ids.shape == (4, 0)
    log_p = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1).detach()
    np.testing.assert_allclose(scores.token_log_probs, log_p[torch.arange(4), ids[1:]].numpy(), rtol=0,
                               atol=LOGPROB_BOUND)
    own, values, tail = scores.targets(np.arange(4), 320, sampled_token=True)
    np.testing.assert_array_equal(own[:, 0], ids[1:])


def test_overloaded_server_is_retried(server):
    client = TeacherServer(server.url, backoff_s=0.01, max_retries=3)
    before = server.requests
    server.fail_next = 2
    scores = client.score([5, 6, 7, 8], 3)
    assert scores.num_positions == 3 and client.retries == 2 and server.requests - before == 3
    server.fail_next = 5
    with pytest.raises(TeacherServerError, match="failed POST /generate 4 times.*HTTP 503"):
        client.score([5, 6, 7, 8], 3)
    server.fail_next = 0


def test_malformed_answers_are_refused():
    ids = [3, 4, 5]
    good_own = [[None, 3, None], [-0.5, 4, None], [-1.0, 5, None]]
    good_top = [None, [[-0.5, 4, None], [-1.2, 9, None]], [[-0.3, 8, None], [-1.0, 5, None]]]
    scores = sglang_row_scores({"input_token_logprobs": good_own, "input_top_logprobs": good_top}, ids, 2)
    np.testing.assert_array_equal(scores.ids, [[4, 9], [8, 5]])
    # an answer without the padded first position is read from position 1
    unpadded = sglang_row_scores({"input_token_logprobs": good_own[1:], "input_top_logprobs": good_top[1:]}, ids, 2)
    np.testing.assert_array_equal(unpadded.log_probs, scores.log_probs)
    with pytest.raises(ValueError, match="no input_token_logprobs"):
        sglang_row_scores({}, ids, 2)
    with pytest.raises(ValueError, match="not of the row's token 5"):
        sglang_row_scores({"input_token_logprobs": [good_own[0], good_own[1], [-1.0, 6, None]],
                           "input_top_logprobs": good_top}, ids, 2)
    with pytest.raises(ValueError, match="returned 1 top log-probabilities at position 2"):
        sglang_row_scores({"input_token_logprobs": good_own, "input_top_logprobs": good_top[:2] + [good_top[2][:1]]},
                          ids, 2)
    with pytest.raises(ValueError, match="scored 1 positions of a 3-token row"):
        sglang_row_scores({"input_token_logprobs": good_own[2:], "input_top_logprobs": good_top[2:]}, ids, 2)


def test_a_served_teacher_among_several(server, teacher, tmp_path):
    """Two routed teachers, a local one and one behind the server: the run equals the run with the served teacher
    replaced by its local cache at the same k (the words teacher's weight 2 doubles its share of the bound), and
    the server is asked for that teacher's rows only."""
    tokenizer = make_tokenizer()
    rows = prompt_completion_rows(16)
    for i, row in enumerate(rows):
        row["domain"] = "words" if i % 3 == 0 else "math"
    data = Dataset.from_list(rows)
    math_dir = tmp_path / "math"
    tiny_llama(len(tokenizer), hidden=48, seed=8).save_pretrained(math_dir)
    tokenizer.save_pretrained(math_dir)
    prepared = prepare_dataset(data.remove_columns("domain"), tokenizer, max_length=128, completion_only_loss=True)
    write_teacher_cache(teacher, prepared, tokenizer, tmp_path / "cache", top_k=TOP_K, temperature=1.0,
                        shard_rows=8, batch_size=4, logprob_bits=32, progress=False)
    math = {"name": "math", "model_name_or_path": str(math_dir)}
    sources = {"served": {"teacher_server": server.url, "teacher_server_api": "sglang"},
               "cached": {"teacher_cache": str(tmp_path / "cache")}}
    runs = {source: train(tmp_path / source, tokenizer, data, teachers=[math, {"name": "words", "weight": 2.0, **words}],
                          teacher_routing_column="domain", teacher_server_top_k=TOP_K)
            for source, words in sources.items()}
    (served, initial, weights_served, losses_served), (cached, _, weights_cached, losses_cached) = runs.values()
    for a, b in zip(weights_served, weights_cached):
        torch.testing.assert_close(a, b, rtol=0, atol=2 * 3 * 0.5 * LOGPROB_BOUND)
    np.testing.assert_allclose(losses_served, losses_cached, rtol=0, atol=2 * LOGPROB_BOUND)
    assert max((a - b).abs().max() for a, b in zip(weights_served, initial)) > 0.01
    logs_served, logs_cached = ([h for h in t.state.log_history if "loss" in h] for t in (served, cached))
    assert [h["tokens/words"] for h in logs_served] == [h["tokens/words"] for h in logs_cached]
    assert sum(h["tokens/words"] for h in logs_served) > 0 and all("kd_loss/math" in h for h in logs_served)
    words = served.teacher_signal.teachers[1].signal
    assert words.server.api == "sglang"
    assert 0 < words.rows_requested <= 6 and words.rows_prefetched == words.rows_requested  # 6 words rows of 16


def test_training_stops_with_a_clear_error_when_the_server_keeps_failing(server, tmp_path):
    tokenizer = make_tokenizer()
    server.fail_next = 10 ** 6
    try:
        with pytest.raises(TeacherServerError, match="failed POST /generate 2 times.*HTTP 503.*reachable"):
            train(tmp_path, tokenizer, Dataset.from_list(prompt_completion_rows(8)), teacher_server=server.url,
                  teacher_server_top_k=4, teacher_server_retries=1)
    finally:
        server.fail_next = 0
