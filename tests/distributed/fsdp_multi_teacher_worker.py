"""Per-rank script of tests/test_multi_teacher_distributed.py's FSDP2 test: two routed teachers, each sharded with
torch's ``fully_shard`` over a 2-rank CPU mesh (gloo, as tests/distributed/fsdp_worker.py shards them), their
targets taken through llmkd's :class:`~llmkd.teacher_signals.MultiTeacher` on each rank's rows.

Rank 0's 3 rows are routed ``a, b, a`` and rank 1's ``b, b, b``: rank 1 has no row of teacher ``a``, so teacher
``a`` runs its idle forward and head gather there while rank 0 runs them for real. Both the projected path
(hidden states, then the head gathered while the targets are in use) and the dense path (full logits) are run,
twice each. Each group's teacher logits are compared with the unsharded copy of its teacher on the group's rows.
A collective one rank makes and the other does not would hang the run (the launcher's timeout) or mix the shards.

Facts to ``$LLMKD_TEST_OUT/fsdp_multi.rank<r>.json``.
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
from fsdp_worker import shard  # noqa: E402
from utils import make_tokenizer, tiny_llama  # noqa: E402

from llmkd.teacher import freeze  # noqa: E402
from llmkd.teacher_signals import MultiTeacher, OnlineTeacher  # noqa: E402
from llmkd.teacher_signals.multi import TEACHER_INDEX, NamedTeacher  # noqa: E402

OUT = Path(os.environ.get("LLMKD_TEST_OUT") or tempfile.mkdtemp(prefix="llmkd_fsdp_multi_"))
ROUTES = [[0, 1, 0], [1, 1, 1]]  # per rank, the teacher index of each of its 3 rows


def main() -> None:
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    torch.set_num_threads(1)
    vocab = len(make_tokenizer())
    teachers = {"a": freeze(tiny_llama(vocab, hidden=48, layers=2, seed=2)),
                "b": freeze(tiny_llama(vocab, hidden=40, layers=2, seed=3))}
    references = {name: copy.deepcopy(model) for name, model in teachers.items()}
    for model in teachers.values():
        shard(model, "layers", True, mesh)
    signal = MultiTeacher([NamedTeacher(name, OnlineTeacher(model, vocab), 1.0) for name, model in teachers.items()],
                          routing_column="domain")

    generator = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(3, vocab, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    valid = torch.ones((3, 8), dtype=torch.bool)
    valid[0, :3] = valid[2, :5] = False  # prompt positions
    route = torch.tensor(ROUTES[rank])
    facts = {"rank": rank, "sharded": {name: all(isinstance(p, DTensor) for p in model.parameters())
                                       for name, model in teachers.items()}, "steps": []}
    for dense in (False, True, False, True):
        inputs = {"input_ids": ids, "attention_mask": mask, TEACHER_INDEX: route}
        with signal.token_targets(inputs, valid, dense=dense) as groups:
            step = {"dense": dense, "groups": {}}
            for index, group in enumerate(groups):
                rows = torch.nonzero(route == index).flatten()
                if group.targets is None:
                    step["groups"][group.name] = {"tokens": 0, "rows": len(rows)}
                    continue
                logits = group.targets.chunk(0, group.targets.num_tokens, vocab).logits()
                with torch.no_grad():
                    expected = references[group.name](input_ids=ids[rows], attention_mask=mask[rows]).logits
                expected = expected[:, :-1][valid[rows]].float()
                step["groups"][group.name] = {"tokens": int(logits.shape[0]), "rows": len(rows),
                                              "max_diff": float((logits - expected).abs().max()),
                                              "scale": float(expected.abs().max())}
        facts["steps"].append(step)
    (OUT / f"fsdp_multi.rank{rank}.json").write_text(json.dumps(facts, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
