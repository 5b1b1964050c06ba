"""Writing a teacher cache: :func:`write_teacher_cache`.

Crash safety and resumption (see :mod:`llmkd.cache.files` for the atomic writes):

1. ``plan.json`` fixes what is cached (teacher, tokenizer and dataset fingerprints, k, temperature, encoding,
   shard size). A folder holding another plan is refused, so shards of two different runs never mix.
2. Each shard is computed in memory, serialised, checksummed and written atomically; its record
   (``shard-XXXXX.json``) follows. A shard file that exists is complete and is never recomputed.
3. Once every process has finished its shards, process 0 writes ``metadata.json``: from that moment on the folder
   is a cache. A rerun after a crash computes only the missing shards; since a shard's bytes depend only on its
   rows (fixed batching, deterministic encoding), the result equals an uninterrupted run's.

Under N processes shard ``s`` is written by process ``s % N``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..heads import unwrap_model
from ..loading import tokenizer_of
from ..cross_tokenizer.dataset import is_aligned, teacher_view
from ..teacher_server import TeacherServer
from .distributed import Ranks, is_partitioned
from .encoding import EncodedTokens, TokenEncoding
from .errors import CacheMismatchError
from .files import (
    METADATA_FILE,
    PLAN_FILE,
    json_bytes,
    num_shards,
    read_json,
    record_file,
    remove_stale_temporaries,
    sha256_bytes,
    sha256_file,
    shard_bounds,
    shard_file,
    write_atomic,
)
from .fingerprint import (
    fingerprint_of_hashes,
    hashed_columns,
    row_hashes,
    row_lengths,
    tokenizers_fingerprint,
    valid_token_counts,
)
from .metadata import build_metadata, make_plan, plan_differences
from .reader import TeacherCache
from .shard import open_shard, serialize_shard
from .served_pass import ServedTeacherPass
from .teacher_pass import TeacherPass

logger = logging.getLogger(__name__)


def write_teacher_cache(
    teacher,
    prepared_dataset,
    tokenizer,
    output_dir,
    *,
    top_k: int,
    temperature: float,
    shard_rows: int,
    batch_size: int,
    vocab_size: int | None = None,
    teacher_name: str | None = None,
    teacher_revision: str | None = None,
    accelerator=None,
    logprob_bits: int = 8,
    source: dict | None = None,
    progress: bool = True,
    teacher_tokenizer=None,
) -> TeacherCache:
    """Run ``teacher`` over every row of ``prepared_dataset`` and cache, per valid token, the top-k ids and
    log-probabilities of ``log_softmax(logits[:vocab_size] / temperature)`` and the log of the tail mass.

    Resumable: rerun with the same arguments after a crash and only the missing shards are computed.

    Args:
        teacher: the teacher, placed for the run (on its device; a ZeRO-3/FSDP engine; a bitsandbytes model), or a
            :class:`~llmkd.teacher_server.TeacherServer` (its tokenizer and context are checked first; temperature
            1 only, see :class:`~llmkd.cache.served_pass.ServedTeacherPass`).
        prepared_dataset: the rows as :func:`llmkd.data.prepare_dataset` returns them; row ``i``'s cached tokens
            are the positions ``j`` with ``labels[j + 1] != -100``, in order.
        tokenizer: the tokenizer (or processor) the dataset was prepared with.
        output_dir: the cache folder (created; a partial cache of the same plan there is resumed).
        top_k: ids kept per token. temperature: softmax temperature of the cached log-probabilities.
        shard_rows: dataset rows per shard (the unit of resumption and of the multi-process split).
        batch_size: rows per teacher forward (padded to the longest row of the batch, rows sorted by length).
        vocab_size: the distribution's vocabulary (default ``len(tokenizer)``; a head padded beyond it is cut).
        teacher_name / teacher_revision: recorded in the metadata (default: the model's ``name_or_path``).
        accelerator: an accelerate ``Accelerator``/``PartialState`` for multi-process runs (default: the
            torch.distributed group if one is initialised, else one process).
        logprob_bits: bits per log-probability (8: companded code, default; 2-16; 32: lossless float32).
        source: free-form facts recorded in the metadata (e.g. the recipe's data fields).
        progress: show a tqdm bar (cached tokens/s, ETA) on process 0.
        teacher_tokenizer: for a teacher with another tokenizer, its tokenizer; ``prepared_dataset`` is then
            aligned (:func:`llmkd.cross_tokenizer.dataset.align_dataset`) and each row's cached tokens are the
            teacher's tokens in trained spans, in the teacher's vocabulary (``vocab_size`` defaults to
            ``len(teacher_tokenizer)``); the fingerprint covers both tokenizers and the alignment columns.
    Returns:
        the finished :class:`TeacherCache`.
    """
    ranks = Ranks(accelerator)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    text_tokenizer = tokenizer_of(tokenizer)
    if is_aligned(prepared_dataset) != (teacher_tokenizer is not None):
        raise ValueError("A cache for a teacher with another tokenizer needs both the aligned rows "
                         "(llmkd.cross_tokenizer.dataset.align_dataset) and teacher_tokenizer; got "
                         f"{'aligned' if is_aligned(prepared_dataset) else 'unaligned'} rows and "
                         f"teacher_tokenizer={'given' if teacher_tokenizer is not None else 'None'}.")
    teacher_rows = teacher_view(prepared_dataset) if teacher_tokenizer is not None else prepared_dataset
    side_tokenizer = tokenizer_of(teacher_tokenizer) if teacher_tokenizer is not None else text_tokenizer
    vocab_size = len(side_tokenizer) if vocab_size is None else int(vocab_size)
    encoding = TokenEncoding(vocab_size, int(top_k), int(logprob_bits))
    if temperature <= 0 or shard_rows < 1 or batch_size < 1:
        raise ValueError(f"temperature must be > 0 and shard_rows, batch_size >= 1; got {temperature}, "
                         f"{shard_rows}, {batch_size}.")
    if len(prepared_dataset) == 0:
        raise ValueError("The prepared dataset is empty: nothing to cache.")

    hashes = row_hashes(prepared_dataset)
    counts = valid_token_counts(prepared_dataset)
    shards = num_shards(len(prepared_dataset), shard_rows)
    plan = make_plan(
        teacher=teacher_name or _model_name(teacher), teacher_revision=teacher_revision,
        tokenizer_fingerprint=tokenizers_fingerprint(text_tokenizer, teacher_tokenizer),
        tokenizer_size=len(text_tokenizer),
        dataset_fingerprint=fingerprint_of_hashes(hashes), num_rows=len(prepared_dataset), encoding=encoding,
        temperature=temperature, shard_rows=shard_rows, num_shards=shards, source=source,
    )
    _agree_on_plan(output_dir, plan, ranks)

    mine = list(range(ranks.rank, shards, ranks.world))
    remove_stale_temporaries(output_dir, {shard_file(s) for s in mine} | {record_file(s) for s in mine}
                             | ({PLAN_FILE, METADATA_FILE} if ranks.is_main else set()))
    todo = [s for s in mine if not (output_dir / shard_file(s)).exists()]
    if len(todo) < len(mine):
        logger.info("Resuming the cache in %s: %d of this process's %d shards are already written.", output_dir,
                    len(mine) - len(todo), len(mine))

    pad_token_id = side_tokenizer.pad_token_id if side_tokenizer.pad_token_id is not None \
        else side_tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("The tokenizer has neither a pad token nor an eos token: set tokenizer.pad_token first.")
    lengths = row_lengths(teacher_rows)
    served = isinstance(teacher, TeacherServer)
    if served:  # checked before any request: the server's tokenizer and context
        teacher.check_tokenizer(side_tokenizer)
        teacher.check_lengths(lengths)
        runner = ServedTeacherPass(teacher, teacher_rows, encoding, temperature, batch_size)
    else:
        runner = TeacherPass(teacher, teacher_rows, hashed_columns(teacher_rows), encoding, temperature,
                             batch_size, pad_token_id, _device(teacher))
        unwrap_model(teacher).eval()
    plans = {s: runner.batches(*shard_bounds(s, shard_rows, len(prepared_dataset)),
                               lengths[slice(*shard_bounds(s, shard_rows, len(prepared_dataset)))]) for s in todo}
    forwards = sum(len(b) for b in plans.values())
    lockstep = ranks.world > 1 and not served and is_partitioned(teacher)
    total_forwards = ranks.max(forwards) if lockstep else forwards
    if lockstep:
        logger.info("The teacher is partitioned across %d processes (ZeRO-3/FSDP): process %d runs %d forwards, %d "
                    "of them idle, to stay in step.", ranks.world, ranks.rank, total_forwards,
                    total_forwards - forwards)

    to_cache = int(sum(counts[slice(*shard_bounds(s, shard_rows, len(prepared_dataset)))].sum() for s in todo))
    bar = tqdm(total=to_cache, unit="tok", unit_scale=True, dynamic_ncols=True, desc="Caching teacher top-k",
               disable=not (progress and ranks.is_main))
    started = time.monotonic()
    for s in todo:
        start, stop = shard_bounds(s, shard_rows, len(prepared_dataset))
        _write_shard(output_dir, s, start, stop, plans[s], runner, hashes[start:stop], counts[start:stop],
                     encoding, bar)
    for _ in range(total_forwards - forwards):
        runner.idle_forward()
    bar.close()
    seconds = time.monotonic() - started
    if todo:
        logger.info("Process %d cached %d tokens (%d shards) in %.1f s: %.0f tokens/s.", ranks.rank, to_cache,
                    len(todo), seconds, to_cache / max(seconds, 1e-9))

    ranks.barrier()
    if ranks.is_main:
        _finalize(output_dir, plan, encoding)
    ranks.barrier()
    return TeacherCache(output_dir)


def _agree_on_plan(output_dir: Path, plan: dict, ranks: Ranks) -> None:
    """Write the plan (process 0) or check the folder's plan equals this run's."""
    path = output_dir / PLAN_FILE
    if ranks.is_main and not path.exists():
        write_atomic(path, json_bytes(plan))
    ranks.barrier()
    differences = plan_differences(read_json(path, "The cache plan"), plan)
    if differences:
        raise CacheMismatchError(
            f"{output_dir} already holds a cache (or a partial one) of another plan:\n  - " +
            "\n  - ".join(differences) +
            f"\nWrite to another output_dir, or delete {output_dir} to start over."
        )


def _write_shard(output_dir: Path, index: int, start: int, stop: int, batches: list[list[int]], runner: TeacherPass,
                 hashes: np.ndarray, counts: np.ndarray, encoding: TokenEncoding, bar) -> None:
    per_row: dict[int, EncodedTokens] = {}
    for rows in batches:
        row_counts, tokens, _ = runner.run_batch(rows)
        offset = 0
        for row, count in zip(rows, row_counts):
            if count != counts[row - start]:
                raise RuntimeError(f"Row {row}: the batch has {count} valid tokens but the dataset scan counted "
                                   f"{counts[row - start]}.")
            per_row[row] = EncodedTokens(tokens.ids[offset:offset + count], tokens.logprobs[offset:offset + count],
                                         tokens.tail[offset:offset + count])
            offset += count
        bar.update(sum(row_counts))
    rows = np.arange(start, stop, dtype=np.int64)
    tokens = EncodedTokens.concatenate([per_row[int(r)] for r in rows], encoding)
    data = serialize_shard(rows, hashes, counts, tokens, encoding)
    record = {"file": shard_file(index), "rows": [start, stop], "num_tokens": int(counts.sum()),
              "bytes": len(data), "sha256": sha256_bytes(data)}
    # the old record goes first: a record on disk always describes the shard file beside it
    (output_dir / record_file(index)).unlink(missing_ok=True)
    write_atomic(output_dir / shard_file(index), data)
    write_atomic(output_dir / record_file(index), json_bytes(record))


def _finalize(output_dir: Path, plan: dict, encoding: TokenEncoding) -> None:
    """Collect the shard records (recomputing any a crash left unwritten) and write ``metadata.json``."""
    from .. import __version__

    records = []
    for index in range(plan["num_shards"]):
        shard_path, record_path = output_dir / shard_file(index), output_dir / record_file(index)
        if not shard_path.exists():
            raise RuntimeError(f"Shard {shard_path.name} was not written: a process failed. Rerun to finish.")
        record = read_json(record_path, "Shard record") if record_path.exists() else None
        if record is None or record.get("bytes") != shard_path.stat().st_size:
            view = open_shard(shard_path, encoding, shard_path.name)
            record = {"file": shard_path.name, "rows": list(shard_bounds(index, plan["shard_rows"], plan["num_rows"])),
                      "num_tokens": int(view.offsets[-1]), "bytes": shard_path.stat().st_size,
                      "sha256": sha256_file(shard_path)}
            del view
            write_atomic(record_path, json_bytes(record))
        records.append(record)
    write_atomic(output_dir / METADATA_FILE, json_bytes(build_metadata(plan, records, __version__)))


def _model_name(teacher) -> str:
    if isinstance(teacher, TeacherServer):
        return teacher.model_root
    model = unwrap_model(teacher)
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or type(model).__name__


def _device(teacher):
    device = getattr(teacher, "device", None)
    if device is None:
        device = next(teacher.parameters()).device
    return device
