"""The on-disk encoding of one cached token: top-k ids, their log-probabilities, and the tail log-probability.

Per token, three fixed-width fields (so every token of a cache has the same size):

* ``topk_ids``: the k ids as an Elias-Fano code over the vocabulary (:mod:`llmkd.cache.elias_fano`), in
  increasing id order;
* ``topk_logprobs``: the k log-probabilities in the same (id) order, ``logprob_bits`` bits each
  (:mod:`llmkd.cache.logprob_code`: an 8-bit companded code by default, or lossless float32);
* ``tail_logprob``: float16.

Storing the ids as a set (sorted by id) instead of in rank order saves ``log2(k!)`` bits per token (37 bytes at
k = 64); the rank order is recovered on decoding by sorting on the decoded log-probabilities (ties, which the
quantization creates, broken by increasing id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import elias_fano
from .bits import from_bits, pack_rows, to_bits, unpack_rows
from .logprob_code import LogprobCode

TAIL_BYTES = 2  # float16
CHUNK_TOKENS = 16384  # tokens encoded/decoded at once (bounds the bit arrays' memory)


@dataclass(frozen=True)
class EncodedTokens:
    """N encoded tokens: ``ids`` ``(N, ids_bytes)`` uint8, ``logprobs`` ``(N, logprob_bytes)`` uint8, ``tail``
    ``(N,)`` float16."""

    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray

    def __len__(self) -> int:
        return self.ids.shape[0]

    @staticmethod
    def concatenate(parts: list["EncodedTokens"], encoding: "TokenEncoding") -> "EncodedTokens":
        if not parts:
            return encoding.empty()
        return EncodedTokens(np.concatenate([p.ids for p in parts]), np.concatenate([p.logprobs for p in parts]),
                             np.concatenate([p.tail for p in parts]))


@dataclass(frozen=True)
class TokenEncoding:
    """How the tokens of one cache are encoded: vocabulary size ``V``, ``k`` and ``logprob_bits``."""

    vocab_size: int
    k: int
    logprob_bits: int = 8

    def __post_init__(self):
        if not 1 <= self.k <= self.vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size={self.vocab_size}], got {self.k}.")
        LogprobCode(self.logprob_bits)  # validates the bit width

    @property
    def code(self) -> LogprobCode:
        return LogprobCode(self.logprob_bits)

    @property
    def ids_bytes(self) -> int:
        return elias_fano.encoded_bytes(self.vocab_size, self.k)

    @property
    def logprob_bytes(self) -> int:
        return self.code.num_bytes(self.k)

    @property
    def bytes_per_token(self) -> int:
        """Payload bytes of one token (the shards add a few bytes per row and per file)."""
        return self.ids_bytes + self.logprob_bytes + TAIL_BYTES

    def empty(self) -> EncodedTokens:
        return EncodedTokens(np.zeros((0, self.ids_bytes), np.uint8), np.zeros((0, self.logprob_bytes), np.uint8),
                             np.zeros((0,), np.float16))

    # ------------------------------------------------------------------------------------------------ encode
    def encode(self, ids, logprobs, tail) -> EncodedTokens:
        """Encode N tokens.

        Args:
            ids: ``(N, k)`` distinct token ids per row, each in ``[0, vocab_size)`` (any order).
            logprobs: ``(N, k)`` their log-probabilities.
            tail: ``(N,)`` the log of the probability mass outside the k ids (``-inf`` when ``k = V``).
        """
        ids, logprobs, tail = (_numpy(t) for t in (ids, logprobs, tail))
        if ids.shape != logprobs.shape or ids.ndim != 2 or ids.shape[1] != self.k or tail.shape != ids.shape[:1]:
            raise ValueError(f"expected ids and logprobs (N, {self.k}) and tail (N,), got {ids.shape}, "
                             f"{logprobs.shape}, {tail.shape}.")
        parts = [self._encode_chunk(ids[s:s + CHUNK_TOKENS], logprobs[s:s + CHUNK_TOKENS],
                                    tail[s:s + CHUNK_TOKENS]) for s in range(0, ids.shape[0], CHUNK_TOKENS)]
        return EncodedTokens.concatenate(parts, self)

    def _encode_chunk(self, ids, logprobs, tail) -> EncodedTokens:
        order = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids.astype(np.int64), order, axis=1)
        logprobs = np.take_along_axis(logprobs, order, axis=1)
        if ids.size and (ids[:, 0].min() < 0 or ids[:, -1].max() >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}).")
        if self.k > 1 and ids.size and not (np.diff(ids, axis=1) > 0).all():
            raise ValueError("the k ids of a token must be distinct.")
        code = self.code
        codes = code.encode(logprobs)
        return EncodedTokens(
            ids=elias_fano.encode(ids, self.vocab_size),
            logprobs=pack_rows(to_bits(codes, code.bits)),
            tail=tail.astype(np.float32).astype(np.float16),
        )

    # ------------------------------------------------------------------------------------------------ decode
    def decode(self, encoded: EncodedTokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode N tokens into ``(ids (N, k) long, logprobs (N, k) float32, tail (N,) float32)``, each token's
        entries sorted by decreasing log-probability (ties by increasing id)."""
        ids_parts, lp_parts = [], []
        for start in range(0, len(encoded), CHUNK_TOKENS):
            stop = start + CHUNK_TOKENS
            ids, logprobs = self._decode_chunk(encoded.ids[start:stop], encoded.logprobs[start:stop])
            ids_parts.append(ids)
            lp_parts.append(logprobs)
        if not ids_parts:
            ids = np.zeros((0, self.k), np.int64)
            logprobs = np.zeros((0, self.k), np.float32)
        else:
            ids, logprobs = np.concatenate(ids_parts), np.concatenate(lp_parts)
        tail = np.asarray(encoded.tail, dtype=np.float16).astype(np.float32)
        return torch.from_numpy(ids), torch.from_numpy(logprobs), torch.from_numpy(tail)

    def _decode_chunk(self, ids_bytes: np.ndarray, logprob_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = elias_fano.decode(ids_bytes, self.vocab_size, self.k)  # (n, k), increasing
        code = self.code
        codes = from_bits(unpack_rows(logprob_bytes, self.k * code.bits), code.bits)
        logprobs = code.decode(codes)  # (n, k), in id order
        order = np.argsort(-logprobs, axis=1, kind="stable")  # stable: equal values keep increasing id order
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(logprobs, order, axis=1)

    def describe(self) -> dict:
        """The encoding as recorded in a cache's metadata (``dtypes``)."""
        return {
            "topk_ids": {"name": "elias_fano", "universe": self.vocab_size, "count": self.k,
                         "bytes": self.ids_bytes, "order": "increasing id"},
            "topk_logprobs": {**self.code.describe(), "bytes": self.logprob_bytes, "order": "increasing id"},
            "tail_logprob": {"name": "float16", "bytes": TAIL_BYTES},
            "bytes_per_token": self.bytes_per_token,
            "decoded": {"topk_ids": "int64", "topk_logprobs": "float32", "tail_logprob": "float32"},
        }


def _numpy(tensor) -> np.ndarray:
    if isinstance(tensor, torch.Tensor):
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)
