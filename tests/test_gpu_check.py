"""scripts/gpu_check.py --smoke: the GPU check's code runs on the CPU at tiny shapes, so that it cannot rot.

The smoke run must pass every correctness check, measure every speed mode (TRL's trainers included) and write its
section between its markers; a correctness fault (the hidden --inject_fault option scales one gradient by 1.25) must
make the run exit non-zero. The comparison, the batch search and the exit status are also tested alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check  # noqa: E402
from gpu_check_correctness import CASES, within  # noqa: E402
from gpu_check_speed import largest_batch  # noqa: E402
from gpu_check_trainers import TRAINER_CASES  # noqa: E402


def run_check(tmp_path, *extra):
    bench = tmp_path / "BENCH.md"
    bench.write_text("# Benchmarks\n\nintro\n")
    out = tmp_path / "out"
    command = [sys.executable, SCRIPT, "--smoke", "--benchmarks", str(bench), "--out_dir", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, cwd=str(tmp_path), timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    return done, bench.read_text(), out


@pytest.mark.timeout(600)
def test_smoke_run_checks_everything_and_writes_its_section(tmp_path):
    done, text, out = run_check(tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    rows = results["correctness"]["rows"]
    assert rows and all(row["passed"] for row in rows), [row for row in rows if not row["passed"]]
    for dtype in ("float32", "bfloat16"):
        done_checks = {(row["check"], row["path"]) for row in rows if row["dtype"] == dtype}
        for case in CASES:
            assert {(case.name, "chunked"), (case.name, "dense")} <= done_checks
        for case in TRAINER_CASES:
            assert (case, "trainer step") in done_checks
    speed = {row["mode"]: row for row in results["speed"]["rows"]}
    assert set(speed) == set(gpu_check.SPEED_MODES)
    for mode, row in speed.items():
        assert row.get("sec_per_step", 0) > 0 and row["steps"] == 2 and row["batch"] == 2, row
    assert "llmkd engine at kd_ratio 0" in speed["floor_fused"]["implementation"]  # no CUDA: no Liger

    assert text.startswith("# Benchmarks\n\nintro\n")
    assert text.count("<!-- bench_step:gpu_check_smoke -->") == 1 and "<!-- /bench_step:gpu_check_smoke -->" in text
    assert "python scripts/gpu_check.py --smoke" in text and "Machine: CPU" in text
    assert "| check | dtype | chunked engine | dense path | result |" in text and "**FAIL**" not in text
    for name in gpu_check.MODE_NAMES.values():
        assert f"| {name}" in text
    assert "Targets of issue 17" in text
    assert (out / "gpu_check_section.md").read_text().strip() in text


@pytest.mark.timeout(600)
def test_a_correctness_fault_makes_the_run_fail(tmp_path):
    done, text, _ = run_check(tmp_path, "--parts", "correctness", "--inject_fault")
    assert done.returncode == 1, done.stderr[-4000:]
    assert "**FAIL**" in text and f"| {CASES[0].name} | float32 |" in text


def test_comparison_catches_small_faults_and_non_finite_values():
    expected = torch.randn(64, 8, dtype=torch.float64)
    bound = 2.0**-20 * expected.abs() + 1e-12  # a float32-sized elementwise bound
    assert within(expected.float(), expected, bound)[1]
    assert not within(expected * (1 + 1e-3), expected, bound)[1]
    broken = expected.clone()
    broken[3, 2] = float("nan")
    assert within(broken, expected, bound) == (float("inf"), False)
    norm = {"norm": 1e-3 * expected.norm().item()}
    assert within(expected * (1 + 1e-4), expected, norm)[1] and not within(expected * 1.01, expected, norm)[1]
    padded = {"norm": 1.0, "zero_beyond": 60}
    assert not within(torch.cat([expected[:60], torch.ones(4, 8, dtype=torch.float64)]), expected, padded)[1]


def test_batch_search_steps_down_from_the_prediction_until_a_step_fits():
    tried = []

    def try_batch(batch):  # 10 GiB of models, 1 GiB per row, out of memory from 20 rows on
        tried.append(batch)
        if batch >= 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return (10 + batch) * 2.0**30

    batch, notes = largest_batch(try_batch, capacity_bytes=40 * 2.0**30, max_batch=64)
    assert (batch, tried[:3]) == (19, [1, 2, 30]) and tried[-1] == 19 and "b=30: out of memory" in notes
    assert largest_batch(try_batch, None, 2)[0] == 2  # the smoke run's cap

    def broken(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        largest_batch(broken, 40 * 2.0**30, 64)


def test_exit_status():
    passed = {"rows": [{"passed": True}]}
    assert gpu_check.exit_status(passed, {"rows": [{"mode": "gkd", "failed": "ImportError: trl"}]}) == 0
    assert gpu_check.exit_status({"rows": [{"passed": False}]}, {}) == 1
    assert gpu_check.exit_status({"failed": "ran past its time limit of 150 s"}, {}) == 1
    assert gpu_check.exit_status(passed, {"rows": [{"mode": "kd", "failed": "RuntimeError: CUDA error"}]}) == 2
    assert gpu_check.exit_status(passed, {"rows": [{"mode": "kd", "failed": "OutOfMemoryError: out of memory"}]}) == 0
