"""Packing small unsigned integers into bit strings, vectorised over tokens (numpy).

Bit order is little-endian throughout: value ``j`` of a row occupies bits ``[j * bits, (j + 1) * bits)`` of the
row's bit string, least significant bit first, and bit ``b`` of the string is bit ``b % 8`` of byte ``b // 8``.
"""

from __future__ import annotations

import numpy as np


def packed_bytes(num_bits: int) -> int:
    """Bytes holding ``num_bits`` bits."""
    return (num_bits + 7) // 8


def _width(bits: int) -> int:
    """Bytes of the smallest unsigned numpy integer holding ``bits`` bits (1, 2, 4 or 8)."""
    for width in (1, 2, 4, 8):
        if bits <= 8 * width:
            return width
    raise ValueError(f"at most 64 bits per value, got {bits}.")


def to_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` ``(N, n)`` unsigned ints ``< 2**bits`` -> ``(N, n * bits)`` uint8 array of 0/1, little-endian."""
    num_rows, count = np.shape(values)
    if bits == 0:
        return np.zeros((num_rows, 0), dtype=np.uint8)
    width = _width(bits)
    as_bytes = np.ascontiguousarray(values, dtype=f"<u{width}").view(np.uint8).reshape(num_rows, count, width)
    expanded = np.unpackbits(as_bytes, axis=-1, bitorder="little")[:, :, :bits]  # (N, n, bits)
    return expanded.reshape(num_rows, count * bits)


def from_bits(bit_array: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`to_bits`: ``(N, n * bits)`` 0/1 -> ``(N, n)`` uint64."""
    num_rows = bit_array.shape[0]
    if bits == 0:
        return np.zeros((num_rows, 0), dtype=np.uint64)
    width = _width(bits)
    grouped = bit_array.reshape(num_rows, -1, bits)  # (N, n, bits)
    padded = np.zeros(grouped.shape[:2] + (8 * width,), dtype=np.uint8)
    padded[:, :, :bits] = grouped
    as_bytes = np.packbits(padded, axis=-1, bitorder="little")  # (N, n, width)
    return np.ascontiguousarray(as_bytes).view(f"<u{width}")[:, :, 0].astype(np.uint64)


def pack_rows(bit_array: np.ndarray) -> np.ndarray:
    """``(N, b)`` 0/1 -> ``(N, ceil(b / 8))`` uint8 bytes (little-endian bit order; the last byte zero-padded)."""
    return np.packbits(bit_array, axis=1, bitorder="little")


def unpack_rows(packed: np.ndarray, num_bits: int) -> np.ndarray:
    """``(N, B)`` uint8 bytes -> ``(N, num_bits)`` 0/1, the first ``num_bits`` bits of each row."""
    return np.unpackbits(np.ascontiguousarray(packed), axis=1, count=num_bits, bitorder="little")
