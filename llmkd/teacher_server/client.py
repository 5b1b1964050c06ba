"""An HTTP client for a teacher behind an inference server (:class:`TeacherServer`).

It asks the server to score token ids it is given, through the server's documented API:

- vLLM (``vllm serve``): the OpenAI-compatible ``POST /v1/completions`` with the row's token ids as ``prompt`` and
  ``prompt_logprobs: k``, which returns, at every position after the first, the top-k log-probabilities of the
  next token plus the log-probability of the token that follows in the row;
- SGLang (``python -m sglang.launch_server``): the native ``POST /generate`` with ``input_ids``,
  ``return_logprob``, ``logprob_start_len: 0`` and ``top_logprobs_num: k``, which returns the same two things as
  ``meta_info.input_top_logprobs`` and ``meta_info.input_token_logprobs``.

``api="auto"`` tells them apart by SGLang's ``GET /get_model_info``, which vLLM does not have. Both servers serve
``/v1/models`` (the model name and ``max_model_len``) and ``/tokenize`` (the tokenizer check). One row per
request: the server batches concurrent requests itself (continuous batching), and the client keeps up to
``concurrency`` of them in flight.

Failures: a connection error, a timeout, HTTP 429 or a 5xx answer is retried ``max_retries`` times with
exponential backoff (``backoff_s * 2^attempt``, at most ``max_backoff_s``); then, or at once for any other 4xx
answer (a bad request: the server's own message is quoted), :class:`TeacherServerError` says what failed and how to
fix it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .scores import RowScores, row_scores, sglang_row_scores

logger = logging.getLogger(__name__)

#: texts tokenized by both the server and the local tokenizer at start: words, digits, whitespace, punctuation and
#: non-ASCII text, where tokenizers of different families split differently
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "12 + 345 = 357; 6789 * 10 = 67890",
    "  two spaces,\ttab, new\nline: (brackets) [and] {braces} 'quotes' \"double\" -- dash",
    "def f(x):\n    return x ** 2  # comment",
    "naïve café, Übermaß, 東京, 😀",
)


#: the server APIs :class:`TeacherServer` speaks (``auto``: detected at start)
SERVER_APIS = ("auto", "vllm", "sglang")

#: the environment variable holding the server's API key (kept out of recipes, which are shared and logged)
API_KEY_VARIABLE = "LLMKD_TEACHER_SERVER_API_KEY"


class TeacherServerError(RuntimeError):
    """The teacher server cannot be used: unreachable after retries, refusing the requests, or serving another
    model or tokenizer than the run expects."""


class TeacherServer:
    """A teacher model served over HTTP: vLLM's OpenAI-compatible server (``vllm serve MODEL --max-logprobs K``) or
    SGLang's (``python -m sglang.launch_server --model-path MODEL``).

    Args:
        url: the server's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        model: the served model name to request; None takes the only model the server serves.
        api: ``"vllm"``, ``"sglang"`` or ``"auto"`` (SGLang when the server answers ``GET /get_model_info``).
        api_key: sent as a bearer token when given (``vllm serve --api-key``).
        timeout_s: seconds one request may take before it is retried.
        max_retries: retries of a request that failed for a transient reason (connection, timeout, 429, 5xx).
        backoff_s / max_backoff_s: the first retry's wait, doubled on each further retry up to the maximum.
        concurrency: requests in flight at once.
    """

    def __init__(self, url: str, *, model: str | None = None, api: str = "auto", api_key: str | None = None,
                 timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 concurrency: int = 8):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"teacher_server must be an http(s) URL such as http://127.0.0.1:8000, got {url!r}.")
        if api not in SERVER_APIS:
            raise ValueError(f"teacher_server_api must be one of {SERVER_APIS}, got {api!r}.")
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError(f"concurrency must be >= 1, max_retries >= 0 and timeout_s > 0; got {concurrency}, "
                             f"{max_retries}, {timeout_s}.")
        base = url.rstrip("/")
        self.url = base[:-3] if base.endswith("/v1") else base
        self.api_key, self.timeout_s = api_key, float(timeout_s)
        self.max_retries, self.backoff_s, self.max_backoff_s = int(max_retries), float(backoff_s), float(max_backoff_s)
        self.concurrency = int(concurrency)
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self.requests_sent = 0
        self.retries = 0
        served = self.served_models()
        names = [entry["id"] for entry in served]
        if model is None:
            if len(names) != 1:
                raise TeacherServerError(f"The server at {self.url} serves {names}: name the teacher with "
                                         "teacher_server_model.")
            model = names[0]
        elif model not in names:
            raise TeacherServerError(f"The server at {self.url} does not serve {model!r}; it serves {names}. Set "
                                     "teacher_server_model to one of them, or start the server with that model "
                                     "(vllm serve ... --served-model-name NAME).")
        self.model = model
        entry = served[names.index(model)]
        #: the longest row (prompt tokens) the server accepts, when it says (vLLM's ``max_model_len``)
        self.max_model_len = entry.get("max_model_len")
        #: what the server says it serves (``root``: the weights' path or Hub name, for the cache's metadata)
        self.model_root = entry.get("root") or model
        #: the API scored rows go through: "vllm" (/v1/completions) or "sglang" (/generate)
        self.api = api if api != "auto" else ("sglang" if self._answers("/get_model_info") else "vllm")

    @classmethod
    def from_config(cls, args, url: str | None = None, model: str | None = None,
                    api: str | None = None) -> "TeacherServer":
        """The server a config names (``teacher_server*`` fields, or ``url`` / ``model`` / ``api`` of a
        ``teachers`` entry; the API key from :data:`API_KEY_VARIABLE`)."""
        return cls(url or args.teacher_server, model=model if url else args.teacher_server_model,
                   api=api or args.teacher_server_api, api_key=os.environ.get(API_KEY_VARIABLE),
                   timeout_s=args.teacher_server_timeout, max_retries=args.teacher_server_retries,
                   concurrency=args.teacher_server_concurrency)

    # ------------------------------------------------------------------------------------------------ HTTP
    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            if self.api_key:
                session.headers["Authorization"] = f"Bearer {self.api_key}"
        return session

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request with the retry policy of the module docstring."""
        import requests

        url = self.url + path
        attempt = 0
        while True:
            failure = None
            try:
                self.requests_sent += 1
                response = self._session().request(method, url, json=body, timeout=self.timeout_s)
            except (requests.ConnectionError, requests.Timeout) as error:
                failure = f"{type(error).__name__}: {error}"
            else:
                if response.status_code < 400:
                    return response.json()
                message = _error_message(response)
                if response.status_code != 429 and response.status_code < 500:
                    raise TeacherServerError(f"The teacher server refused {method} {path} (HTTP "
                                             f"{response.status_code}): {message}{_hint(message)}")
                failure = f"HTTP {response.status_code}: {message}"
            if attempt >= self.max_retries:
                raise TeacherServerError(
                    f"The teacher server at {self.url} failed {method} {path} {attempt + 1} times; last: {failure}. "
                    "Check that it is running and reachable (curl " + self.url + "/v1/models), or raise "
                    "teacher_server_timeout / teacher_server_retries. Cache shards already written are kept: rerun "
                    "the same command to resume.")
            wait = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
            logger.warning("Teacher server %s %s failed (%s); retry %d of %d in %.1f s.", method, path, failure,
                           attempt + 1, self.max_retries, wait)
            self.retries += 1
            attempt += 1
            time.sleep(wait)

    def _answers(self, path: str) -> bool:
        """Whether ``GET path`` succeeds, asked once (no retry: the server answered /v1/models just before)."""
        import requests

        try:
            return self._session().get(self.url + path, timeout=self.timeout_s).ok
        except requests.RequestException:
            return False

    def served_models(self) -> list[dict]:
        """``GET /v1/models``: what the server serves (``id``, ``max_model_len``, ``root``, ...)."""
        return self._request("GET", "/v1/models").get("data", [])

    # ------------------------------------------------------------------------------------------------ checks
    def tokenize(self, text: str) -> list[int]:
        """The server's tokenization of ``text`` without special tokens (``POST /tokenize``, vLLM's and SGLang's)."""
        body = {"prompt": text, "add_special_tokens": False}
        if self.api == "vllm":
            body["model"] = self.model
        return self._request("POST", "/tokenize", body)["tokens"]

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a server whose tokenizer is not ``tokenizer``: :data:`PROBE_TEXTS` and ``tokenizer``'s special
        tokens must tokenize to the same ids on both sides."""
        texts = list(PROBE_TEXTS) + [token for token in tokenizer.all_special_tokens if token]
        for text in texts:
            local = tokenizer(text, add_special_tokens=False)["input_ids"]
            served = self.tokenize(text)
            if list(local) != list(served):
                raise TeacherServerError(
                    f"The teacher server's tokenizer differs from the run's: {text!r} is {served[:16]} on the server "
                    f"({self.model}) but {list(local)[:16]} here. Serve a teacher with the student's tokenizer, or "
                    "use a teacher with another tokenizer locally (cross_tokenizer_loss, docs/CROSS_TOKENIZER.md).")

    def check_lengths(self, lengths) -> None:
        """Refuse rows longer than the server's context (``max_model_len``)."""
        longest = int(np.max(lengths)) if len(lengths) else 0
        if self.max_model_len is not None and longest > self.max_model_len:
            raise TeacherServerError(f"A row has {longest} tokens but the server's max_model_len is "
                                     f"{self.max_model_len}: restart it with --max-model-len {longest} or more, or "
                                     "lower max_length.")

    # ------------------------------------------------------------------------------------------------ scoring
    def score(self, token_ids, top_k: int) -> RowScores:
        """The teacher's scores of one row of token ids (:class:`~llmkd.teacher_server.scores.RowScores`)."""
        ids = [int(i) for i in token_ids]
        if len(ids) < 2:
            return row_scores([None] * len(ids), ids, top_k)
        if self.api == "sglang":
            return self._score_sglang(ids, top_k)
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}
        answer = self._request("POST", "/v1/completions", body)
        try:
            entries = answer["choices"][0]["prompt_logprobs"]
        except (KeyError, IndexError, TypeError):
            raise TeacherServerError(f"The server's answer has no prompt_logprobs ({json.dumps(answer)[:300]}): it "
                                     "must be vLLM's OpenAI-compatible server (vllm serve).") from None
        return row_scores(entries, ids, top_k)

    def _score_sglang(self, ids: list[int], top_k: int) -> RowScores:
        # one new token is sampled and thrown away: the prompt's log-probabilities are the answer. Temperature 1 and
        # no top-k/top-p: SGLang turns temperature 0 into top_k 1, and its temperature-scaled log-probabilities
        # (temp_scaled_logprobs) would then be of another distribution
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 1.0},
                "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": top_k,
                "return_text_in_logprobs": False}
        answer = self._request("POST", "/generate", body)
        meta_info = answer.get("meta_info") if isinstance(answer, dict) else None
        if not isinstance(meta_info, dict):
            raise TeacherServerError(f"The server's answer has no meta_info ({json.dumps(answer)[:300]}): it must be "
                                     "SGLang's server (python -m sglang.launch_server), or set teacher_server_api.")
        return sglang_row_scores(meta_info, ids, top_k)

    def submit(self, token_ids, top_k: int) -> Future:
        """:meth:`score` in a background thread (at most ``concurrency`` at once)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="llmkd-teacher-server")
        return self._pool.submit(self.score, token_ids, top_k)

    def score_rows(self, rows, top_k: int) -> list[RowScores]:
        """:meth:`score` of each row, ``concurrency`` requests in flight."""
        futures = [self.submit(row, top_k) for row in rows]
        return [future.result() for future in futures]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"TeacherServer({self.url!r}, model={self.model!r}, api={self.api!r})"


def _error_message(response) -> str:
    try:
        payload = response.json()
    except ValueError:
        return response.text[:300]
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


def _hint(message: str) -> str:
    if "logprobs" in message and "max" in message:
        return " (start the server with --max-logprobs of at least the run's top-k)"
    if "out of vocabulary" in message:
        return " (the rows hold token ids the served model does not have: another tokenizer?)"
    return ""
