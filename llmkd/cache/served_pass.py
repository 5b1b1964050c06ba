"""The cache writer's teacher pass when the teacher is behind an inference server (:class:`ServedTeacherPass`)."""

from __future__ import annotations

import numpy as np
import torch

from ..constants import IGNORE_INDEX
from ..teacher_server import RowScores, TeacherServer
from .encoding import EncodedTokens, TokenEncoding


def served_targets(scores: RowScores, labels, vocab_size: int):
    """The cached quantities ``(ids (n, k), log_probs (n, k), tail (n,))`` of one row's trained positions (``u``
    with ``labels[u + 1] != -100``, in order) from the server's :class:`RowScores` (see
    :meth:`RowScores.targets`)."""
    labels = np.asarray(labels)
    ids, log_probs, tail = scores.targets(np.nonzero(labels[1:] != IGNORE_INDEX)[0], vocab_size)
    return torch.from_numpy(ids), torch.from_numpy(log_probs), torch.from_numpy(tail)


class ServedTeacherPass:
    """What :class:`~llmkd.cache.teacher_pass.TeacherPass` does for a local teacher, from a
    :class:`~llmkd.teacher_server.TeacherServer`: every row of a batch is one request, all of them in flight at once
    (up to the server client's ``concurrency``); the answers become the same encoded tokens.

    Only temperature 1 can be cached: the log-probabilities a server returns for prompt tokens are the model's own
    (vLLM applies no temperature to ``prompt_logprobs``), and a top-k at another temperature would need the whole
    distribution's normaliser.
    """

    def __init__(self, server: TeacherServer, dataset, encoding: TokenEncoding, temperature: float, batch_size: int):
        if temperature != 1.0:
            raise ValueError(f"A served teacher's log-probabilities are at temperature 1 (the server applies none "
                             f"to prompt tokens): write the cache with cache_temperature: 1.0, not {temperature}.")
        self.server = server
        self.dataset = dataset.select_columns(["input_ids", "labels"])
        self.encoding = encoding
        self.batch_size = int(batch_size)
        self.forward_calls = 0

    def batches(self, start: int, stop: int, lengths: np.ndarray) -> list[list[int]]:
        """Rows ``[start, stop)`` in order, ``batch_size`` rows per wave of requests."""
        rows = list(range(start, stop))
        return [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]

    def run_batch(self, rows: list[int]) -> tuple[list[int], EncodedTokens, int]:
        columns = self.dataset[rows]
        self.forward_calls += 1
        answers = self.server.score_rows(columns["input_ids"], self.encoding.k)
        counts, parts, read = [], [], 0
        for scores, labels, ids in zip(answers, columns["labels"], columns["input_ids"]):
            targets = served_targets(scores, labels, self.encoding.vocab_size)
            counts.append(targets[0].shape[0])
            parts.append(self.encoding.encode(*targets))
            read += len(ids)
        return counts, EncodedTokens.concatenate(parts, self.encoding), read

    def idle_forward(self) -> None:
        """Nothing to keep in step: the server is shared by every process."""
