"""llmkd.cache: the offline teacher cache (writer, reader, encoding, crash safety, multi-process, CLI).

The reference targets are computed here straight from the teacher's logits in float64 (sort, keep k, log of the
summed rest), independently of llmkd.cache.topk.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from distributed.cache_worker import BATCH_SIZE, SHARD_ROWS, TEMPERATURE, TOP_K, teacher_and_data
from distributed.launcher import CHILD_ENV, REPO_DIR, TESTS_DIR, free_port, launch
from utils import make_tokenizer, prompt_completion_rows, tiny_llama, write_local_run

from llmkd.cache import (
    CacheCorruptError,
    CacheMismatchError,
    TeacherCache,
    TokenEncoding,
    dataset_fingerprint,
    teacher_topk,
    tokenizer_fingerprint,
    write_teacher_cache,
)
from llmkd.cache import bits, elias_fano
from llmkd.cache.logprob_code import MAX_NATS, LogprobCode
from llmkd.cli import main as llmkd_main
from llmkd.data import prepare_dataset

WORKER = TESTS_DIR / "distributed" / "cache_worker.py"


# ----------------------------------------------------------------------------------------------- references
def naive_targets(logits: torch.Tensor, k: int, temperature: float, vocab_size: int):
    """Straight from the definition, in float64: ``(N, V_head)`` logits -> ids (N, k), logprobs (N, k), tail (N,)."""
    logp = torch.log_softmax(logits[:, :vocab_size].double() / temperature, dim=-1)
    values, ids = logp.sort(dim=-1, descending=True)
    rest = values[:, k:]
    tail = torch.log(rest.exp().sum(-1)) if rest.shape[1] else torch.full((logits.shape[0],), -math.inf)
    return ids[:, :k], values[:, :k], tail


def direct_targets(teacher, prepared, rows, k, temperature, vocab_size):
    """The targets of ``rows`` from one unpadded teacher forward per row (valid tokens: labels[j + 1] != -100)."""
    parts = []
    with torch.no_grad():
        for row in rows:
            example = prepared[row]
            logits = teacher(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            valid = torch.tensor(example["labels"][1:]) != -100
            parts.append(naive_targets(logits[valid], k, temperature, vocab_size))
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


def by_id(ids: torch.Tensor, values: torch.Tensor):
    order = ids.argsort(dim=-1)
    return ids.gather(-1, order), values.gather(-1, order)


def code_bound(reference: torch.Tensor, bits_per_value: int) -> torch.Tensor:
    """Elementwise bound on |decoded - reference| for the companded code (clamped below -MAX_NATS), plus the float
    noise of a padded batch forward against an unpadded one."""
    code = LogprobCode(bits_per_value)
    nats = (-reference).clamp(min=0)
    return (1 + nats.clamp(max=MAX_NATS)) * math.expm1(code.step / 2) + (nats - MAX_NATS).clamp(min=0) + 1e-4


def assert_matches(decoded, reference, bits_per_value: int = 8):
    ids, logprobs, tail = decoded
    ref_ids, ref_logprobs, ref_tail = reference
    assert ids.dtype == torch.long and logprobs.dtype == torch.float32 and tail.dtype == torch.float32
    assert ids.shape == ref_ids.shape and tail.shape == ref_tail.shape
    # each token's entries by decreasing log-probability
    assert (logprobs[:, :-1] >= logprobs[:, 1:]).all()
    sorted_ids, sorted_values = by_id(ids, logprobs.double())
    ref_sorted_ids, ref_sorted_values = by_id(ref_ids, ref_logprobs)
    assert torch.equal(sorted_ids, ref_sorted_ids), "the top-k ids differ"
    error = (sorted_values - ref_sorted_values).abs()
    assert (error <= code_bound(ref_sorted_values, bits_per_value)).all(), float(error.max())
    finite = torch.isfinite(ref_tail)
    assert torch.equal(torch.isfinite(tail), finite)
    # float16 tail: relative rounding error 2**-11
    assert ((tail.double()[finite] - ref_tail[finite]).abs() <= ref_tail[finite].abs() * 2 ** -11 + 1e-4).all()


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup():
    """The worker's teacher, tokenizer and prepared rows (so in-process and subprocess caches agree)."""
    return teacher_and_data()


@pytest.fixture(scope="module")
def written(setup, tmp_path_factory):
    teacher, tokenizer, prepared = setup
    path = tmp_path_factory.mktemp("cache") / "cache"
    cache = write_teacher_cache(teacher, prepared, tokenizer, path, top_k=TOP_K, temperature=TEMPERATURE,
                                shard_rows=SHARD_ROWS, batch_size=BATCH_SIZE, teacher_name="tiny-teacher",
                                progress=False)
    return cache


@pytest.fixture()
def copied(written, tmp_path):
    """A private copy of the written cache, to damage."""
    path = tmp_path / "cache"
    shutil.copytree(written.path, path)
    return path


# -------------------------------------------------------------------------------------------------- encoding
@pytest.mark.parametrize("width", [1, 3, 8, 11, 15, 16, 18, 32])
def test_bit_packing_round_trip(width):
    values = np.random.default_rng(width).integers(0, 2 ** width, size=(37, 5), dtype=np.uint64)
    flat = bits.to_bits(values, width)
    packed = bits.pack_rows(flat)
    assert packed.shape == (37, bits.packed_bytes(5 * width))
    assert np.array_equal(bits.from_bits(bits.unpack_rows(packed, 5 * width), width), values)


@pytest.mark.parametrize("universe,count,expected_bytes", [
    (32000, 64, 88), (151665, 64, 106), (32000, 8, 14), (151665, 8, 17), (32000, 32, 48), (151665, 32, 57),
    (320, 320, 80), (320, 1, 2), (1, 1, 1), (5, 3, 1),
])
def test_elias_fano_round_trip_and_size(universe, count, expected_bytes):
    rng = np.random.default_rng(universe + count)
    ids = np.sort(np.stack([rng.choice(universe, count, replace=False) for _ in range(50)]), axis=1)
    ids[0] = np.arange(universe - count, universe)  # the largest ids
    code = elias_fano.encode(ids, universe)
    assert code.shape == (50, expected_bytes) == (50, elias_fano.encoded_bytes(universe, count))
    assert np.array_equal(elias_fano.decode(code, universe, count), ids)
    # within 2 bits per id of the information bound log2 C(U, n)
    bound = (math.lgamma(universe + 1) - math.lgamma(count + 1) - math.lgamma(universe - count + 1)) / math.log(2)
    assert elias_fano.encoded_bits(universe, count) <= bound + 2 * count + 1


def test_elias_fano_rejects_a_damaged_code():
    code = elias_fano.encode(np.array([[3, 70, 200]]), 320)
    damaged = code.copy()
    damaged[0, 2] ^= 0b00001000  # bit 19: position 1 of the upper bit vector (after 3 x 6 low bits)
    with pytest.raises(ValueError, match="expected 3"):
        elias_fano.decode(damaged, 320, 3)


@pytest.mark.parametrize("width", [4, 6, 8, 12])
def test_logprob_code_error_is_within_its_bound(width):
    code = LogprobCode(width)
    values = np.concatenate([-np.geomspace(1e-6, MAX_NATS, 4000), [0.0, -MAX_NATS]]).astype(np.float32)[None]
    decoded = code.decode(code.encode(values))[0]
    error = np.abs(decoded - values[0])
    bounds = np.array([code.error_bound(v) for v in values[0]])
    assert (error <= bounds).all()
    assert np.all(np.diff(decoded[:-2]) <= 0)  # monotone: never reverses the order of two values
    assert code.decode(code.encode(np.array([[-np.inf, -1e4, 1e-7]], np.float32)))[0].tolist() == [
        pytest.approx(-MAX_NATS), pytest.approx(-MAX_NATS), 0.0]
    # most precision near 0: the error at log p = -0.1 is a fraction of the error at -10
    assert code.error_bound(-0.1) < 0.2 * code.error_bound(-10.0)


def test_lossless_logprob_code():
    code = LogprobCode(32)
    values = np.array([[0.0, -1e-30, -3.14159, -100.5, -np.inf]], np.float32)
    assert np.array_equal(code.decode(code.encode(values)), values)
    with pytest.raises(ValueError, match="logprob_bits"):
        LogprobCode(20)


def test_teacher_topk_matches_the_definition():
    torch.manual_seed(0)
    logits = torch.randn(50, 40) * 4
    logits[:, 37:] = 1e4  # a padded head: columns past the vocabulary must not count
    for k, temperature in ((1, 1.0), (5, 2.0), (37, 0.5)):
        ids, values, tail = teacher_topk(logits, k, temperature=temperature, vocab_size=37, chunk_tokens=7)
        ref_ids, ref_values, ref_tail = naive_targets(logits, k, temperature, 37)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(values.double(), ref_values, atol=1e-5, rtol=0)
        if k == 37:
            assert torch.isneginf(tail).all()
        else:
            torch.testing.assert_close(tail.double(), ref_tail, atol=1e-5, rtol=1e-5)
    # a tail of mass 1e-30 (where log(1 - sum(top)) would give -inf or garbage) is kept exactly
    peaked = torch.tensor([[0.0, -69.0, -69.0, -80.0]])
    _, _, tail = teacher_topk(peaked, 1)
    assert tail.item() == pytest.approx(math.log(2 * math.exp(-69.0) + math.exp(-80.0)), rel=1e-6)
    with pytest.raises(ValueError, match="vocabulary has 50"):
        teacher_topk(logits, 3, vocab_size=50)


def test_encoding_sizes_per_token():
    """The payload per token (ids + log-probabilities + float16 tail); docs/CACHE.md reports these with the
    measured on-disk sizes."""
    sizes = {(v, k, b): TokenEncoding(v, k, b).bytes_per_token
             for v in (32000, 151665) for k in (8, 32, 64) for b in (8, 6, 32)}
    assert {k: sizes[(32000, k, 8)] for k in (8, 32, 64)} == {8: 24, 32: 82, 64: 154}
    assert {k: sizes[(151665, k, 8)] for k in (8, 32, 64)} == {8: 27, 32: 91, 64: 172}
    assert sizes[(32000, 64, 8)] <= 160 and sizes[(151665, 64, 6)] == 156 <= 160
    assert sizes[(32000, 64, 32)] == 88 + 256 + 2  # lossless


def test_token_encoding_round_trip():
    torch.manual_seed(1)
    encoding = TokenEncoding(1000, 16)
    logits = torch.randn(300, 1000) * 5
    reference = naive_targets(logits, 16, 1.0, 1000)
    ids, values, tail = teacher_topk(logits, 16)
    decoded = encoding.decode(encoding.encode(ids, values, tail))
    assert_matches(decoded, reference)
    empty = encoding.decode(encoding.empty())
    assert [tuple(t.shape) for t in empty] == [(0, 16), (0, 16), (0,)]
    with pytest.raises(ValueError, match="distinct"):
        encoding.encode(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16), torch.zeros(1))


# ------------------------------------------------------------------------------------------- writer / reader
def test_round_trip_against_the_teacher(setup, written):
    teacher, tokenizer, prepared = setup
    rows = [7, 0, 19, 7, 4, 5]  # any order, repeats, across shards
    assert_matches(written.rows(rows), direct_targets(teacher, prepared, rows, TOP_K, TEMPERATURE, len(tokenizer)))
    everything = written.rows(range(len(prepared)))
    assert everything[0].shape == (written.num_tokens, TOP_K)
    assert written.row_token_counts([7, 0]).tolist() == [
        sum(1 for label in prepared[r]["labels"][1:] if label != -100) for r in (7, 0)]
    meta = written.metadata
    assert meta["k"] == TOP_K and meta["temperature"] == TEMPERATURE and meta["vocab_size"] == len(tokenizer)
    assert meta["teacher"] == "tiny-teacher" and meta["num_rows"] == len(prepared) == len(written)
    assert meta["tokenizer_fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert meta["dataset_fingerprint"] == dataset_fingerprint(prepared)
    assert [s["rows"] for s in meta["shards"]] == [[0, 4], [4, 8], [8, 12], [12, 16], [16, 20]]
    assert all(s["sha256"].startswith("sha256:") for s in meta["shards"])
    assert meta["dtypes"]["topk_ids"]["name"] == "elias_fano"
    assert meta["bytes"] == sum((written.path / s["file"]).stat().st_size for s in meta["shards"])
    assert written.rows([])[0].shape == (0, TOP_K)
    with pytest.raises(IndexError, match="outside"):
        written.rows([20])


@pytest.mark.parametrize("logprob_bits", [32, 8])
def test_full_vocabulary(setup, tmp_path, logprob_bits):
    """k = V: the tail is -inf and the whole distribution is stored (exactly with lossless log-probabilities)."""
    teacher, tokenizer, prepared = setup
    vocab = len(tokenizer)
    subset = prepared.select(range(6))
    cache = write_teacher_cache(teacher, subset, tokenizer, tmp_path / "full", top_k=vocab, temperature=1.0,
                                shard_rows=4, batch_size=3, logprob_bits=logprob_bits, progress=False)
    ids, logprobs, tail = cache.rows(range(6))
    assert torch.isneginf(tail).all()
    assert torch.equal(ids.sort(dim=-1).values, torch.arange(vocab).expand_as(ids))
    reference = direct_targets(teacher, subset, range(6), vocab, 1.0, vocab)
    assert_matches((ids, logprobs, tail), reference, logprob_bits)
    if logprob_bits == 32:
        _, values = by_id(ids, logprobs.double())
        _, ref_values = by_id(reference[0], reference[1])
        torch.testing.assert_close(values, ref_values, atol=2e-5, rtol=0)  # float32 vs float64 math only
        torch.testing.assert_close(torch.logsumexp(logprobs.double(), -1), torch.zeros(len(ids), dtype=torch.float64),
                                   atol=1e-5, rtol=0)


def test_rows_without_cached_tokens(tmp_path, tokenizer):
    """A row whose only trained label is its first token has no cached token; its neighbours are unaffected."""
    teacher = tiny_llama(len(tokenizer), hidden=32, seed=3)
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [5, -100, -100, -100]},
            {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
            {"input_ids": [12, 13], "labels": [12, -100]}]
    prepared = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=None)
    cache = write_teacher_cache(teacher, prepared, tokenizer, tmp_path / "c", top_k=4, temperature=1.0,
                                shard_rows=2, batch_size=2, progress=False)
    assert cache.row_token_counts([0, 1, 2]).tolist() == [0, 2, 0]
    assert cache.rows([0, 2])[0].shape == (0, 4)
    assert_matches(cache.rows([0, 1, 2]), direct_targets(teacher, prepared, [1], 4, 1.0, len(tokenizer)))


def test_shards_are_readable_with_datasets(written):
    shard = Dataset.from_file(str(written.path / "shard-00001.arrow"))
    assert shard.column_names == ["row", "row_hash", "topk_ids", "topk_logprobs", "tail_logprob"]
    assert shard["row"] == [4, 5, 6, 7]
    encoding = written.encoding
    assert len(shard[0]["topk_ids"][0]) == encoding.ids_bytes
    assert sum(len(r) for r in shard["tail_logprob"]) == written.metadata["shards"][1]["num_tokens"]


# ----------------------------------------------------------------------------------------------- mismatches
def test_compatible_cache_is_accepted(setup, written):
    _, tokenizer, prepared = setup
    written.check_compatible(tokenizer, prepared, temperature=TEMPERATURE)
    # columns a trainer adds (a row index) and the storage layout do not change the fingerprint
    tagged = prepared.add_column("llmkd_cache_row", list(range(len(prepared))))
    written.check_compatible(tokenizer, tagged.flatten_indices())


def test_another_tokenizer_is_named(setup, written):
    _, tokenizer, prepared = setup
    other = make_tokenizer()
    other.add_tokens(["<tool>"])
    with pytest.raises(CacheMismatchError, match=r"tokenizer: .*318 tokens.*319 tokens") as error:
        written.check_compatible(other, prepared)
    assert "dataset:" not in str(error.value) and "row count:" not in str(error.value)


def test_another_dataset_names_the_first_differing_row(setup, written):
    _, tokenizer, prepared = setup
    rows = prepared.to_list()
    rows[6]["labels"] = [-100] * len(rows[6]["labels"])
    rows[6]["labels"][-1] = rows[6]["input_ids"][-1]
    changed = Dataset.from_list(rows)
    with pytest.raises(CacheMismatchError, match=r"dataset: row 6 differs.*this row has \d+ input tokens and 1 "
                                                 r"target tokens") as error:
        written.check_compatible(tokenizer, changed)
    assert "tokenizer:" not in str(error.value)


def test_another_max_length_is_refused(setup, written):
    _, tokenizer, _ = setup
    rows = prompt_completion_rows(20, seed=5)
    for i, row in enumerate(rows):
        row["completion"] += " one two three" * (i % 3)
    truncated = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=12, completion_only_loss=True)
    with pytest.raises(CacheMismatchError, match=r"dataset: row \d+ differs"):
        written.check_compatible(tokenizer, truncated)


def test_fewer_rows_and_another_temperature_are_named(setup, written):
    _, tokenizer, prepared = setup
    with pytest.raises(CacheMismatchError, match=r"row count: the cache holds 20 rows, the prepared dataset has 15"
                                                 r"(.|\n)*the first 15 rows are the ones cached(.|\n)*temperature"):
        written.check_compatible(tokenizer, prepared.select(range(15)), temperature=1.0)


def test_writing_another_plan_into_a_folder_is_refused(setup, copied):
    teacher, tokenizer, prepared = setup
    with pytest.raises(CacheMismatchError, match=r"k: 8 \(folder\) vs 4 \(this run\)"):
        write_teacher_cache(teacher, prepared, tokenizer, copied, top_k=4, temperature=TEMPERATURE,
                            shard_rows=SHARD_ROWS, batch_size=BATCH_SIZE, teacher_name="tiny-teacher", progress=False)


# ---------------------------------------------------------------------------------------------- corruption
def test_a_flipped_byte_names_the_shard(copied):
    path = copied / "shard-00002.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    cache = TeacherCache(copied)
    assert cache.rows([0, 5])[0].shape[1] == TOP_K  # other shards stay readable
    with pytest.raises(CacheCorruptError, match=r"Shard shard-00002\.arrow .* fails its checksum"):
        cache.rows([9])
    with pytest.raises(CacheCorruptError, match=r"1 of 5 shards .* bad:\n  - Shard shard-00002\.arrow"):
        TeacherCache(copied).verify()


def test_a_deleted_shard_is_named(copied):
    (copied / "shard-00003.arrow").unlink()
    with pytest.raises(CacheCorruptError, match=r"lacks the shard file\(s\) \['shard-00003.arrow'\]"):
        TeacherCache(copied)


def test_damaged_metadata(copied):
    metadata = copied / "metadata.json"
    text = metadata.read_text()
    metadata.write_text(text.replace('"num_tokens": ', '"num_tokens": 1', 1))
    with pytest.raises(CacheCorruptError, match="fails its checksum"):
        TeacherCache(copied)
    metadata.write_text(text[: len(text) // 2])
    with pytest.raises(CacheCorruptError, match="not valid JSON.*truncated"):
        TeacherCache(copied)
    metadata.unlink()
    with pytest.raises(CacheCorruptError, match="incomplete"):
        TeacherCache(copied)
    (copied / "plan.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a teacher cache"):
        TeacherCache(copied)


def test_rerun_recomputes_only_a_deleted_shard(setup, written, copied):
    teacher, tokenizer, prepared = setup
    for name in ("shard-00001.arrow", "shard-00001.json"):
        (copied / name).unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in copied.glob("shard-*.arrow")}
    calls = []
    handle = teacher.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    try:
        cache = write_teacher_cache(teacher, prepared, tokenizer, copied, top_k=TOP_K, temperature=TEMPERATURE,
                                    shard_rows=SHARD_ROWS, batch_size=BATCH_SIZE, teacher_name="tiny-teacher",
                                    progress=False)
    finally:
        handle.remove()
    assert len(calls) == 2  # the shard's 4 rows in batches of 2
    assert {p.name: p.stat().st_mtime_ns for p in copied.glob("shard-*.arrow") if p.name in untouched} == untouched
    assert_same_cache(written.path, cache.path)


# ---------------------------------------------------------------------------------- crash safety, processes
def assert_same_cache(expected: Path, found: Path):
    """Byte-identical shards, records and plan; metadata equal but for its timestamp; no temporary files."""
    names = sorted(p.name for p in Path(expected).iterdir())
    assert sorted(p.name for p in Path(found).iterdir()) == names
    for name in names:
        if name == "metadata.json":
            a, b = (json.loads((Path(d) / name).read_text()) for d in (expected, found))
            a.pop("created"), b.pop("created")
            assert a == b
        else:
            assert (Path(expected) / name).read_bytes() == (Path(found) / name).read_bytes(), name


def run_worker(out: Path, report_dir: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **CHILD_ENV, LLMKD_TEST_OUT=str(report_dir),
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO_DIR)]))
    report_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(WORKER), "--out", str(out)] + (["--kill-at", kill_at] if kill_at else [])
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted single-process run of the worker (a separate process, like the runs compared to it)."""
    root = tmp_path_factory.mktemp("reference")
    result = run_worker(root / "cache", root / "report")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "cache"


def test_killed_runs_resume_to_the_uninterrupted_cache(tmp_path, reference_run):
    """SIGKILL at four moments (mid-shard forward; a complete shard before its rename; a renamed shard before its
    record; complete metadata before its rename), each followed by a rerun: every rerun computes only the shards
    still missing, and the end result equals an uninterrupted run's."""
    out = tmp_path / "cache"
    shards = lambda: sorted(p.name for p in out.glob("shard-*.arrow"))  # noqa: E731

    def run(kill_at, index):
        before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.arrow")} if out.exists() else {}
        result = run_worker(out, tmp_path / f"report{index}", kill_at)
        if kill_at is None:
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            assert result.returncode == -signal.SIGKILL, (result.returncode, result.stderr[-3000:])
            assert not (out / "metadata.json").exists()
        # finished shards were neither recomputed nor rewritten
        assert {n: (out / n).stat().st_mtime_ns for n in before} == before
        return result

    run("forward:5", 1)  # 2 forwards per shard: killed in shard 2's first forward
    assert shards() == ["shard-00000.arrow", "shard-00001.arrow"]
    run("commit:2", 2)  # shard 2 written; shard 3 complete under a temporary name
    assert shards() == ["shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert [p.name for p in out.glob(".shard-00003.arrow.tmp-*")], "the temporary file should be left behind"
    run("record:1", 3)  # shard 3 renamed into place, its record never written
    assert (out / "shard-00003.arrow").exists() and not (out / "shard-00003.json").exists()
    assert not list(out.glob(".shard-00003.arrow.tmp-*")), "the stale temporary file should be removed"
    run("metadata", 4)  # shard 4 written, all records present, metadata complete but not renamed
    assert len(shards()) == 5 and list(out.glob(".metadata.json.tmp-*"))
    run(None, 5)
    report = json.loads((tmp_path / "report5" / "report-rank0.json").read_text())
    assert report["computed"] == [] and report["forwards"] == 0
    assert_same_cache(reference_run, out)
    TeacherCache(out).verify()


def test_two_processes_write_the_same_cache(tmp_path, reference_run):
    result = launch(WORKER, nprocs=2, args=["--out", str(tmp_path / "cache")], timeout=300)
    reports = [json.loads(result.files[f"report-rank{r}.json"]) for r in (0, 1)]
    assert [r["computed"] for r in reports] == [[0, 2, 4], [1, 3]]  # round-robin by shard index
    assert [r["forwards"] for r in reports] == [6, 4]  # a replicated teacher needs no idle forwards
    assert_same_cache(reference_run, tmp_path / "cache")


# ------------------------------------------------------------------------------------------------------ CLI
def cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "llmkd", "cache-teacher", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=cwd)


def write_recipe(folder: Path, **fields) -> Path:
    import yaml

    local = write_local_run(folder)
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "kd", **local, "output_dir": str(folder / "out"),
                                      "teacher_cache": str(folder / "cache"), "max_length": 32, **fields}))
    return recipe


def test_cli_writes_and_verifies(tmp_path, capsys):
    recipe = write_recipe(tmp_path, cache_top_k=16, cache_temperature=2.0)
    result = cli("--config", recipe, "--cache_shard_rows", "5", "--batch_size", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Caching teacher top-k" in result.stderr and "tok/s" in result.stderr  # the progress bar
    cache = TeacherCache(tmp_path / "cache")
    assert (cache.k, cache.temperature, len(cache.metadata["shards"])) == (16, 2.0, 4)
    assert cache.metadata["teacher"] == str(tmp_path / "teacher")
    assert cache.metadata["source"]["max_length"] == 32
    # the rows are the trainer's: the data prepared with the student's tokenizer and the recipe's fields
    tokenizer = make_tokenizer()
    rows = Dataset.from_list([json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()])
    cache.check_compatible(tokenizer, prepare_dataset(rows, tokenizer, max_length=32, completion_only_loss=True))

    # --verify through the command line's entry point (its return value is the exit status)
    assert llmkd_main(["cache-teacher", "--verify", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "bytes_per_token" in out and "k: 16" in out

    shard = tmp_path / "cache" / "shard-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert llmkd_main(["cache-teacher", "--verify", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "shard-00001.arrow" in err and "checksum" in err


def test_cli_needs_an_output_folder_and_a_mode(tmp_path):
    recipe = write_recipe(tmp_path, teacher_cache=None)
    with pytest.raises(SystemExit, match="--output_dir"):
        llmkd_main(["cache-teacher", "--config", str(recipe)])
    with pytest.raises(SystemExit):
        llmkd_main(["cache-teacher"])  # neither --config nor --verify: argparse's usage error
    assert llmkd_main(["cache-teacher", "--verify", str(tmp_path / "nothing")]) == 1


def test_cli_four_bit_teacher(tmp_path):
    """A 4-bit (nf4) teacher, loaded as the trainer loads it, caches distributions close to the full-precision
    teacher's."""
    pytest.importorskip("bitsandbytes", reason="the 4-bit teacher needs bitsandbytes (extra 'bitsandbytes')")
    from llmkd.cache.command import _load_teacher
    from llmkd.recipes import load_config

    recipe = write_recipe(tmp_path, cache_top_k=8)
    tokenizer = make_tokenizer()
    tiny_llama(len(tokenizer), hidden=64, seed=5).save_pretrained(str(tmp_path / "teacher"))  # bnb needs width 64
    _, config = load_config(str(recipe), ["--teacher_load_in_4bit", "True"], output_fields=("teacher_cache",))
    assert "Linear4bit" in {type(m).__name__ for m in _load_teacher(config).modules()}
    for name, extra in (("cache4", ["--teacher_load_in_4bit", "True"]), ("cache32", [])):
        result = cli("--config", recipe, "--output_dir", tmp_path / name, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    quantized, full = TeacherCache(tmp_path / "cache4"), TeacherCache(tmp_path / "cache32")
    assert quantized.metadata["source"]["teacher_load_in_4bit"] is True
    ids_q, logprobs_q, _ = quantized.rows(range(len(quantized)))
    ids_f, logprobs_f, _ = full.rows(range(len(full)))
    assert ids_q.shape == ids_f.shape
    assert (ids_q[:, 0] == ids_f[:, 0]).float().mean() > 0.5
    assert (logprobs_q[:, 0] - logprobs_f[:, 0]).abs().mean() < 0.5


@pytest.mark.distributed
def test_accelerate_launch_zero3_teacher_equals_one_process(tmp_path):
    """``accelerate launch`` with the shipped ZeRO-3 config on 2 CPU processes: the teacher is partitioned, the
    process with fewer rows runs idle forwards to stay in step, and the cache equals a single process's."""
    pytest.importorskip("deepspeed", reason="the ZeRO-3 teacher needs deepspeed (extra 'deepspeed')")
    recipe = write_recipe(tmp_path, cache_top_k=8)
    # 16 rows in shards of 5: process 0 gets shards 0 and 2 (10 rows, 6 forwards), process 1 shards 1 and 3 (6 rows,
    # 4 forwards)
    fields = ["--cache_shard_rows", "5", "--batch_size", "2", "--disable_tqdm", "True"]
    single = cli("--config", recipe, "--output_dir", tmp_path / "single", *fields)
    assert single.returncode == 0, single.stderr[-3000:]

    patch_dir = tmp_path / "patch"
    patch_dir.mkdir()
    (patch_dir / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS_DIR)!r})\n"
        "from distributed.launcher import patch_accelerate_cpu_backend\npatch_accelerate_cpu_backend()\n")
    env = dict(os.environ, **CHILD_ENV, PYTHONPATH=f"{patch_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO_DIR / "recipes" / "accelerate" / "zero3.yaml"), "--num_processes", "2",
               "--mixed_precision", "no", "--main_process_port", str(free_port()), "-m", "llmkd", "cache-teacher",
               "--config", str(recipe), "--output_dir", str(tmp_path / "zero3"), *fields]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, cwd=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "partitioned across 2 processes" in output
    assert "process 1 runs 6 forwards, 2 of them idle" in output
    assert_same_cache(tmp_path / "single", tmp_path / "zero3")
