"""A served teacher's answer for one row, as arrays (:class:`RowScores`; :func:`row_scores` reads vLLM's answer,
:func:`sglang_row_scores` SGLang's)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RowScores:
    """The teacher's scores of one row of ``L`` token ids, for the ``L - 1`` positions that predict a next token.

    Position ``u`` (``0 <= u < L - 1``) is the distribution after the prefix ``ids[:u + 1]``, which predicts
    ``ids[u + 1]``.

    Attributes:
        ids: ``(L - 1, k)`` int64, the top-k token ids by decreasing log-probability.
        log_probs: ``(L - 1, k)`` float32, their log-probabilities (temperature 1, over the served model's head).
        tail: ``(L - 1,)`` float32, the log of the mass outside the top-k, ``log(1 - sum exp(log_probs))``
            (``-inf`` when the top-k hold all of it; see :func:`tail_log_prob`).
        token_log_probs: ``(L - 1,)`` float32, the log-probability of the row's own next token ``ids[u + 1]``
            (what the sampled-token objective needs); ``own_ids`` ``(L - 1,)`` int64 those tokens.
    """

    ids: np.ndarray
    log_probs: np.ndarray
    tail: np.ndarray
    token_log_probs: np.ndarray
    own_ids: np.ndarray

    @property
    def num_positions(self) -> int:
        return self.ids.shape[0]

    def targets(self, positions: np.ndarray, vocab_size: int, sampled_token: bool = False):
        """``(ids (n, k) int64, log_probs (n, k) float32, tail (n,) float32)`` at ``positions`` ``(n,)``, the
        top-k + tail targets of :class:`~llmkd.losses.SparseTeacher` and of the cache.

        The log-probabilities are over the served model's whole head: a top-k id at or beyond ``vocab_size`` (a head
        padded past the tokenizer, whose extra columns a local teacher pass cuts before the softmax) is refused.
        With ``k = vocab_size`` the tail is ``-inf``, as a local pass writes it. ``sampled_token``: the row's own
        next token is made one of the k (in place of the k-th ranked one, whose mass joins the tail when the own
        token ranks below k), so that its log-probability is exact (the sampled-token objective reads it);
        ``k = 0`` rows (:attr:`ids` ``(L - 1, 0)``) then hold the own token alone.
        """
        positions = np.asarray(positions, dtype=np.int64)
        ids, log_probs = self.ids[positions], self.log_probs[positions]
        if sampled_token:
            own_ids, own = self.own_ids[positions], self.token_log_probs[positions]
            if ids.shape[1] == 0:
                ids, log_probs = own_ids[:, None], own[:, None]
            else:
                ids, log_probs = ids.copy(), log_probs.copy()
                outside = ~(ids == own_ids[:, None]).any(axis=1)
                ids[outside, -1], log_probs[outside, -1] = own_ids[outside], own[outside]
            tail = tail_log_prob(log_probs)
        else:
            tail = self.tail[positions]
        if ids.size and int(ids.max()) >= vocab_size:
            raise ValueError(f"The served teacher ranks token {int(ids.max())} in its top-k, outside the "
                             f"{vocab_size}-token vocabulary: its head is larger than the tokenizer. Serve a model "
                             "whose head matches the tokenizer, or use the teacher locally (its extra columns are cut "
                             "there).")
        if ids.shape[1] == vocab_size:
            tail = np.full_like(tail, -np.inf)
        return ids, log_probs, tail


def row_scores(entries: list, token_ids: list[int], top_k: int) -> RowScores:
    """:class:`RowScores` from vLLM's ``prompt_logprobs`` of a row: ``entries[0]`` is None (no prefix) and
    ``entries[i]`` maps token ids (as strings) to ``{"logprob", "rank", ...}``: the top-k by ``rank`` (1-based)
    plus the row's own token ``token_ids[i]`` when it ranks lower."""
    positions = max(len(token_ids) - 1, 0)
    if len(entries) != len(token_ids):
        raise ValueError(f"The server scored {len(entries)} positions of a {len(token_ids)}-token row: it must "
                         "return prompt_logprobs for every prompt token (vLLM's OpenAI-compatible server).")
    ids = np.zeros((positions, top_k), dtype=np.int64)
    log_probs = np.full((positions, top_k), -np.inf, dtype=np.float32)
    own = np.zeros(positions, dtype=np.float32)
    for u in range(positions):
        entry = entries[u + 1]
        if entry is None:
            raise ValueError(f"The server gave no log-probabilities at position {u + 1} of a {len(token_ids)}-token "
                             "row.")
        ranked = sorted((value["rank"], int(token), value["logprob"]) for token, value in entry.items()
                        if value["rank"] <= top_k)
        if len(ranked) != top_k:
            raise ValueError(f"The server returned {len(ranked)} log-probabilities of rank <= {top_k} at position "
                             f"{u + 1}: it must return prompt_logprobs={top_k} (vLLM's --max-logprobs at least k).")
        ids[u] = [token for _, token, _ in ranked]
        log_probs[u] = [value for _, _, value in ranked]
        mine = entry.get(str(token_ids[u + 1]))
        if mine is None:
            raise ValueError(f"The server's answer at position {u + 1} lacks the row's own token {token_ids[u + 1]}.")
        own[u] = mine["logprob"]
    return RowScores(ids, log_probs, tail_log_prob(log_probs), own, np.asarray(token_ids[1:], dtype=np.int64))


def sglang_row_scores(meta_info: dict, token_ids: list[int], top_k: int) -> RowScores:
    """:class:`RowScores` from the ``meta_info`` of SGLang's native ``/generate`` answer for a row asked with
    ``return_logprob``, ``logprob_start_len: 0`` and ``top_logprobs_num: k``: ``input_token_logprobs[i]`` is
    ``[log p(ids[i] | ids[:i]), ids[i], text]`` and ``input_top_logprobs[i]`` the list of the k
    ``[log p, token id, text]`` of that position, both with ``None`` in place of the log-probabilities of the first
    token (no prefix). An answer without that first entry (``L - 1`` of them) is read from position 1."""
    positions = max(len(token_ids) - 1, 0)
    own_entries = meta_info.get("input_token_logprobs")
    top_entries = meta_info.get("input_top_logprobs") if top_k else [None] * len(token_ids)
    if own_entries is None or top_entries is None:
        raise ValueError("The SGLang answer has no input_token_logprobs / input_top_logprobs: it must be asked with "
                         "return_logprob and logprob_start_len 0 (SGLang's native /generate).")
    own_entries, top_entries = (entries[-positions:] if positions else [] for entries in (own_entries, top_entries))
    if len(own_entries) != positions or len(top_entries) != positions:
        raise ValueError(f"The server scored {len(own_entries)} positions of a {len(token_ids)}-token row: it must "
                         "return the log-probabilities of every prompt token (logprob_start_len 0).")
    ids = np.zeros((positions, top_k), dtype=np.int64)
    log_probs = np.full((positions, top_k), -np.inf, dtype=np.float32)
    own = np.zeros(positions, dtype=np.float32)
    for u in range(positions):
        value, token = own_entries[u][0], int(own_entries[u][1])
        if value is None or token != token_ids[u + 1]:
            raise ValueError(f"The server's log-probability at position {u + 1} is {value} of token {token}, not of "
                             f"the row's token {token_ids[u + 1]}.")
        own[u] = value
        if top_k:
            ranked = sorted(((-float(entry[0]), int(entry[1])) for entry in top_entries[u] or []))[:top_k]
            if len(ranked) != top_k:
                raise ValueError(f"The server returned {len(ranked)} top log-probabilities at position {u + 1}, "
                                 f"not top_logprobs_num={top_k}.")
            ids[u] = [token for _, token in ranked]
            log_probs[u] = [-value for value, _ in ranked]
    return RowScores(ids, log_probs, tail_log_prob(log_probs), own, np.asarray(token_ids[1:], dtype=np.int64))


def tail_log_prob(log_probs: np.ndarray) -> np.ndarray:
    """``(n,)``: ``log(1 - sum_k exp(log_probs[:, k]))``, the mass a server's top-k leave out, from float32
    log-probabilities (each exact to a relative ~1e-7, so the tail mass is exact to ~k * 1e-7 absolute). A tail
    the rounding makes non-positive is ``-inf``: the top-k hold all the mass."""
    values = log_probs.astype(np.float64)
    top = np.max(values, axis=1, keepdims=True) if values.shape[1] else np.zeros((values.shape[0], 1))
    with np.errstate(divide="ignore", invalid="ignore"):  # k = 0: an empty sum, log 0 = -inf
        total = np.log(np.sum(np.exp(values - top), axis=1)) + top[:, 0]  # logsumexp over the top-k
    mass = -np.expm1(np.minimum(total, 0.0))  # 1 - sum p, without cancellation near sum p = 1
    return np.where(mass > 0, np.log(np.maximum(mass, 1e-300)), -np.inf).astype(np.float32)
