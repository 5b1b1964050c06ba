"""Per-rank script of tests/test_fsdp.py's on-policy test: llmkd's sampling (``sample_completions``, the function the
on-policy trainers call) on a student sharded with torch's FSDP2 (``fully_shard``, every decoder layer then the
root, as accelerate's TRANSFORMER_BASED_WRAP) over a 2-rank CPU mesh (gloo), against an unsharded copy.

Each rank samples greedily from its own prompts, and the two ranks finish at different steps: rank 0's EOS is the
token its rows' greedy first tokens (so its completions end after one token), rank 1 has no EOS (its completions
run to ``max_completion_length``). Every forward of a sharded model all-gathers its parameters, a collective
that every rank must join: a rank that stopped generating early would leave the other one waiting forever, unless
``generate`` keeps the finished rank stepping (``synced_gpus``). transformers turns that on for ZeRO-3 and for a
model FSDP manages (``fully_shard`` marks the modules it shards, which is what transformers looks for), so llmkd
passes nothing; this run holds both libraries to it.

Facts to ``$LLMKD_TEST_OUT/fsdp_generate.rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (utils.py)
from utils import tiny_llama  # noqa: E402

from llmkd.generation import SamplingSettings, sample_completions  # noqa: E402

OUT = Path(os.environ.get("LLMKD_TEST_OUT") or tempfile.mkdtemp(prefix="llmkd_fsdp_generate_"))
VOCAB, PAD = 61, 0
MAX_NEW = 8


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    torch.set_num_threads(1)
    student = tiny_llama(VOCAB, seed=0)
    reference = copy.deepcopy(student)
    for layer in student.model.layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(student, mesh=mesh, reshard_after_forward=True)

    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own prompts
    prompts = torch.randint(1, VOCAB, (3, 5), generator=generator)
    mask = torch.ones_like(prompts)
    mask[0, :2] = 0  # a left-padded row
    prompts[0, :2] = PAD
    settings = SamplingSettings(max_completion_length=MAX_NEW, generation_kwargs={"do_sample": False})
    with torch.no_grad():
        first = reference(input_ids=prompts, attention_mask=mask).logits[:, -1].argmax(-1)
    eos = sorted(set(first.tolist())) if rank == 0 else None

    expected = sample_completions(reference, prompts, mask, settings, seed=0, eos_token_id=eos, pad_token_id=PAD)
    sharded = sample_completions(student, prompts, mask, settings, seed=0, eos_token_id=eos, pad_token_id=PAD)
    result = {
        "rank": rank, "world_size": world, "student_is_fsdp": isinstance(student, FSDPModule),
        "sharded_params": all(type(p).__name__ == "DTensor" for p in student.parameters()),
        "expected": expected.tolist(), "sharded": sharded.tolist(),
        "student_training": student.training,
    }
    (OUT / f"fsdp_generate.rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
