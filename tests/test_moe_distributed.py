"""MoEMimicTrainer (d2s, an upcycled Qwen2-MoE student) across 2 real CPU processes under DeepSpeed ZeRO-3.

The KL and CE are divided by the step's global token count; the load-balancing loss is computed per micro-batch
and weighted by the micro-batch's token share (llmkd.trainers.moe). So 2 processes x batch 4 must take the same
step as ONE process with batch 4 and 2 accumulation steps over the same 8 rows in the same order.
"""

from __future__ import annotations

import pytest
import torch
from test_distributed import LOSS_RTOL, UPDATE_RTOL, WEIGHT_ATOL, WORKER, Run, max_abs_diff, max_update_error

from distributed.launcher import launch_deepspeed_run, run_single

pytestmark = pytest.mark.distributed
STEPS = 3


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("moe_single")
    result = run_single(WORKER, ["--method", "moe_mimic", "--mode", "single", "--runs", "4x2", "--steps", "1"],
                        timeout=240, out_dir=out)
    return Run(out, "moe_mimic_single_4x2", result.seconds)


@pytest.fixture(scope="module")
def zero3(tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("moe_zero3")
    result = launch_deepspeed_run(WORKER, out, args=["--method", "moe_mimic", "--mode", "zero3", "--runs", "4x1",
                                                     "--steps", str(STEPS)])
    return Run(out, "moe_mimic_zero3_4x1", result.seconds)


def test_moe_student_trains_under_zero3_with_only_its_ffns(zero3):
    for rank in (0, 1):
        facts = zero3.facts(rank)
        assert facts["student_engine"]["zero_stage"] == 3 and facts["teacher_engine"]["class"] == "DeepSpeedEngine"
        assert facts["student_engine"]["module_class"] == "Qwen2MoeForCausalLM"
        assert facts["gradient_checkpointing"]  # switched on for the experts' fused weights under ZeRO-3
        experts = [f for name, f in facts["student_params"].items() if "experts" in name]
        assert experts and all(f["ds_id"] and f["local_numel"] < f["ds_numel"] for f in experts)
        logged = [h for h in facts["log_history"] if "moe_aux_loss" in h]
        assert len(logged) == STEPS and all(h["moe_aux_loss"] >= 2.0 - 1e-6 for h in logged)
    init, final = zero3.weights("init"), zero3.weights("final")
    changed = {name for name in init if not torch.allclose(init[name], final[name], rtol=0, atol=1e-7)}
    assert any("experts" in n for n in changed) and any("mlp.gate.weight" in n for n in changed)
    assert not any("self_attn" in n or "embed_tokens" in n or "lm_head" in n for n in changed)


def test_zero3_step_equals_one_process_with_the_same_micro_batches(zero3, single):
    loss, reference = zero3.step_losses()[0], single.step_losses()[0]
    assert loss == pytest.approx(reference, rel=LOSS_RTOL)
    delta, name = max_abs_diff(zero3.weights("step1"), single.weights("step1"))
    assert delta < WEIGHT_ATOL, f"weights after step 1 differ from the single-process run by {delta:.2e} ({name})"
    relative, name = max_update_error(zero3, single)
    assert relative < UPDATE_RTOL, f"the step-1 update of {name} differs from the single-process one by {relative:.2e}"
    update = (single.weights("step1")["model.layers.0.mlp.experts.down_proj"]
              - single.weights("init")["model.layers.0.mlp.experts.down_proj"]).abs().max()
    assert update > 1e-3  # the experts did move: the equality above is not between two frozen models
