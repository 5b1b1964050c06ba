"""Cross-tokenizer distillation (the hybrid loss, a teacher with a SentencePiece-style tokenizer) across 2 real CPU
processes: DDP and DeepSpeed ZeRO-3 (student and teacher partitioned) each equal one process with batch 8, and one
process with 4 x 2 gradient accumulation equals it too.

The loss is a sum over each row's aligned spans divided by the step's global count of student tokens, and a span
never leaves its row, so the step is one computation whatever the layout (tests/distributed/zero_worker.py's
8 rows hold 10 and 45 trained tokens in their two halves: a per-rank or per-micro-batch mean would differ far
beyond the tolerances).
"""

from __future__ import annotations

import pytest
from test_distributed import (
    WORKER,
    Run,
    assert_saved_model_loads_full_size,
    assert_step0_matches_single_process,
    assert_two_ranks_shared_the_global_batch,
)

from distributed.launcher import launch, launch_deepspeed_run, run_single

pytestmark = pytest.mark.distributed
METHOD = ["--method", "cross_tokenizer"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Run]:
    out = tmp_path_factory.mktemp("cross_single")
    result = run_single(WORKER, [*METHOD, "--mode", "single", "--runs", "8x1,4x2", "--steps", "1"], timeout=240,
                        out_dir=out)
    return {layout: Run(out, f"cross_tokenizer_single_{layout}", result.seconds) for layout in ("8x1", "4x2")}


def test_accumulation_equals_one_large_batch(single):
    assert_step0_matches_single_process(single["4x2"], single["8x1"])


def test_ddp_equals_one_process(tmp_path, single):
    result = launch(WORKER, nprocs=2, args=[*METHOD, "--mode", "ddp", "--runs", "4x1", "--steps", "1"], timeout=240,
                    out_dir=tmp_path)
    run = Run(tmp_path, "cross_tokenizer_ddp_4x1", result.seconds)
    assert_two_ranks_shared_the_global_batch(run)
    assert_step0_matches_single_process(run, single["8x1"])


def test_zero3_partitions_both_models_and_equals_one_process(tmp_path, single):
    result = launch_deepspeed_run(WORKER, tmp_path, args=[*METHOD, "--mode", "zero3", "--runs", "4x1", "--steps", "1",
                                                          "--save"])
    run = Run(tmp_path, "cross_tokenizer_zero3_4x1", result.seconds)
    for rank in (0, 1):
        facts = run.facts(rank)
        assert facts["student_engine"]["zero_stage"] == 3 and facts["teacher_engine"]["class"] == "DeepSpeedEngine"
        assert any(p["ds_id"] for p in facts["teacher_params"].values())
    assert_two_ranks_shared_the_global_batch(run)
    assert_step0_matches_single_process(run, single["8x1"])
    assert_saved_model_loads_full_size(run)
