"""The files of a cache folder, and writing them so that none is ever visible half-written.

A cache folder holds::

    plan.json              what is being cached (written first; a rerun with another plan is refused)
    shard-00000.arrow      rows [0, shard_rows) of the prepared dataset (Arrow IPC stream, see shard.py)
    shard-00000.json       the shard's record: checksum, size, token count (a cache of facts about the file)
    ...
    metadata.json          written last, once every shard exists: the cache is complete

Every file is written to a hidden temporary name in the same folder, flushed and fsync'ed, then renamed over its
final name (``os.replace`` is atomic on POSIX filesystems), and the folder is fsync'ed so the rename survives a
power cut. A SIGKILL therefore leaves either no file or a complete one, plus possibly a stale temporary file
that the next run deletes. A write that fails (a full disk) removes its temporary file and raises
:class:`~llmkd.cache.errors.CacheWriteError`; the files already written stay valid and a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import CacheCorruptError, CacheWriteError

FORMAT = "llmkd-teacher-cache"
FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
METADATA_FILE = "metadata.json"
TEMP_MARKER = ".tmp-"


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.arrow"


def record_file(index: int) -> str:
    return f"shard-{index:05d}.json"


def num_shards(num_rows: int, shard_rows: int) -> int:
    return (num_rows + shard_rows - 1) // shard_rows


def shard_bounds(index: int, shard_rows: int, num_rows: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``index``."""
    start = index * shard_rows
    return start, min(start + shard_rows, num_rows)


def temporary_path(path: Path) -> Path:
    return path.parent / f".{path.name}{TEMP_MARKER}{os.getpid()}"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete, whenever the process dies."""
    path = Path(path)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:  # e.g. ENOSPC: the final name was never touched; drop the partial temporary
        try:
            temporary.unlink()
        except OSError:
            pass
        raise CacheWriteError(
            f"Could not write {path.name} in {path.parent}: {error.strerror or error}. The files already written "
            "are complete and kept; free some space (or fix the folder) and rerun the same command: it resumes "
            "where it stopped."
        ) from error
    commit(temporary, path)


def commit(temporary: Path, path: Path) -> None:
    """Rename a complete, fsync'ed temporary file over its final name, durably."""
    os.replace(temporary, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: Path, names: set[str]) -> list[Path]:
    """Delete the temporary files left by killed runs for the given final file names; return them."""
    removed = []
    for path in Path(folder).glob(f".*{TEMP_MARKER}*"):
        if path.name[1:].split(TEMP_MARKER)[0] in names:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def sha256_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def json_bytes(content: dict) -> bytes:
    """Deterministic JSON (sorted keys), so equal contents give byte-identical files."""
    return (json.dumps(content, indent=1, sort_keys=True, allow_nan=True) + "\n").encode("utf-8")


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object, raising :class:`CacheCorruptError` naming ``what`` when it is unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CacheCorruptError(f"{what} {path} is missing.") from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as error:
        raise CacheCorruptError(f"{what} {path} is not valid JSON ({error}); the file is truncated or damaged. "
                                "Rewrite the cache with llmkd cache-teacher.") from None
    if not isinstance(content, dict):
        raise CacheCorruptError(f"{what} {path} does not hold a JSON object.")
    return content
