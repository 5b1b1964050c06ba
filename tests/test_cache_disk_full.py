"""A full disk while writing the teacher cache: the error says what happened and what to do, no half-written file
is left under a final name, the shards already written are kept, and a rerun completes the cache exactly as an
uninterrupted run writes it."""

from __future__ import annotations

import errno
import os

import pytest
from test_cache import BATCH_SIZE, SHARD_ROWS, TEMPERATURE, TOP_K, setup, written  # noqa: F401 (fixtures)

from llmkd.cache import files, write_teacher_cache
from llmkd.cache.errors import CacheWriteError


def write(setup, path):
    teacher, tokenizer, prepared = setup
    return write_teacher_cache(teacher, prepared, tokenizer, path, top_k=TOP_K, temperature=TEMPERATURE,
                               shard_rows=SHARD_ROWS, batch_size=BATCH_SIZE, teacher_name="tiny-teacher",
                               progress=False)


def test_a_full_disk_keeps_written_shards_and_a_rerun_completes_the_cache(setup, written, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    real_fsync, calls = os.fsync, []

    def fsync_until_the_disk_is_full(descriptor):
        # the third shard's data file fails, as a full disk does at flush/fsync time
        name = os.readlink(f"/proc/self/fd/{descriptor}") if os.path.exists(f"/proc/self/fd/{descriptor}") else ""
        if ".shard-00002.arrow" in name:
            calls.append(name)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(descriptor)

    monkeypatch.setattr(files.os, "fsync", fsync_until_the_disk_is_full)
    with pytest.raises(CacheWriteError, match=r"shard-00002\.arrow.*No space left on device.*rerun the same command"):
        write(setup, out)
    assert calls, "the simulated full disk was never hit"
    assert sorted(p.name for p in out.glob("shard-*.arrow")) == ["shard-00000.arrow", "shard-00001.arrow"]
    assert not list(out.glob(".*tmp-*")), "the partial temporary file should be removed"
    assert not (out / "metadata.json").exists()  # the cache is not marked complete
    kept = {p.name: p.read_bytes() for p in out.glob("shard-*")}

    monkeypatch.setattr(files.os, "fsync", real_fsync)  # space freed: rerun
    cache = write(setup, out)
    cache.verify()
    assert {n: (out / n).read_bytes() for n in kept} == kept  # finished shards kept as they were
    for name in sorted(p.name for p in written.path.glob("shard-*.arrow")):
        assert (out / name).read_bytes() == (written.path / name).read_bytes(), name  # = an uninterrupted run
