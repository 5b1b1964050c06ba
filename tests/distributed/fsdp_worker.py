"""Per-rank script of tests/test_fsdp.py: llmkd's distillation step on a student and a teacher sharded with torch's
own FSDP2 (``torch.distributed.fsdp.fully_shard``) over a CPU device mesh (gloo), checked against unsharded copies.

Run by :func:`distributed.launcher.launch` with 2 processes. Each rank:

1. builds the tiny student (Llama 2x32, vocab V) and teacher (Llama 2x48, vocab V + 7, so the teacher head has an
   odd number of rows and its Shard(0) is uneven) from fixed seeds (identical on every rank: checked), keeps an
   unsharded deep copy of each, and shards the originals with ``fully_shard`` on a 1-D CPU mesh over the ranks, in
   each of the layouts of :data:`CONFIGS` (one after the other, fresh models each time): as accelerate's
   ``TRANSFORMER_BASED_WRAP`` does (every decoder layer, then the root), with the teacher prepared by llmkd's own
   ``prepare_teacher(is_fsdp=True)`` (trl's ``prepare_fsdp``: the root only), with torch's default
   ``reshard_after_forward``, and with ``lm_head`` as a unit of its own. The teacher is frozen and in eval mode
   (as ``prepare_teacher`` leaves it), the student in train mode;
2. runs ``DistillTrainer.compute_loss`` itself (the trainer's own code: its ``OnlineTeacher`` signal's
   ``hidden_states`` with ``intercept_head(teacher, identity)``, ``_chunked_student_loss`` with
   ``intercept_head(student, ...)`` running ``chunked_loss`` on the head's weight inside the head's forward and
   ``gathered_head_parameters`` on the teacher) on an object that holds only the attributes those methods read (no Trainer/accelerate set-up,
   which does not engage FSDP on CPU), then ``loss.backward()``;
3. does the same on the unsharded copies and compares.

Data layout: the global batch is 6 rows of one fixed (padded) length; rank r takes rows [3r, 3r + 3), which hold
very different numbers of trained tokens. ``num_items_in_batch`` is the global trained-token count (all-reduced,
as the Trainer computes it), and ``compute_loss`` multiplies the loss by the number of processes, as it does under
data parallelism; FSDP2 averages gradients over ranks, so the sharded gradient must equal the gradient of the
*union* batch on the unsharded student in one process. Per rank, the teacher hidden states and the loss are
compared with the unsharded models on that rank's rows; the sum over ranks of the losses with the union's.

Facts are written to ``$LLMKD_TEST_OUT/fsdp.rank<r>.json`` (numbers only; the test asserts on them).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (utils.py)
from utils import make_tokenizer, tiny_llama  # noqa: E402

import llmkd.teacher_signals.online as online_signal  # noqa: E402
import llmkd.trainers.base as trainer_base  # noqa: E402
from llmkd.heads import logit_transform_for, output_head  # noqa: E402
from llmkd.losses import get_divergence  # noqa: E402
from llmkd.teacher import aligned_vocab_size, freeze, gathered_head_parameters, prepare_teacher  # noqa: E402
from llmkd.teacher_signals import OnlineTeacher  # noqa: E402
from llmkd.trainers.base import DistillTrainer  # noqa: E402

OUT = Path(os.environ.get("LLMKD_TEST_OUT") or tempfile.mkdtemp(prefix="llmkd_fsdp_"))
ROWS_PER_RANK = 3
KD_RATIO = 0.5
TEMPERATURE = 2.0
CHUNK = 5  # tokens per chunk: several chunks per rank


# ------------------------------------------------------------------------------------------------------- data
def global_batch(tokenizer, world: int) -> dict[str, torch.Tensor]:
    """``world * ROWS_PER_RANK`` right-padded rows of one length; labels mask the prompt and the padding."""
    words = "the cat dog sat on mat red blue green one two three four five add sum is what".split()
    n_rows = world * ROWS_PER_RANK
    # (prompt words, completion words): the first rank's rows train few tokens, the next ranks' many.
    shapes = [(9, 1), (7, 2), (8, 1), (2, 12), (3, 9), (1, 14)]
    shapes = [shapes[i % len(shapes)] for i in range(n_rows)]
    encoded = []
    for i, (p, c) in enumerate(shapes):
        prompt = tokenizer(" ".join(words[(i + 2 * k) % len(words)] for k in range(p)))["input_ids"]
        completion = tokenizer(" " + " ".join(words[(3 * i + 5 * k) % len(words)] for k in range(c)))["input_ids"]
        encoded.append((prompt, completion))
    length = max(len(p) + len(c) for p, c in encoded) + 2  # at least two pad positions in every row
    pad = tokenizer.pad_token_id
    input_ids = torch.full((n_rows, length), pad, dtype=torch.long)
    attention_mask = torch.zeros((n_rows, length), dtype=torch.long)
    labels = torch.full((n_rows, length), -100, dtype=torch.long)
    for i, (p, c) in enumerate(encoded):
        ids = torch.tensor(p + c)
        input_ids[i, : len(ids)] = ids
        attention_mask[i, : len(ids)] = 1
        labels[i, len(p): len(ids)] = ids[len(p):]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def rows(batch: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    return {k: v[start:stop].clone() for k, v in batch.items()}


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


# ------------------------------------------------------------------------------------------------ the trainer
class Recorder:
    """Wraps, for the duration, the library functions the trainer calls, to see what they got and gave."""

    def __init__(self):
        self.calls: dict[str, list] = defaultdict(list)

    @contextlib.contextmanager
    def active(self):
        original_gather = online_signal.gathered_head_parameters
        original_loss = trainer_base.chunked_loss
        calls = self.calls

        @contextlib.contextmanager
        def gather(model):
            weight = output_head(model).weight
            with original_gather(model) as (w, b):
                calls["gather"].append({"param_type": type(weight).__name__, "weight": w.detach().clone(),
                                        "weight_type": type(w).__name__, "bias": b})
                yield w, b

        def loss(student_hidden, student_head, teacher, *args, **kwargs):
            calls["loss"].append({"student_weight_type": type(student_head.weight).__name__,
                                  "student_weight_shape": list(student_head.weight.shape),
                                  "student_weight": student_head.weight.detach().clone(),
                                  "teacher_weight_shape": list(teacher.head.weight.shape),
                                  "teacher_hidden": teacher.hidden.detach().clone()})
            return original_loss(student_hidden, student_head, teacher, *args, **kwargs)

        online_signal.gathered_head_parameters = gather
        trainer_base.chunked_loss = loss
        try:
            yield self
        finally:
            online_signal.gathered_head_parameters = original_gather
            trainer_base.chunked_loss = original_loss


def trainer_for(student, teacher, num_processes: int) -> DistillTrainer:
    """A DistillTrainer holding only what ``compute_loss`` and its helpers read (no Trainer.__init__)."""
    trainer = DistillTrainer.__new__(DistillTrainer)
    trainer.args = SimpleNamespace(kd_ratio=KD_RATIO, use_chunked_loss=True, loss_chunk_size=CHUNK,
                                   average_tokens_across_devices=True)
    trainer.teacher = teacher
    trainer.task = "causal_lm"
    trainer.divergence = get_divergence("fkl", temperature=TEMPERATURE)
    trainer.student_transform = logit_transform_for(student)
    trainer.vocab_size = aligned_vocab_size(student, teacher)
    trainer.teacher_signal = OnlineTeacher(teacher, trainer.vocab_size)
    trainer.accelerator = SimpleNamespace(num_processes=num_processes)
    trainer._metric_sums = {True: defaultdict(float), False: defaultdict(float)}
    return trainer


def step(trainer: DistillTrainer, student, batch, num_items_in_batch) -> tuple[torch.Tensor, Recorder]:
    """compute_loss + backward, the trainer's training step without the optimizer; returns the loss."""
    recorder = Recorder()
    with recorder.active():
        loss = trainer.compute_loss(student, batch, num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), recorder


def dense_union_loss(student, teacher, batch, normalizer) -> torch.Tensor:
    """The objective from the models' full logits (no interception, no chunking), as an independent anchor."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    valid = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][valid]
    vocab = min(output_head(student).weight.shape[0], output_head(teacher).weight.shape[0])
    with torch.no_grad():
        s = student(**inputs).logits[:, :-1][valid][:, :vocab].float()
        t = teacher(**inputs).logits[:, :-1][valid][:, :vocab].float()
    kd = (F.softmax(t / TEMPERATURE, -1) * (F.log_softmax(t / TEMPERATURE, -1) - F.log_softmax(s / TEMPERATURE, -1)))
    kd = kd.sum(-1) * TEMPERATURE**2
    ce = F.cross_entropy(s, targets, reduction="none")
    return (KD_RATIO * kd + (1 - KD_RATIO) * ce).sum() / normalizer


# ---------------------------------------------------------------------------------------------------- sharding
# name -> (student wrap, teacher wrap, reshard_after_forward). "layers": fully_shard on every decoder layer, then on
# the root (accelerate's TRANSFORMER_BASED_WRAP); "layers+head": lm_head as a unit of its own too;
# "prepare_teacher": llmkd.teacher.prepare_teacher(is_fsdp=True), i.e. trl.models.prepare_fsdp (root only).
# reshard_after_forward True is accelerate's FSDP2 default (passed explicitly: the root reshards after forward too);
# None is torch's default (the root keeps its parameters gathered after forward, until backward).
CONFIGS = {
    "accelerate": ("layers", "layers", True),
    "prepare_teacher": ("layers", "prepare_teacher", True),
    "torch_default": ("layers", "layers", None),
    "head_unit": ("layers+head", "layers+head", None),
}


def shard(model, wrap: str, reshard, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh} if reshard is None else {"mesh": mesh, "reshard_after_forward": reshard}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    if wrap == "layers+head":
        fully_shard(model.lm_head, **kwargs)
    fully_shard(model, **kwargs)


def fsdp2_accelerator(mesh, reshard):
    """The attributes of an accelerate ``Accelerator`` with an FSDP2 plugin that ``trl.models.prepare_fsdp`` reads
    (accelerate itself does not engage FSDP on a CPU-only machine; see DESIGN.md)."""
    from torch.distributed.fsdp import OffloadPolicy

    plugin = SimpleNamespace(fsdp_version=2, reshard_after_forward=bool(reshard) if reshard is not None else True,
                             cpu_offload=OffloadPolicy(), mixed_precision_policy=None, ignored_modules=None)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=mesh,
                           parallelism_config=SimpleNamespace(fsdp_dim_names=list(mesh.mesh_dim_names)),
                           device=torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------- facts
def placement_facts(model) -> dict[str, dict]:
    from torch.distributed.tensor import DTensor, Shard

    facts = {}
    for name, p in model.named_parameters():
        is_dtensor = isinstance(p, DTensor)
        facts[name] = {
            "dtensor": is_dtensor,
            "placements": [str(pl) for pl in p.placements] if is_dtensor else [],
            "shard_dims": [pl.dim for pl in p.placements if isinstance(pl, Shard)] if is_dtensor else [],
            "global_shape": list(p.shape),
            "local_shape": list(p.to_local().shape) if is_dtensor else list(p.shape),
            "requires_grad": bool(p.requires_grad),
        }
    return facts


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def all_ranks_equal(value: torch.Tensor) -> bool:
    gathered = [torch.zeros_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)


# ------------------------------------------------------------------------------------------------------ run
def run(config: str, tokenizer, mesh, rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    vocab = len(tokenizer)
    student = tiny_llama(vocab, hidden=32, layers=2, seed=1)
    teacher = freeze(tiny_llama(vocab + 7, hidden=48, layers=2, seed=2))
    student.train()
    # the same models on every rank (fully_shard keeps each rank's slice of its own full tensor)
    fingerprint = torch.stack([torch.cat([p.detach().flatten() for p in m.parameters()]).double().sum()
                               for m in (student, teacher)])
    same_init = all_ranks_equal(fingerprint)
    student_ref, teacher_ref = copy.deepcopy(student), copy.deepcopy(teacher)

    student_wrap, teacher_wrap, reshard = CONFIGS[config]
    shard(student, student_wrap, reshard, mesh)
    if teacher_wrap == "prepare_teacher":
        teacher = prepare_teacher(teacher, fsdp2_accelerator(mesh, reshard), is_deepspeed=False, is_fsdp=True)
    else:
        shard(teacher, teacher_wrap, reshard, mesh)
    facts: dict = {
        "config": {"student_wrap": student_wrap, "teacher_wrap": teacher_wrap, "reshard_after_forward": reshard},
        "same_init_on_all_ranks": same_init,
        "student_is_fsdp": isinstance(student, FSDPModule),
        "teacher_is_fsdp": isinstance(teacher, FSDPModule),
        "teacher_training": bool(teacher.training),
        "student_training": bool(student.training),
        "student_params": placement_facts(student),
        "teacher_params": placement_facts(teacher),
    }

    # The teacher head gathered outside any forward (its parameters are sharded DTensors there).
    teacher_head_ref = teacher_ref.lm_head.weight.detach()
    weight = output_head(teacher).weight
    with gathered_head_parameters(teacher) as (full_weight, bias):
        facts["standalone_gather"] = {
            "param_type": type(weight).__name__,
            "result_type": type(full_weight).__name__,
            "shape": list(full_weight.shape),
            "ref_shape": list(teacher_head_ref.shape),
            "max_diff": max_diff(full_weight, teacher_head_ref),
            "bias_is_none": bias is None,
        }

    batch = global_batch(tokenizer, world)
    local = rows(batch, rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    count = torch.tensor(trained_tokens(local), dtype=torch.long)
    dist.all_reduce(count)  # num_items_in_batch: the step's global trained-token count, as the Trainer has it
    num_items = count.clone()
    facts["tokens"] = {"local": trained_tokens(local), "global": int(count), "union": trained_tokens(batch)}

    # ---- sharded step (the trainer's code)
    sharded_trainer = trainer_for(student, teacher, num_processes=world)
    facts["vocab_size_sharded"] = sharded_trainer.vocab_size
    start = time.perf_counter()
    loss, recorded = step(sharded_trainer, student, local, num_items)
    facts["step_seconds"] = time.perf_counter() - start

    # ---- the unsharded references
    # (a) this rank's rows, the same scaling: the same teacher hidden states and the same per-rank loss
    ref_rank_trainer = trainer_for(student_ref, teacher_ref, num_processes=world)
    ref_rank_loss, ref_rank_rec = step(ref_rank_trainer, student_ref, local, num_items)
    student_ref.zero_grad(set_to_none=True)
    # (b) the union of the ranks' rows in one process: the summed loss and the gradient FSDP averaged
    dense = dense_union_loss(student_ref, teacher_ref, batch, num_items)
    ref_trainer = trainer_for(student_ref, teacher_ref, num_processes=1)
    ref_union_loss, _ = step(ref_trainer, student_ref, batch, num_items)

    summed = loss.clone() / world  # compute_loss returned (rank's loss) * world; sum over ranks = union loss
    dist.all_reduce(summed)
    facts["loss"] = {
        "rank": float(loss), "ref_rank": float(ref_rank_loss), "rank_rel": rel(float(loss), float(ref_rank_loss)),
        "union": float(summed), "ref_union": float(ref_union_loss), "dense_union": float(dense),
        "union_rel": rel(float(summed), float(ref_union_loss)),
        "ref_vs_dense_rel": rel(float(ref_union_loss), float(dense)),
        "metrics_tokens": sharded_trainer._metric_sums[True]["tokens"],
    }

    # teacher hidden states (what compute_loss handed to the engine) and the teacher head inside the step
    (engine_call,) = recorded.calls["loss"]
    (ref_engine_call,) = ref_rank_rec.calls["loss"]
    facts["teacher_hidden"] = {
        "shape": list(engine_call["teacher_hidden"].shape),
        "ref_shape": list(ref_engine_call["teacher_hidden"].shape),
        "max_diff": max_diff(engine_call["teacher_hidden"], ref_engine_call["teacher_hidden"]),
        "max_abs": float(ref_engine_call["teacher_hidden"].abs().max()),
    }
    (gather_call,) = recorded.calls["gather"]
    facts["step_gather"] = {
        "param_type": gather_call["param_type"],
        "result_type": gather_call["weight_type"],
        "shape": list(gather_call["weight"].shape),
        "ref_shape": list(teacher_head_ref.shape),
        "max_diff": max_diff(gather_call["weight"], teacher_head_ref),
    }
    facts["student_head_in_forward"] = {
        "type": engine_call["student_weight_type"],
        "shape": engine_call["student_weight_shape"],
        "ref_shape": list(student_ref.lm_head.weight.shape),
        "max_diff": max_diff(engine_call["student_weight"], student_ref.lm_head.weight.detach()),
    }

    # gradients: FSDP's sharded (reduce-scattered, averaged) grads, gathered, against the union's
    ref_params = dict(student_ref.named_parameters())
    grads = {}
    for name, p in student.named_parameters():
        g = p.grad
        entry = {"has_grad": g is not None, "dtensor": isinstance(g, DTensor)}
        if g is not None:
            full = g.full_tensor() if isinstance(g, DTensor) else g
            ref = ref_params[name].grad
            entry.update(
                placements=[str(pl) for pl in g.placements] if isinstance(g, DTensor) else [],
                local_shape=list(g.to_local().shape) if isinstance(g, DTensor) else list(g.shape),
                shape=list(full.shape), ref_shape=list(ref.shape), max_diff=max_diff(full, ref),
                ref_max_abs=float(ref.abs().max()),
            )
        grads[name] = entry
    facts["student_grads"] = grads
    facts["teacher_grads"] = [name for name, p in teacher.named_parameters() if p.grad is not None]
    # after the step every parameter is sharded again (the root reshards after backward)
    facts["student_params_after"] = {n: isinstance(p, DTensor) for n, p in student.named_parameters()}
    facts["teacher_params_after"] = {n: isinstance(p, DTensor) for n, p in teacher.named_parameters()}
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=",".join(CONFIGS))
    options = parser.parse_args()

    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    result = {"rank": rank, "world_size": world, "mesh": str(mesh), "backend": dist.get_backend(),
              "torch": torch.__version__, "runs": {}}
    for config in options.configs.split(","):
        result["runs"][config] = run(config, tokenizer, mesh, rank, world)
    (OUT / f"fsdp.rank{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
