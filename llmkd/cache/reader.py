"""Reading a teacher cache: :class:`TeacherCache`."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..loading import tokenizer_of
from .encoding import EncodedTokens
from .errors import CacheCorruptError, CacheMismatchError
from .files import METADATA_FILE, PLAN_FILE, read_json, sha256_file, shard_bounds
from .fingerprint import fingerprint_of_hashes, row_hashes, tokenizers_fingerprint, valid_token_counts
from .metadata import check_metadata
from .shard import ShardView, open_shard

RERUN_HINT = ("Rerun llmkd cache-teacher with the same recipe and output_dir: only the missing shards are "
              "recomputed.")
REWRITE_HINT = "Delete that shard's .arrow and .json files. " + RERUN_HINT


class TeacherCache:
    """A teacher-logit cache on disk, read lazily (shards are memory-mapped when first needed).

    Args:
        path: the cache folder written by :func:`~llmkd.cache.write_teacher_cache` / ``llmkd cache-teacher``.
        max_open_shards: memory-mapped shards kept open at once (least recently used are closed).

    Attributes:
        metadata: the content of ``metadata.json`` (k, temperature, vocab_size, teacher, teacher_revision,
            tokenizer_fingerprint, dataset_fingerprint, num_rows, num_tokens, shards with their sha256,
            format_version, dtypes, ...).

    Every shard's sha256 is checked the first time it is opened; a missing or damaged shard raises
    :class:`CacheCorruptError` naming it.
    """

    def __init__(self, path, *, max_open_shards: int = 64):
        self.path = Path(path)
        metadata_path = self.path / METADATA_FILE
        if not metadata_path.exists():
            if (self.path / PLAN_FILE).exists():
                raise CacheCorruptError(
                    f"The teacher cache at {self.path} is incomplete (no {METADATA_FILE}: writing it was interrupted "
                    "or is still running). Rerun llmkd cache-teacher with the same recipe and output_dir to finish "
                    "it; finished shards are kept.")
            raise FileNotFoundError(f"{self.path} is not a teacher cache (no {METADATA_FILE}). Write one with "
                                    "llmkd cache-teacher --config RECIPE.yaml.")
        self.metadata = read_json(metadata_path, "The cache metadata")
        self.encoding = check_metadata(self.metadata, metadata_path)
        self._records = self.metadata["shards"]
        missing = [r["file"] for r in self._records if not (self.path / r["file"]).exists()]
        if missing:
            raise CacheCorruptError(f"The teacher cache at {self.path} lacks the shard file(s) {missing}. "
                                    + RERUN_HINT)
        self._open: OrderedDict[int, ShardView] = OrderedDict()
        self._verified: set[int] = set()
        self.max_open_shards = max_open_shards

    # -------------------------------------------------------------------------------------------- properties
    @property
    def k(self) -> int:
        return int(self.metadata["k"])

    @property
    def temperature(self) -> float:
        return float(self.metadata["temperature"])

    @property
    def vocab_size(self) -> int:
        return int(self.metadata["vocab_size"])

    @property
    def num_rows(self) -> int:
        return int(self.metadata["num_rows"])

    @property
    def num_tokens(self) -> int:
        return int(self.metadata["num_tokens"])

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.path)!r}, rows={self.num_rows}, tokens={self.num_tokens}, k={self.k}, "
                f"temperature={self.temperature}, vocab_size={self.vocab_size}, teacher={self.metadata['teacher']!r})")

    # ------------------------------------------------------------------------------------------------ reading
    def rows(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached tokens of the given rows of the prepared dataset, concatenated in the given order.

        Returns:
            ``topk_ids`` ``(N, k)`` int64 and ``topk_logprobs`` ``(N, k)`` float32, each token's entries by
            decreasing log-probability, and ``tail_logprob`` ``(N,)`` float32 (``-inf`` when k = V); ``N`` is the
            total number of valid tokens of the rows (row ``i``'s valid tokens are the positions ``j`` with
            ``labels[j + 1] != -100``, in order).
        """
        indices = np.asarray(list(indices), dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_rows):
            bad = int(indices[(indices < 0) | (indices >= self.num_rows)][0])
            raise IndexError(f"Row {bad} is outside the cache's {self.num_rows} rows.")
        shard_rows = int(self.metadata["shard_rows"])
        parts = []
        for shard, group in itertools.groupby(indices.tolist(), key=lambda r: r // shard_rows):
            local = [r - shard * shard_rows for r in group]
            parts.append(self._shard(shard).tokens(local))
        return self.encoding.decode(EncodedTokens.concatenate(parts, self.encoding))

    def row_token_counts(self, indices: Sequence[int]) -> np.ndarray:
        """``(len(indices),)`` int64: the number of cached tokens of each row."""
        shard_rows = int(self.metadata["shard_rows"])
        out = []
        for row in indices:
            view = self._shard(int(row) // shard_rows)
            local = int(row) % shard_rows
            out.append(int(view.offsets[local + 1] - view.offsets[local]))
        return np.asarray(out, dtype=np.int64)

    def _shard(self, index: int) -> ShardView:
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        view = self._checked_shard(index, verify_checksum=index not in self._verified)
        self._verified.add(index)
        self._open[index] = view
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return view

    def _checked_shard(self, index: int, verify_checksum: bool) -> ShardView:
        record = self._records[index]
        name, path = record["file"], self.path / record["file"]
        if not path.exists():
            raise CacheCorruptError(f"Shard {name} of the teacher cache at {self.path} is missing. " + RERUN_HINT)
        if verify_checksum:
            found = sha256_file(path)
            if found != record["sha256"]:
                raise CacheCorruptError(
                    f"Shard {name} of the teacher cache at {self.path} fails its checksum (expected "
                    f"{record['sha256']}, found {found}): the file is damaged. " + REWRITE_HINT)
        view = open_shard(path, self.encoding, name)
        start, stop = shard_bounds(index, int(self.metadata["shard_rows"]), self.num_rows)
        if not np.array_equal(view.rows, np.arange(start, stop)) or int(view.offsets[-1]) != record["num_tokens"]:
            raise CacheCorruptError(f"Shard {name} of the teacher cache at {self.path} does not hold rows "
                                    f"[{start}, {stop}) with {record['num_tokens']} tokens as the metadata says. "
                                    + REWRITE_HINT)
        return view

    # --------------------------------------------------------------------------------------------- checking
    def check_compatible(self, tokenizer, prepared_dataset, *, temperature: float | None = None,
                         teacher_tokenizer=None) -> None:
        """Raise :class:`CacheMismatchError` unless the cache was written for this tokenizer (with a teacher of
        another tokenizer: this pair of tokenizers) and this prepared dataset (row for row), and, when given, this
        temperature. The message names every difference and, for the dataset, the first row that differs."""
        problems = []
        tokenizer = tokenizer_of(tokenizer)
        fingerprint = tokenizers_fingerprint(tokenizer, teacher_tokenizer)
        if teacher_tokenizer is not None and fingerprint != self.metadata["tokenizer_fingerprint"]:
            problems.append("tokenizers: the cache was not written for this student tokenizer and this teacher "
                            "tokenizer (a cross-tokenizer cache holds the teacher's ids for one pair); cached token "
                            "ids or alignments would mean other tokens")
        elif fingerprint != self.metadata["tokenizer_fingerprint"]:
            problems.append(
                f"tokenizer: the cache was written with a tokenizer of {self.metadata['tokenizer_size']} tokens "
                f"({self.metadata['tokenizer_fingerprint'][:19]}...), this one has {len(tokenizer)} tokens "
                f"({fingerprint[:19]}...); cached token ids would mean other tokens")
        if len(prepared_dataset) != self.num_rows:
            problems.append(f"row count: the cache holds {self.num_rows} rows, the prepared dataset has "
                            f"{len(prepared_dataset)}")
        hashes = row_hashes(prepared_dataset)
        if fingerprint_of_hashes(hashes) != self.metadata["dataset_fingerprint"]:
            problems.append("dataset: " + self._first_differing_row(prepared_dataset, hashes))
        if temperature is not None and abs(float(temperature) - self.temperature) > 1e-12:
            problems.append(f"temperature: the cache holds log-probabilities at {self.temperature}, the run uses "
                            f"{temperature}")
        if problems:
            source = self.metadata.get("source") or {}
            written = ", ".join(f"{k}={v!r}" for k, v in sorted(source.items()))
            raise CacheMismatchError(
                f"The teacher cache at {self.path} does not match this run:\n  - " + "\n  - ".join(problems) +
                (f"\nThe cache was written from: {written}." if written else "") +
                "\nA cache is valid only for the prepared rows it was written from (same data, tokenizer, "
                "max_length, completion_only_loss). Rewrite it for this run with llmkd cache-teacher --config "
                "RECIPE.yaml.")

    def _first_differing_row(self, dataset, hashes: np.ndarray) -> str:
        """Describe the first row whose content differs from the cached one's (row hashes compare rows)."""
        shard_rows = int(self.metadata["shard_rows"])
        common = min(len(hashes), self.num_rows)
        for index in range((common + shard_rows - 1) // shard_rows):
            record = self._records[index]
            view = open_shard(self.path / record["file"], self.encoding, record["file"])  # no checksum: diagnosis
            start = index * shard_rows
            theirs = view.row_hashes[: max(0, common - start)]
            differ = np.flatnonzero(theirs != hashes[start:start + len(theirs)])
            if differ.size:
                row = start + int(differ[0])
                cached = int(view.offsets[row - start + 1] - view.offsets[row - start])
                found = int(valid_token_counts(dataset, row, row + 1)[0])
                length = len(dataset[row]["input_ids"])
                return (f"row {row} differs from the row the cache was written from (the cache holds {cached} "
                        f"target tokens for it; this row has {length} input tokens and {found} target tokens)")
        return (f"the first {common} rows are the ones cached, but the row counts differ ({self.num_rows} cached "
                f"vs {len(hashes)})")

    def verify(self) -> dict:
        """Re-check every shard (presence, sha256, structure, token counts) and return a summary; raise
        :class:`CacheCorruptError` listing every bad shard."""
        errors = []
        for index in range(len(self._records)):
            try:
                view = self._checked_shard(index, verify_checksum=True)
                del view
                self._verified.add(index)
            except CacheCorruptError as error:
                errors.append(str(error))
        if errors:
            raise CacheCorruptError(f"{len(errors)} of {len(self._records)} shards of the teacher cache at "
                                    f"{self.path} are bad:\n  - " + "\n  - ".join(errors))
        return {
            "path": str(self.path), "teacher": self.metadata["teacher"], "rows": self.num_rows,
            "tokens": self.num_tokens, "shards": len(self._records), "k": self.k, "temperature": self.temperature,
            "vocab_size": self.vocab_size, "logprob_bits": int(self.metadata["logprob_bits"]),
            "bytes": int(self.metadata["bytes"]), "bytes_per_token": self.metadata["bytes_per_token"],
        }
