"""scripts/bench_step.py: the step benchmark runs each mode in a fresh process and writes its BENCHMARKS.md section.

Timings are not asserted (no timed unit tests); what is checked is that every mode ran the configured steps, that the
reported memory and profile are real measurements, and that ``--write`` replaces exactly its own section.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "bench_step.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from bench_step import write_section  # noqa: E402


def test_write_section_replaces_only_its_markers(tmp_path):
    path = tmp_path / "BENCH.md"
    path.write_text("# Benchmarks\n\nintro\n")
    write_section(str(path), "ci", ["first"])
    write_section(str(path), "anchor", ["other"])
    write_section(str(path), "ci", ["second", "lines"])
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n")
    assert "first" not in text and "<!-- bench_step:ci -->\nsecond\nlines\n<!-- /bench_step:ci -->" in text
    assert "<!-- bench_step:anchor -->\nother\n<!-- /bench_step:anchor -->" in text
    assert text.count("bench_step:ci -->") == 2


def run_bench(tmp_path, *extra):
    bench_md = tmp_path / "BENCH.md"
    bench_md.write_text("# Benchmarks\n")
    output = tmp_path / "results.json"
    command = [sys.executable, SCRIPT, "--config", "ci", "--vocab", "600", "--batch", "2", "--steps", "2",
               "--warmup", "1", "--write", "--benchmarks", str(bench_md), "--output", str(output), *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text()), bench_md.read_text()


@pytest.mark.timeout(600)
def test_step_benchmark_with_profiles(tmp_path):
    results, text = run_bench(tmp_path, "--seq", "32", "--modes", "floor", "kd", "--profile")
    assert set(results["results"]) == {"floor", "kd"}
    for mode, row in results["results"].items():
        assert row["steps"] == 2 and row["sec_per_step"] > 0
        assert row["peak_rss_mb"] >= row["base_rss_mb"] > 100  # real process memory, models built
        ops = [op["op"] for op in row["profile"]]
        assert "aten::mm" in ops and all(0 < op["share"] <= 1.5 for op in row["profile"])
    assert "<!-- bench_step:ci -->" in text and "| llmkd DistillTrainer, forward KL |" in text
    assert "python scripts/bench_step.py --config ci --modes floor kd" in text and "--profile --write" in text
    assert "Machine:" in text and "Where one step's time goes" in text


@pytest.mark.timeout(600)
def test_memory_sweep(tmp_path):
    results, text = run_bench(tmp_path, "--sweep", "--seqs", "16", "64", "--modes", "kd")
    rows = results["results"]
    assert set(rows) == {"16", "64"} and all(set(by_mode) == {"kd"} for by_mode in rows.values())
    assert "<!-- bench_step:ci-sweep -->" in text and "| 64 |" in text
    command = text.split("`")[1]
    assert "--config ci --sweep --modes kd" in command and "--seqs 16 64" in command and "--vocab 600" in command
