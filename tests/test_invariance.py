"""One optimizer step is invariant to the batch layout for TAID, DHO, preference distillation (sigmoid) and MoE mimic:
gradient accumulation (1 process, batch 4 x accumulation 2) and 2-process data parallelism (DDP over gloo, batch 4
per process) equal one process with batch 8 (issue 8; DistillTrainer's own invariance is tests/test_distributed.py,
SinKD's tests/test_sinkd_distributed.py).

Every run (tests/distributed/invariance_worker.py) trains the same student from the same teacher on the same 8
rows in order, with SGD, a constant learning rate and no clipping; the first step's loss and the weights after it
must agree within test_distributed's tolerances. What each method's invariance rests on:

- TAID: the loss is divided by the step's global token count, like kd; its schedule t is updated from the step's
  TAID loss summed over micro-batches and ranks, so t (and so the step after) is the same too: TAID runs 3 steps
  (t first moves at step 2) and the 3 losses, t, momentum and the final weights are compared.
- DHO: each term is a mean over the step's global labeled (= unlabeled) count. A ViT student: BatchNorm (a ResNet
  student) would couple the examples of a micro-batch by design.
- Preference, ``loss_type="sigmoid"``: a mean over pairs, and every micro-batch holds the same number of pairs.
  ``kto_pair`` is NOT invariant: its KL estimates (``mean(pi - ref)`` over the chosen / rejected responses, clamped
  at 0) are means over the micro-batch's pairs, as in LLaVA-MoD's code; the test asserts that 4 x 2 differs from 8.
- MoE mimic with ``aux_loss_coef=0``: the KL and CE are divided by the global token count. The load-balancing loss
  is computed per micro-batch (router statistics of that micro-batch) by design, so with aux_loss_coef > 0 the
  step depends on the micro-batching (asserted here with aux_loss_coef=0.5); test_moe_distributed.py checks that
  ZeRO-3 2 x 4 equals 1 process 4 x 2 with it.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_distributed import LOSS_RTOL, UPDATE_RTOL, WEIGHT_ATOL, Run, max_abs_diff

from distributed.launcher import launch, run_single

pytestmark = pytest.mark.distributed

WORKER = "tests/distributed/invariance_worker.py"
RUN_TIMEOUT = 300
SINGLE_METHODS = ("taid", "dho", "preference_sigmoid", "preference_kto_pair", "moe_mimic", "moe_mimic_aux")
DDP_METHODS = ("taid", "dho", "preference_sigmoid", "moe_mimic")
INVARIANT = ("taid", "dho", "preference_sigmoid", "moe_mimic")
STATE_RTOL = 1e-5  # TAID's schedule state (t, momentum, prev_loss)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict[tuple[str, str], Run]:
    """One process: batch 8 (one micro-batch), then batch 4 x 2 accumulation steps, for every method."""
    out = tmp_path_factory.mktemp("invariance_single")
    result = run_single(WORKER, ["--mode", "single", "--methods", ",".join(SINGLE_METHODS), "--runs", "8x1,4x2"],
                        timeout=RUN_TIMEOUT, out_dir=out)
    return {(m, layout): Run(out, f"{m}_single_{layout}", result.seconds)
            for m in SINGLE_METHODS for layout in ("8x1", "4x2")}


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> dict[str, Run]:
    """2 processes (DDP over gloo, the launcher's backend patch), batch 4 each."""
    out = tmp_path_factory.mktemp("invariance_ddp")
    result = launch(WORKER, nprocs=2, args=["--mode", "ddp", "--methods", ",".join(DDP_METHODS), "--runs", "4x1"],
                    timeout=RUN_TIMEOUT, out_dir=out)
    return {m: Run(out, f"{m}_ddp_4x1", result.seconds) for m in DDP_METHODS}


def max_update_error(run: Run, reference: Run, which: str = "step1") -> tuple[float, str]:
    """test_distributed.max_update_error, over the tensors the reference step moved by more than 1e-6: some have a
    gradient that is zero in exact arithmetic (a ViT's attention key bias: softmax ignores a shift shared by all
    keys), so their ~1e-9 updates are rounding noise, compared through the weights' absolute tolerance instead."""
    init, ref, ours = reference.weights("init"), reference.weights(which), run.weights(which)
    errors = {}
    for name in init:
        ref_update, update = ref[name] - init[name], ours[name] - init[name]
        scale = ref_update.abs().max().item()
        if scale > 1e-6:
            errors[name] = ((update - ref_update).abs().max() / scale).item()
    name = max(errors, key=errors.get)
    return errors[name], name


def step_differences(run: Run, reference: Run) -> dict[str, float]:
    """|loss - ref| / |ref| of the first step, max |w - ref| after it and the largest relative update error."""
    loss, ref_loss = run.step_losses()[0], reference.step_losses()[0]
    weight, weight_name = max_abs_diff(run.weights("step1"), reference.weights("step1"))
    update, update_name = max_update_error(run, reference)
    return {"loss": abs(loss - ref_loss) / abs(ref_loss), "weight": weight, "update": update,
            "where": f"{weight_name} / {update_name}"}


def assert_same_first_step(run: Run, reference: Run, label: str) -> None:
    ref_update = max_abs_diff(reference.weights("step1"), reference.weights("init"))[0]
    assert ref_update > 1e-2, f"{label}: one step barely moved the weights ({ref_update:.2e}); the test would be weak"
    d = step_differences(run, reference)
    assert d["loss"] < LOSS_RTOL and d["weight"] < WEIGHT_ATOL and d["update"] < UPDATE_RTOL, (
        f"{label} differs from 1 process x batch 8: relative loss difference {d['loss']:.2e}, max |w - ref| "
        f"{d['weight']:.2e}, relative update error {d['update']:.2e} ({d['where']})")


def assert_same_taid_run(run: Run, reference: Run, label: str) -> None:
    """3 steps: the losses, the schedule state and the final weights agree (t moved at step 2, from the step's
    loss synchronised over micro-batches and ranks)."""
    losses, ref_losses = run.step_losses(), reference.step_losses()
    assert len(losses) == len(ref_losses) == 3, (losses, ref_losses)
    assert losses == pytest.approx(ref_losses, rel=LOSS_RTOL), f"{label}: TAID losses {losses} != {ref_losses}"
    ref_ts = [h["taid_t"] for h in reference.facts()["log_history"] if "taid_t" in h]
    # t after step 2 is the adaptive value, above the linear floor (0.8): it came from the step's synced loss
    assert len(ref_ts) == 3 and 0.8 + 1e-3 < ref_ts[1] < 1.0 - 1e-3, f"t is not set by the adaptive update: {ref_ts}"
    ts = [h["taid_t"] for h in run.facts()["log_history"] if "taid_t" in h]
    # the log rounds t to 6 decimals: two values 1e-8 apart can straddle a rounding boundary and print 1e-6 apart
    assert ts == pytest.approx(ref_ts, abs=1.5e-6), f"{label}: TAID t after each step {ts} != {ref_ts}"
    state, ref_state = run.facts()["method_state"], reference.facts()["method_state"]
    for key in ("t", "momentum", "prev_loss"):
        assert state[key] == pytest.approx(ref_state[key], rel=STATE_RTOL), (
            f"{label}: TAID {key}: {state} != {ref_state}")
    delta, name = max_abs_diff(run.weights("final"), reference.weights("final"))
    assert delta < WEIGHT_ATOL, f"{label}: weights after 3 TAID steps differ by {delta:.2e} ({name})"


@pytest.mark.parametrize("method", INVARIANT)
def test_gradient_accumulation_equals_one_batch(single, method):
    """1 process: batch 4 x accumulation 2 == batch 8 x accumulation 1."""
    reference, accumulated = single[(method, "8x1")], single[(method, "4x2")]
    assert_same_first_step(accumulated, reference, f"{method} 4 x 2")
    if method == "taid":
        assert_same_taid_run(accumulated, reference, "taid 4 x 2")
    if method in ("taid", "moe_mimic"):  # both micro-batches divided by the step's global token count
        micro = accumulated.facts()["micro"][:2]
        assert {m["num_items_in_batch"] for m in micro} == {float(sum(m["local_tokens"] for m in micro))}, micro


@pytest.mark.parametrize("method", DDP_METHODS)
def test_two_process_ddp_equals_one_batch(single, ddp, method):
    """2 processes x batch 4 (DDP, gloo) == 1 process x batch 8."""
    run, reference = ddp[method], single[(method, "8x1")]
    for rank in (0, 1):
        facts = run.facts(rank)
        assert facts["world_size"] == 2 and facts["distributed_type"].endswith("MULTI_CPU"), facts
        assert facts["student_engine"]["class"] == "DistributedDataParallel", facts["student_engine"]
    assert_same_first_step(run, reference, f"{method} DDP 2 x 4")
    if method == "taid":
        assert_same_taid_run(run, reference, "taid DDP 2 x 4")
        # each rank's schedule is the same, bit for bit
        assert run.facts(0)["method_state"] == run.facts(1)["method_state"]


def test_kto_pair_depends_on_the_micro_batch(single):
    """kto_pair's KL estimates are means over the micro-batch's pairs: accumulating 4 x 2 is a different step from one
    batch of 8 (unlike sigmoid, checked above on the same rows)."""
    reference, accumulated = single[("preference_kto_pair", "8x1")], single[("preference_kto_pair", "4x2")]
    d = step_differences(accumulated, reference)
    assert d["update"] > 10 * UPDATE_RTOL, f"kto_pair 4 x 2 matched batch 8 (update error {d['update']:.2e})"
    assert all(math.isfinite(x) for x in accumulated.step_losses() + reference.step_losses())


def test_moe_load_balancing_loss_depends_on_the_micro_batch(single):
    """With aux_loss_coef > 0 the load-balancing loss (per micro-batch router statistics, by design) makes 4 x 2 a
    different step from one batch of 8, which is why the MoE invariance above is stated with aux_loss_coef=0."""
    reference, accumulated = single[("moe_mimic_aux", "8x1")], single[("moe_mimic_aux", "4x2")]
    d = step_differences(accumulated, reference)
    assert d["update"] > 10 * UPDATE_RTOL, f"MoE aux loss: 4 x 2 matched batch 8 (update error {d['update']:.2e})"
