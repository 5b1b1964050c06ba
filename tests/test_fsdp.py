"""llmkd's FSDP-specific path across 2 real CPU processes (torchrun + gloo) with torch's own FSDP2.

accelerate does not engage FSDP on a CPU-only machine (it keeps MULTI_CPU, i.e. DDP; see DESIGN.md), so the
worker (tests/distributed/fsdp_worker.py) shards the student and the teacher itself with
``torch.distributed.fsdp.fully_shard`` on a 2-rank CPU device mesh, in four layouts (accelerate's
TRANSFORMER_BASED_WRAP with its ``reshard_after_forward=True``; the teacher through llmkd's own
``prepare_teacher(is_fsdp=True)``, i.e. trl's ``prepare_fsdp``; torch's default ``reshard_after_forward``, where the
root keeps its parameters gathered after forward; ``lm_head`` as an FSDP unit of its own), and runs
``DistillTrainer.compute_loss`` (the trainer's own code: teacher hidden states through
``intercept_head(teacher, identity)``, the full teacher head through ``gathered_head_parameters``, the chunked loss
inside the student's head forward) and ``backward()``, then compares with unsharded copies of the same models.

Batch layout: 6 rows, rank r takes rows [3r, 3r + 3) (4 and 35 trained tokens); ``num_items_in_batch`` is the
global count (39) and ``compute_loss`` scales by the number of processes, so the sum of the ranks' losses and
FSDP's averaged gradient must equal the loss and gradient of the union batch on the unsharded student.
The run is launched once per module and shared by the tests.
"""

from __future__ import annotations

import json

import pytest
import torch

from distributed.launcher import launch

pytestmark = pytest.mark.distributed

try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, public from torch 2.6)
    from torch.distributed.tensor import DTensor  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the torch build
    pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard / DTensor): {error}",
                allow_module_level=True)
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():  # pragma: no cover
    pytest.skip("this torch build has no torch.distributed gloo backend (needed for CPU FSDP2)",
                allow_module_level=True)

WORKER = "tests/distributed/fsdp_worker.py"
WORLD = 2
RUN_TIMEOUT = 240  # seconds; the launch takes ~18 s on 2 shared cores (imports dominate)
TOL = 1e-5
CONFIGS = ["accelerate", "prepare_teacher", "torch_default", "head_unit"]
# layouts in which the teacher's lm_head is a sharded DTensor when the student's head forward gathers it (the
# root reshards after forward, or lm_head is a unit of its own); with torch's default the teacher's root keeps its
# parameters gathered after its (no-grad) forward, so the head arrives as a plain full Parameter there.
HEAD_SHARDED_IN_STEP = {"accelerate", "prepare_teacher", "head_unit"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    result = launch(WORKER, nprocs=WORLD, args=["--configs", ",".join(CONFIGS)], timeout=RUN_TIMEOUT, out_dir=out)
    facts = [json.loads(result.files[f"fsdp.rank{r}.json"]) for r in range(WORLD)]
    for f in facts:
        f["seconds"] = result.seconds
    return facts


def runs(ranks, config):
    return [r["runs"][config] for r in ranks]


def test_launch(ranks):
    for rank, facts in enumerate(ranks):
        assert facts["rank"] == rank and facts["world_size"] == WORLD and facts["backend"] == "gloo"
        assert sorted(facts["runs"]) == sorted(CONFIGS)
    assert ranks[0]["seconds"] < RUN_TIMEOUT


@pytest.mark.parametrize("config", CONFIGS)
def test_models_are_really_sharded(ranks, config):
    per_rank = runs(ranks, config)
    for run in per_rank:
        assert run["same_init_on_all_ranks"], "the ranks built different models: sharding them would be meaningless"
        assert run["student_is_fsdp"] and run["teacher_is_fsdp"]
        assert run["student_training"] and not run["teacher_training"]
        for role in ("student", "teacher"):
            for name, p in run[f"{role}_params"].items():
                assert p["dtensor"], f"{role} {name} is not a DTensor after fully_shard"
                assert p["placements"] == ["S(0)"] and p["shard_dims"] == [0], (role, name, p["placements"])
                assert p["local_shape"][1:] == p["global_shape"][1:]
                assert p["local_shape"][0] < p["global_shape"][0], f"{role} {name} is not split: {p}"
            assert all(not p["requires_grad"] for p in run["teacher_params"].values())
            assert all(p["requires_grad"] for p in run["student_params"].values())
    # the ranks' shards tile each parameter (dim 0), the teacher head unevenly (325 rows = 163 + 162)
    for role in ("student", "teacher"):
        for name, p in per_rank[0][f"{role}_params"].items():
            assert sum(r[f"{role}_params"][name]["local_shape"][0] for r in per_rank) == p["global_shape"][0]
    head = [r["teacher_params"]["lm_head.weight"]["local_shape"][0] for r in per_rank]
    assert head[0] != head[1], head


@pytest.mark.parametrize("config", CONFIGS)
def test_teacher_hidden_states_and_gathered_head(ranks, config):
    for run in runs(ranks, config):
        hidden = run["teacher_hidden"]
        assert hidden["shape"] == hidden["ref_shape"] == [run["tokens"]["local"], 48]
        assert hidden["max_abs"] > 0.1 and hidden["max_diff"] <= TOL, hidden

        standalone = run["standalone_gather"]  # outside any forward: the parameters are sharded DTensors
        assert standalone["param_type"] == "DTensor" and standalone["result_type"] != "DTensor"
        assert standalone["shape"] == standalone["ref_shape"] == [325, 48]
        assert standalone["max_diff"] <= TOL and standalone["bias_is_none"]

        in_step = run["step_gather"]  # what the student's head forward received as the teacher head
        assert in_step["result_type"] != "DTensor"
        assert in_step["shape"] == in_step["ref_shape"] == [325, 48] and in_step["max_diff"] <= TOL, in_step
        expected = "DTensor" if config in HEAD_SHARDED_IN_STEP else "Parameter"
        assert in_step["param_type"] == expected, in_step

        student_head = run["student_head_in_forward"]  # FSDP unsharded it for the head's (intercepted) forward
        assert student_head["type"] != "DTensor"
        assert student_head["shape"] == student_head["ref_shape"] == [318, 32] and student_head["max_diff"] <= TOL
        assert run["vocab_size_sharded"] == 318  # aligned_vocab_size read the global shapes of the DTensors


@pytest.mark.parametrize("config", CONFIGS)
def test_loss(ranks, config):
    per_rank = runs(ranks, config)
    locals_ = [r["tokens"]["local"] for r in per_rank]
    assert len(set(locals_)) == WORLD and min(locals_) > 0  # the ranks train different numbers of tokens
    for run in per_rank:
        assert run["tokens"]["global"] == run["tokens"]["union"] == sum(locals_)
        loss = run["loss"]
        assert loss["rank_rel"] <= TOL, loss  # this rank's loss vs the unsharded models on this rank's rows
        assert loss["union_rel"] <= TOL, loss  # sum over ranks vs the union batch in one process
        assert loss["ref_vs_dense_rel"] <= TOL, loss  # the reference vs the full-logits objective
        assert loss["metrics_tokens"] == run["tokens"]["local"]
    assert per_rank[0]["loss"]["union"] == pytest.approx(per_rank[1]["loss"]["union"], rel=TOL)


@pytest.mark.parametrize("config", CONFIGS)
def test_student_gradients(ranks, config):
    for run in runs(ranks, config):
        grads = run["student_grads"]
        assert set(grads) == set(run["student_params"]) and "lm_head.weight" in grads
        for name, g in grads.items():
            assert g["has_grad"], f"{name} got no gradient"
            assert g["dtensor"] and g["placements"] == ["S(0)"], (name, g.get("placements"))
            assert g["local_shape"] == run["student_params"][name]["local_shape"]
            assert g["shape"] == g["ref_shape"]
            assert g["max_diff"] <= TOL, f"{name}: max |FSDP grad - union grad| = {g['max_diff']}"
        # meaningful: the gradients are far larger than the tolerance (a missing rank scaling would be seen)
        assert grads["lm_head.weight"]["ref_max_abs"] > 100 * TOL
        assert grads["model.embed_tokens.weight"]["ref_max_abs"] > 100 * TOL
        assert run["teacher_grads"] == []
        assert all(run["student_params_after"].values()), "student parameters not resharded after backward"
        if run["config"]["reshard_after_forward"]:
            assert all(run["teacher_params_after"].values()), "teacher parameters left gathered after the step"


def test_fsdp2_student_samples_the_unsharded_completions_when_ranks_finish_apart(tmp_path):
    """On-policy sampling on an FSDP2 student (tests/distributed/fsdp_generate_worker.py): rank 0's completions end
    after one token, rank 1's run to the limit, and both equal the unsharded student's greedy completions. Without
    ``synced_gpus`` the finished rank would stop joining the all-gathers and the launch would hang (a timeout)."""
    result = launch("tests/distributed/fsdp_generate_worker.py", nprocs=WORLD, timeout=RUN_TIMEOUT, out_dir=tmp_path)
    facts = [json.loads(result.files[f"fsdp_generate.rank{r}.json"]) for r in range(WORLD)]
    lengths = []
    for rank, f in enumerate(facts):
        assert f["rank"] == rank and f["student_is_fsdp"] and f["sharded_params"], f
        expected, sharded = f["expected"], f["sharded"]
        width = len(expected[0])
        lengths.append(width)
        assert [row[:width] for row in sharded] == expected, (rank, expected, sharded)
        assert all(token == 0 for row in sharded for token in row[width:]), sharded  # only padding after
        assert f["student_training"], "sampling must leave the student in train mode"
    assert lengths == [1, 8], f"the ranks should finish apart (one token vs the limit of 8), got {lengths}"
