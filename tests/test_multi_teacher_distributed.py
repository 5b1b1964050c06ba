"""Several teachers, each row routed to one (tests/distributed/zero_worker.py ``--method multi_teacher``), across 2
real CPU processes: DDP and DeepSpeed ZeRO-3 (the student and both teachers partitioned) each equal one process
with batch 8, and one process with 4 x 2 gradient accumulation equals it too.

The worker's 8 rows are routed ``words, math, words, words | math, math, math, math``: rank 0's shard (and the
first micro-batch of 4) holds both teachers' rows, rank 1's (and the second micro-batch) only the math teacher's.
Under ZeRO-3 the words teacher's parameters are partitioned over both ranks, so rank 1 runs an idle forward of it
to take part in the gathers rank 0's forward needs; without it the run would hang (the launcher's timeout) or
gather the wrong shards (an FSDP2 test does the same with torch's own sharding). The math teacher's weight is 2, so a step that lost the routing (or the weights) would
differ from the single process far beyond the tolerances, as would one normalised per rank (10 and 45 trained
tokens in the two halves).
"""

from __future__ import annotations

import json

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
METHOD = ["--method", "multi_teacher"]
TIMEOUT = 240


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[str, Run]:
    out = tmp_path_factory.mktemp("multi_single")
    result = run_single(WORKER, [*METHOD, "--mode", "single", "--runs", "8x1,4x2", "--steps", "1"], timeout=TIMEOUT,
                        out_dir=out)
    return {layout: Run(out, f"multi_teacher_single_{layout}", result.seconds) for layout in ("8x1", "4x2")}


def assert_per_teacher_tokens_logged(run: Run) -> None:
    """The step's log counts each teacher's trained tokens (rows 1 and 4-7 are math's, the long ones)."""
    facts = run.facts()
    step = next(h for h in facts["log_history"] if "loss" in h)
    tokens = {name: step[f"tokens/{name}"] for name in ("words", "math")}
    assert 0 < tokens["words"] < tokens["math"]
    assert tokens["words"] + tokens["math"] == sum(m["local_tokens"] for m in facts["micro"])


def test_accumulation_equals_one_large_batch(single):
    assert_step0_matches_single_process(single["4x2"], single["8x1"])
    assert_per_teacher_tokens_logged(single["8x1"])


def test_ddp_equals_one_process(tmp_path, single):
    result = launch(WORKER, nprocs=2, args=[*METHOD, "--mode", "ddp", "--runs", "4x1", "--steps", "1"],
                    timeout=TIMEOUT, out_dir=tmp_path)
    run = Run(tmp_path, "multi_teacher_ddp_4x1", result.seconds)
    assert_two_ranks_shared_the_global_batch(run)
    assert_step0_matches_single_process(run, single["8x1"])


def test_zero3_partitions_both_teachers_and_equals_one_process(tmp_path, single):
    result = launch_deepspeed_run(WORKER, tmp_path, args=[*METHOD, "--mode", "zero3", "--runs", "4x1", "--steps", "1",
                                                          "--save"])
    run = Run(tmp_path, "multi_teacher_zero3_4x1", result.seconds)
    for rank in (0, 1):
        facts = run.facts(rank)
        assert facts["student_engine"]["zero_stage"] == 3
        assert set(facts["teachers"]) == {"words", "math"}
        for teacher in facts["teachers"].values():
            assert teacher["engine"]["class"] == "DeepSpeedEngine"
            assert all(p["ds_id"] and p["local_numel"] < p["ds_numel"] for p in teacher["params"].values())
    assert_two_ranks_shared_the_global_batch(run)
    assert_step0_matches_single_process(run, single["8x1"])
    assert_saved_model_loads_full_size(run)


def test_fsdp2_routed_teachers_stay_in_step_when_a_rank_has_no_rows_of_one(tmp_path):
    """tests/distributed/fsdp_multi_teacher_worker.py: both teachers sharded with FSDP2, rank 1 without a row of
    teacher a. The run ends (no collective left waiting) and every group's logits are its unsharded teacher's on
    its rows: the same float32 forward, sharded or not, so within a few roundings of sums of 48 products of
    values <= 4 (bound 1e-4, far below a wrong shard's or another row's logits, which differ by > 0.1)."""
    launch("tests/distributed/fsdp_multi_teacher_worker.py", nprocs=2, timeout=TIMEOUT, out_dir=tmp_path)
    ranks = [json.loads((tmp_path / f"fsdp_multi.rank{r}.json").read_text()) for r in (0, 1)]
    for facts in ranks:
        assert facts["sharded"] == {"a": True, "b": True}
        assert len(facts["steps"]) == 4
    for step in ranks[0]["steps"]:  # rank 0: rows of both teachers
        assert step["groups"]["a"]["rows"] == 2 and step["groups"]["b"]["rows"] == 1
        for group in step["groups"].values():
            assert group["tokens"] > 0 and group["max_diff"] < 1e-4 < 0.1 < group["scale"]
    for step in ranks[1]["steps"]:  # rank 1: teacher a idle
        assert step["groups"]["a"] == {"tokens": 0, "rows": 0}
        assert step["groups"]["b"]["tokens"] == 16 and step["groups"]["b"]["max_diff"] < 1e-4
