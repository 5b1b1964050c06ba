"""On-policy distillation across 2 real CPU processes (torchrun + gloo) with DeepSpeed ZeRO-3 (docs/ON_POLICY.md).

Runs of tests/distributed/zero_worker.py with ``--on-policy``:

- ``fixed``: every micro-batch is student-sampled, with completions that are a function of each prompt
  (tests/utils.py ``fixed_completions``), so that every layout distils the same samples; the completions give the
  8 rows 1-6 trained tokens each, unevenly between the two ranks' halves. One optimizer step over them must be the
  same computation in one process with one micro-batch of 8, with 8 micro-batches of 1 (accumulation), and on 2
  ZeRO-3 ranks of 4: ``num_items_in_batch`` is counted on the generated rows, over the ranks.
- ``generate``: the student samples with transformers ``generate`` under ZeRO-3 (its partitioned parameters
  gathered for generation, as TRL does) for 2 steps.
"""

from __future__ import annotations

import math

import pytest
import torch

from distributed.launcher import launch, run_single
from test_distributed import (
    RUN_TIMEOUT,
    WORKER,
    Run,
    assert_step0_matches_single_process,
    assert_two_ranks_shared_the_global_batch,
    max_abs_diff,
    max_update_error,
    LOSS_RTOL,
    UPDATE_RTOL,
    WEIGHT_ATOL,
)

pytestmark = pytest.mark.distributed
# The divergence alone (no CE on student samples) moves the tiny student's head little at the default lr of 1: the
# step-1 comparison needs an update large enough to tell a missing gradient (test_distributed's 1e-2 on lm_head).
FIXED_LR = "30"


@pytest.fixture(scope="module")
def fixed_single(tmp_path_factory) -> dict[str, Run]:
    out = tmp_path_factory.mktemp("on_policy_single")
    result = run_single(WORKER, ["--mode", "single", "--runs", "8x1,1x8", "--steps", "1", "--on-policy", "fixed",
                                     "--lr", FIXED_LR],
                        timeout=RUN_TIMEOUT, out_dir=out)
    return {layout: Run(out, f"fixed_single_{layout}", result.seconds) for layout in ("8x1", "1x8")}


def _zero3(tmp_path_factory, on_policy: str, steps: int, lr: str = "1.0") -> Run:
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install 'llmkd[deepspeed]')")
    from distributed.launcher import LaunchError, build_deepspeed_cpu_comm_op

    try:
        build_deepspeed_cpu_comm_op()
    except LaunchError as error:
        pytest.skip(f"DeepSpeed's CPU comm op (JIT-built with g++) could not be built on this machine: {error}")
    out = tmp_path_factory.mktemp(f"on_policy_{on_policy}_zero3")
    result = launch(WORKER, nprocs=2, args=["--mode", "zero3", "--runs", "4x1", "--steps", str(steps),
                                            "--on-policy", on_policy, "--lr", lr], deepspeed=True, timeout=RUN_TIMEOUT,
                    out_dir=out)
    return Run(out, f"{on_policy}_zero3_4x1", result.seconds)


@pytest.fixture(scope="module")
def fixed_zero3(tmp_path_factory) -> Run:
    return _zero3(tmp_path_factory, "fixed", 1, FIXED_LR)


@pytest.fixture(scope="module")
def generated_zero3(tmp_path_factory) -> Run:
    return _zero3(tmp_path_factory, "generate", 2)


def test_accumulation_equals_one_batch_on_the_same_samples(fixed_single):
    one, accumulated = fixed_single["8x1"], fixed_single["1x8"]
    micro = accumulated.facts()["micro"]
    total = sum(m["local_tokens"] for m in micro)
    assert len(micro) == 8 and {m["num_items_in_batch"] for m in micro} == {float(total)}, micro
    assert len({m["local_tokens"] for m in micro}) > 1, "the fixed completions should differ in length"
    assert one.facts()["micro"][0]["num_items_in_batch"] == total
    # the rows distilled are the generated ones: 1-6 completion tokens per row, not the dataset's 1-14 words
    assert total <= 8 * 6
    assert one.step_losses()[0] == pytest.approx(accumulated.step_losses()[0], rel=LOSS_RTOL)
    delta, name = max_abs_diff(accumulated.weights("step1"), one.weights("step1"))
    assert delta < WEIGHT_ATOL, f"accumulation changed the step by {delta:.2e} ({name})"
    relative, name = max_update_error(accumulated, one)
    assert relative < UPDATE_RTOL, f"the update of {name} differs by {relative:.2e}"
    logs = [h for h in one.facts()["log_history"] if "loss" in h]
    assert logs[0]["on_policy_fraction"] == 1.0 and 1.0 <= logs[0]["completion_length"] <= 6.0, logs[0]


def test_zero3_on_policy_step_equals_one_process_on_the_same_samples(fixed_zero3, fixed_single):
    assert_two_ranks_shared_the_global_batch(fixed_zero3)
    assert_step0_matches_single_process(fixed_zero3, fixed_single["8x1"])


def test_zero3_student_generates_with_gathered_parameters(generated_zero3):
    for rank in (0, 1):
        facts = generated_zero3.facts(rank)
        assert facts["student_engine"]["zero_stage"] == 3, facts["student_engine"]
        # after generation the parameters are partitioned again (nothing left gathered)
        assert all(p["data_numel"] == 0 for p in facts["student_params"].values())
    logs = [h for h in generated_zero3.facts()["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs), logs
    assert all(h["on_policy_fraction"] == 1.0 and h["completion_length"] >= 1.0 for h in logs), logs
    init, final = generated_zero3.weights("init"), generated_zero3.weights("final")
    moved = max((final[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3, f"two on-policy steps did not move the student ({moved:.2e})"
    assert torch.isfinite(torch.cat([v.flatten() for v in final.values()])).all()
