"""Elias-Fano coding of a token's top-k ids: ``k`` distinct ids below ``V`` in a fixed number of bits.

A set of ``n`` distinct integers in ``[0, U)`` has ``log2 C(U, n)`` bits of information, about
``n * (log2(U / n) + 1.44)``; Elias-Fano stores it in ``n * (L + 1) + ((U - 1) >> L) + 1`` bits,
``L = floor(log2(U / n))``, within 2 bits per id of that bound, and the size depends on ``(U, n)`` only, so every
token of a cache has the same byte size (fixed-width rows, memory-mapped random access). For ``U = 32000,
n = 64`` that is 700 bits (88 bytes) against 1024 bits for plain uint16 ids.

Layout of one token's bit string (see :mod:`llmkd.cache.bits` for the bit order): the ``n`` low parts
(``id & (2**L - 1)``, ``L`` bits each, in increasing id order), then the upper bit vector: for the i-th smallest
id, bit ``(id >> L) + i`` is set.
"""

from __future__ import annotations

import numpy as np

from .bits import from_bits, packed_bytes, pack_rows, to_bits, unpack_rows


def low_bits(universe: int, count: int) -> int:
    """``L = floor(log2(universe / count))`` (0 when ``count >= universe``)."""
    return max(0, (universe // count).bit_length() - 1)


def upper_bits(universe: int, count: int) -> int:
    """Length of the upper bit vector: ``count + ((universe - 1) >> L)``."""
    return count + ((universe - 1) >> low_bits(universe, count))


def encoded_bits(universe: int, count: int) -> int:
    """Total bits of one encoded set."""
    return count * low_bits(universe, count) + upper_bits(universe, count)


def encoded_bytes(universe: int, count: int) -> int:
    """Bytes of one encoded set (the bit string zero-padded to whole bytes)."""
    return packed_bytes(encoded_bits(universe, count))


def encode(ids: np.ndarray, universe: int) -> np.ndarray:
    """Encode sets of ids.

    Args:
        ids: ``(N, n)`` integers, each row strictly increasing and in ``[0, universe)``.
        universe: ``U``, the vocabulary size.
    Returns:
        ``(N, encoded_bytes(universe, n))`` uint8.
    """
    ids = np.asarray(ids, dtype=np.int64)
    num_rows, count = ids.shape
    low = low_bits(universe, count)
    upper = np.zeros((num_rows, upper_bits(universe, count)), dtype=np.uint8)
    positions = (ids >> low) + np.arange(count, dtype=np.int64)  # (N, n), strictly increasing per row
    upper[np.arange(num_rows)[:, None], positions] = 1
    low_values = ids & ((1 << low) - 1)
    return pack_rows(np.concatenate([to_bits(low_values, low), upper], axis=1))


def decode(packed: np.ndarray, universe: int, count: int) -> np.ndarray:
    """Decode :func:`encode`'s output ``(N, B)`` uint8 into ``(N, count)`` int64 ids, increasing per row.

    Raises ``ValueError`` when a row's upper bit vector does not hold exactly ``count`` set bits (the bytes are not
    an Elias-Fano code of ``count`` ids, e.g. corrupted).
    """
    num_rows = packed.shape[0]
    low = low_bits(universe, count)
    bits = unpack_rows(packed, encoded_bits(universe, count))
    low_values = from_bits(bits[:, : count * low], low).astype(np.int64) if low else 0
    upper = bits[:, count * low:]
    set_bits = upper.sum(axis=1, dtype=np.int64)
    if num_rows and not np.all(set_bits == count):
        bad = int(np.flatnonzero(set_bits != count)[0])
        raise ValueError(f"token {bad}: the id code holds {int(set_bits[bad])} ids, expected {count}.")
    _, columns = np.nonzero(upper)  # row-major: each row's positions in increasing order
    high = columns.reshape(num_rows, count) - np.arange(count, dtype=np.int64)
    return (high << low) | low_values
