"""One shard of a cache: an Arrow IPC stream file (what ``datasets`` writes and ``Dataset.from_file`` reads)
holding a range of prepared-dataset rows, one Arrow row per dataset row:

    row            int64                          the row's index in the prepared dataset
    row_hash       uint64                         llmkd.cache.fingerprint.row_hashes of that row
    topk_ids       list<fixed_size_binary[Bi]>    per cached token, the Elias-Fano code of the top-k ids
    topk_logprobs  list<fixed_size_binary[Bl]>    per cached token, the k log-probability codes
    tail_logprob   list<halffloat>                per cached token, log of the mass outside the top-k

(``llmkd.cache.encoding`` defines the codes). A shard is one record batch, read through a memory map: the
token arrays are numpy views into the mapped file, nothing is loaded until touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .encoding import EncodedTokens, TokenEncoding
from .errors import CacheCorruptError


def shard_schema(encoding: TokenEncoding) -> pa.Schema:
    return pa.schema([
        ("row", pa.int64()),
        ("row_hash", pa.uint64()),
        ("topk_ids", pa.list_(pa.binary(encoding.ids_bytes))),
        ("topk_logprobs", pa.list_(pa.binary(encoding.logprob_bytes))),
        ("tail_logprob", pa.list_(pa.float16())),
    ])


def serialize_shard(rows: np.ndarray, hashes: np.ndarray, counts: np.ndarray, tokens: EncodedTokens,
                    encoding: TokenEncoding) -> bytes:
    """The bytes of a shard file.

    Args:
        rows: ``(R,)`` int64 dataset row indices; hashes: ``(R,)`` uint64 row hashes.
        counts: ``(R,)`` cached tokens per row; ``tokens``: their ``sum(counts)`` encoded tokens, row after row.
    """
    if int(counts.sum()) != len(tokens):
        raise ValueError(f"{int(counts.sum())} tokens counted but {len(tokens)} encoded.")
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32), pa.int32())

    def binary(values: np.ndarray, width: int) -> pa.Array:
        buffer = pa.py_buffer(np.ascontiguousarray(values, dtype=np.uint8).tobytes())
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, buffer])

    table = pa.table([
        pa.array(rows, pa.int64()),
        pa.array(hashes, pa.uint64()),
        pa.ListArray.from_arrays(offsets, binary(tokens.ids, encoding.ids_bytes)),
        pa.ListArray.from_arrays(offsets, binary(tokens.logprobs, encoding.logprob_bytes)),
        pa.ListArray.from_arrays(offsets, pa.array(tokens.tail, pa.float16())),
    ], schema=shard_schema(encoding))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)  # one record batch: every column is a single array
    return sink.getvalue().to_pybytes()


@dataclass
class ShardView:
    """A memory-mapped shard: ``rows`` ``(R,)``, ``row_hashes`` ``(R,)``, ``offsets`` ``(R + 1,)`` (tokens of local
    row ``j`` are ``[offsets[j], offsets[j + 1])``), and the token arrays ``ids`` ``(T, Bi)`` uint8, ``logprobs``
    ``(T, Bl)`` uint8, ``tail`` ``(T,)`` float16, all views into the mapped file."""

    path: Path
    rows: np.ndarray
    row_hashes: np.ndarray
    offsets: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray
    tail: np.ndarray
    _table: pa.Table  # keeps the memory map alive

    def tokens(self, local_rows) -> EncodedTokens:
        """The encoded tokens of the given local rows, concatenated in that order (copies only those)."""
        spans = [np.arange(self.offsets[j], self.offsets[j + 1]) for j in local_rows]
        index = np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)
        return EncodedTokens(self.ids[index], self.logprobs[index], self.tail[index])


def open_shard(path: Path, encoding: TokenEncoding, name: str) -> ShardView:
    """Memory-map a shard and check its structure (schema, one record batch); :class:`CacheCorruptError` naming
    ``name`` when it is not a shard of this encoding."""
    try:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_stream(source).read_all()
    except FileNotFoundError:
        raise CacheCorruptError(f"Shard {name} ({path}) is missing.") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as error:
        raise CacheCorruptError(f"Shard {name} ({path}) is not a readable Arrow stream: {error}") from None
    if table.schema != shard_schema(encoding):
        raise CacheCorruptError(f"Shard {name} ({path}) has schema {table.schema}, expected "
                                f"{shard_schema(encoding)} for this cache's encoding.")
    if any(column.num_chunks > 1 for column in table.columns):
        raise CacheCorruptError(f"Shard {name} ({path}) holds several record batches; llmkd writes one.")
    if table.num_rows == 0:
        empty = np.zeros(0, np.int64)
        tokens = encoding.empty()
        return ShardView(Path(path), empty, empty.astype(np.uint64), np.zeros(1, np.int64), tokens.ids,
                         tokens.logprobs, tokens.tail, table)
    ids_list = table.column("topk_ids").chunk(0)
    offsets = ids_list.offsets.to_numpy().astype(np.int64)
    for column in ("topk_logprobs", "tail_logprob"):
        other = table.column(column).chunk(0).offsets.to_numpy()
        if not np.array_equal(other, offsets):
            raise CacheCorruptError(f"Shard {name} ({path}): the token counts of topk_ids and {column} differ.")
    return ShardView(
        path=Path(path),
        rows=table.column("row").chunk(0).to_numpy(),
        row_hashes=table.column("row_hash").chunk(0).to_numpy(),
        offsets=offsets - offsets[0],
        ids=_fixed_binary(ids_list.values, encoding.ids_bytes, offsets),
        logprobs=_fixed_binary(table.column("topk_logprobs").chunk(0).values, encoding.logprob_bytes, offsets),
        tail=table.column("tail_logprob").chunk(0).values.to_numpy()[offsets[0]:offsets[-1]],
        _table=table,
    )


def _fixed_binary(array: pa.FixedSizeBinaryArray, width: int, offsets: np.ndarray) -> np.ndarray:
    """A zero-copy ``(T, width)`` uint8 view of the values ``[offsets[0], offsets[-1])`` of a fixed-size binary
    array."""
    if offsets[-1] == offsets[0]:
        return np.zeros((0, width), dtype=np.uint8)
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    start = (array.offset + int(offsets[0])) * width
    stop = (array.offset + int(offsets[-1])) * width
    return data[start:stop].reshape(-1, width)
