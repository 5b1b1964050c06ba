"""Fingerprints that tie a cache to the tokenizer and the prepared dataset it was written from.

* :func:`tokenizer_fingerprint`: the token <-> id mapping (what a cached id means); :func:`tokenizers_fingerprint`
  the pair's, for a teacher with another tokenizer;
* :func:`row_hashes`: one 64-bit hash per prepared row over the columns the teacher's computation depends on
  (``input_ids``, ``attention_mask``, ``labels`` and any image field), so a mismatch can be traced to its first
  differing row; columns a trainer adds afterwards (e.g. a row index) do not count;
* :func:`dataset_fingerprint`: a hash of the row count and all row hashes;
* :func:`valid_token_counts`: the number of cached tokens of each row; :func:`row_lengths`: input tokens per row.

Every function reads the dataset in slices through ``with_format("arrow")`` (honouring any indices mapping left
by ``filter``/``select``), so memory stays bounded by the slice.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from ..constants import IGNORE_INDEX
from ..cross_tokenizer.dataset import ALIGNMENT_COLUMNS, TEACHER_SPANS
from ..data import IMAGE_FIELDS

TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")
SLICE_ROWS = 4096


def tokenizer_fingerprint(tokenizer) -> str:
    """``"sha256:<hex>"`` of the tokenizer's token -> id mapping (added tokens included) and its length."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    payload = json.dumps({"vocab": vocab, "len": len(tokenizer)}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def tokenizers_fingerprint(tokenizer, teacher_tokenizer=None) -> str:
    """:func:`tokenizer_fingerprint` of ``tokenizer``, or, for a teacher with another tokenizer, of the pair
    (``"sha256:<hex>"`` of both fingerprints): a cross-tokenizer cache is valid for one pair only."""
    student = tokenizer_fingerprint(tokenizer)
    if teacher_tokenizer is None:
        return student
    pair = f"student={student};teacher={tokenizer_fingerprint(teacher_tokenizer)}"
    return "sha256:" + hashlib.sha256(pair.encode("utf-8")).hexdigest()


def hashed_columns(dataset) -> list[str]:
    """The columns of ``dataset`` that enter the row hashes, in a fixed order (a cross-tokenizer row's alignment
    columns included: the teacher's tokens and spans)."""
    names = [c for c in TOKEN_COLUMNS + ALIGNMENT_COLUMNS + tuple(IMAGE_FIELDS) if c in dataset.column_names]
    if "input_ids" not in names or "labels" not in names:
        raise ValueError(f"Expected a prepared dataset (llmkd.data.prepare_dataset) with 'input_ids' and 'labels' "
                         f"columns, got columns {dataset.column_names}.")
    return names


def row_hashes(dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    """``(stop - start,)`` uint64: a hash of each row ``[start, stop)`` of a prepared dataset."""
    columns = hashed_columns(dataset)
    stop = len(dataset) if stop is None else stop
    out = np.zeros(max(stop - start, 0), dtype=np.uint64)
    for offset, table in _slices(dataset, columns, start, stop):
        per_column = [_row_bytes(table.column(name)) for name in columns]
        for i in range(table.num_rows):
            digest = hashlib.blake2b(digest_size=8)
            for name, rows in zip(columns, per_column):
                value = rows(i)
                digest.update(name.encode())
                digest.update(len(value).to_bytes(8, "little"))
                digest.update(value)
            out[offset - start + i] = int.from_bytes(digest.digest(), "little")
    return out


def fingerprint_of_hashes(hashes: np.ndarray) -> str:
    """The dataset fingerprint given all its row hashes."""
    digest = hashlib.sha256(len(hashes).to_bytes(8, "little"))
    digest.update(np.ascontiguousarray(hashes, dtype="<u8").tobytes())
    return "sha256:" + digest.hexdigest()


def dataset_fingerprint(dataset) -> str:
    """``"sha256:<hex>"`` of a prepared dataset's row count and row hashes (:func:`row_hashes`). Independent of
    how the dataset is stored (chunking, indices mapping, integer widths) and of columns outside
    :func:`hashed_columns`."""
    return fingerprint_of_hashes(row_hashes(dataset))


def valid_token_counts(dataset, start: int = 0, stop: int | None = None) -> np.ndarray:
    """``(stop - start,)`` int64: per row, the positions ``j`` with ``labels[j + 1] != -100`` (the tokens whose
    teacher distribution is cached); for cross-tokenizer rows, the teacher's tokens in trained spans (never a
    row's first token)."""
    stop = len(dataset) if stop is None else stop
    out = np.zeros(max(stop - start, 0), dtype=np.int64)
    column, ignored = ("labels", IGNORE_INDEX) if TEACHER_SPANS not in dataset.column_names else (TEACHER_SPANS, -1)
    for offset, table in _slices(dataset, [column], start, stop):
        values, offsets = _flat_ints(table.column(column))
        trained = np.concatenate([values != ignored, [False]]).astype(np.int64)
        cumulative = np.concatenate([[0], np.cumsum(trained)])
        lengths = np.diff(offsets)
        # shifted labels: position 0 of a row is never a target
        firsts = np.where(lengths > 0, trained[offsets[:-1]], 0)
        counts = cumulative[offsets[1:]] - cumulative[offsets[:-1]] - firsts
        out[offset - start: offset - start + table.num_rows] = counts
    return out


def row_lengths(dataset) -> np.ndarray:
    """``(R,)`` int64: the number of input tokens of each row."""
    out = np.zeros(len(dataset), dtype=np.int64)
    for offset, table in _slices(dataset, ["input_ids"], 0, len(dataset)):
        _, offsets = _flat_ints(table.column("input_ids"))
        out[offset:offset + table.num_rows] = np.diff(offsets)
    return out


def _slices(dataset, columns: list[str], start: int, stop: int):
    arrow = dataset.select_columns(columns).with_format("arrow")
    for offset in range(start, stop, SLICE_ROWS):
        yield offset, arrow[offset:min(offset + SLICE_ROWS, stop)]


def _flat_ints(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list-of-integers column as (all values int64, offsets (rows + 1,) starting at 0)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    offsets = np.asarray(array.offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
    return values, offsets - offsets[0]


def _row_bytes(column: pa.ChunkedArray):
    """A function ``i -> bytes`` giving row ``i``'s canonical bytes (integer lists as int64, anything else as the
    repr of its Python value)."""
    kind = column.type
    if (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type):
        values, offsets = _flat_ints(column)
        return lambda i: values[offsets[i]:offsets[i + 1]].tobytes()
    rows = column.to_pylist()
    return lambda i: repr(rows[i]).encode()
