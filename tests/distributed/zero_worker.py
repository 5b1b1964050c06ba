"""Per-rank script of tests/test_distributed.py (and test_sinkd_distributed.py with ``--method sinkd``,
test_moe_distributed.py with ``--method moe_mimic``): one DistillTrainer (or SinKDTrainer, MoEMimicTrainer) run, its
facts written as files.

Run by :func:`distributed.launcher.launch` (2 processes, ``--mode ddp|zero2|zero3``) or
:func:`distributed.launcher.run_single` (``--mode single``). Every run trains the same tiny student (Llama 2x32)
from the same tiny teacher (Llama 2x48, a 7-row larger head: the vocabularies are aligned) on the same 8 rows,
in the Trainer's sequential order, with SGD, a constant learning rate and no gradient clipping, so that one
optimizer step over the 8 rows is the same computation whatever the batch layout:

- ``single``: one process; ``--runs 8x1,1x8`` trains (per-device batch x accumulation) one after the other;
- ``ddp`` / ``zero2`` / ``zero3``: this process is one rank of 2, per-device batch ``--batch``.

Files written under ``$LLMKD_TEST_OUT`` (rank 0 unless said):
    ``<tag>.json``          losses (per logged step and per micro-batch), token counts, engine and partition facts
                            (one ``<tag>.rank<r>.json`` per rank for the per-rank facts);
    ``<tag>.init.pt``       the student's weights before training;
    ``<tag>.step1.pt``      the student's full weights after the first optimizer step (gathered under ZeRO-3);
    ``<tag>.final.pt``      the full weights after the last step;
    ``<tag>.model/``        ``trainer.save_model`` (with ``--save``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (utils.py)
from utils import fixed_completions, make_tokenizer, tiny_llama  # noqa: E402

from llmkd import (  # noqa: E402
    DistillConfig,
    DistillTrainer,
    MoEMimicConfig,
    MoEMimicTrainer,
    SinKDConfig,
    SinKDTrainer,
    upcycle_to_moe,
)
from llmkd.heads import unwrap_model  # noqa: E402

OUT = Path(os.environ.get("LLMKD_TEST_OUT") or tempfile.mkdtemp(prefix="llmkd_worker_"))
WORDS = "the cat dog sat on mat red blue green one two three four five add sum is what".split()


def rows() -> list[dict]:
    """8 prompt/completion rows; rows 0-3 have 1-2 completion words, rows 4-7 have 7-14: the two halves (the two
    ranks' shards under a 2 x 4 layout) hold very different numbers of trained tokens."""
    lengths = [1, 2, 1, 2, 9, 14, 7, 11]
    out = []
    for i, n in enumerate(lengths):
        prompt = "what is " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 3))
        completion = " " + " ".join(WORDS[(3 * i + 5 * k) % len(WORDS)] for k in range(n))
        out.append({"prompt": prompt, "completion": completion})
    return out


def deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_bucket_size": 2e5}
    if stage == 3:
        # Threshold 0: every parameter is partitioned (the default 1e5 would keep this tiny model whole on every
        # rank and never exercise the gathering of the student's lm_head through the module hooks).
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0,
                    stage3_gather_16bit_weights_on_model_save=True)
    else:
        zero.update(allgather_bucket_size=2e5)
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch SGD (optim="sgd")
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "wall_clock_breakdown": False,
    }


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def full_state(model) -> dict[str, torch.Tensor]:
    """The full (unpartitioned) parameters, on every rank; a collective under ZeRO-3."""
    params = dict(unwrap_model(model).named_parameters())
    partitioned = [p for p in params.values() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    else:
        context = nullcontext()
    with context:
        return {name: p.detach().clone().float().cpu() for name, p in params.items()}


def partition_facts(model) -> dict[str, dict]:
    facts = {}
    for name, p in unwrap_model(model).named_parameters():
        facts[name] = {
            "ds_id": hasattr(p, "ds_id"),
            "ds_numel": int(getattr(p, "ds_numel", p.numel())),
            "local_numel": int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.numel()),
            "data_numel": int(p.data.numel()),
            "requires_grad": bool(p.requires_grad),
        }
    return facts


def engine_facts(engine) -> dict:
    facts = {"class": type(engine).__name__, "module_class": type(unwrap_model(engine)).__name__}
    if hasattr(engine, "zero_optimization_stage"):
        facts["zero_stage"] = int(engine.zero_optimization_stage())
        optimizer = getattr(engine, "optimizer", None)
        facts["optimizer"] = type(optimizer).__name__ if optimizer is not None else None
    return facts


def teacher_facts(trainer) -> dict:
    """The teacher's engine and partition facts; with several teachers, one entry per teacher name."""
    if trainer.teacher is not None:
        return {"teacher_engine": engine_facts(trainer.teacher), "teacher_params": partition_facts(trainer.teacher)}
    named = {t.name: t.signal.model for t in getattr(trainer.teacher_signal, "teachers", [])}
    return {"teachers": {name: {"engine": engine_facts(model), "params": partition_facts(model)}
                         for name, model in named.items()}}


class Step1Snapshot(TrainerCallback):
    """Save the student's full weights after the first optimizer step (a collective on every rank)."""

    def __init__(self, tag: str):
        self.tag = tag
        self.trainer = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            weights = full_state(self.trainer.model_wrapped)
            if is_rank0():
                torch.save(weights, OUT / f"{self.tag}.step1.pt")


class Recording:
    """Mixin for a trainer: records, per micro-batch, the local token count, num_items_in_batch and the loss."""

    micro = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training:
            self.micro.append({
                "local_tokens": int((inputs["labels"][:, 1:] != -100).sum()),
                "num_items_in_batch": None if num_items_in_batch is None else float(num_items_in_batch),
                "loss": float(loss.detach()),
            })
        return result


class RecordingTrainer(Recording, DistillTrainer):
    pass


class FixedCompletions:
    """Mixin for a trainer: on-policy completions that are a function of each prompt (tests/utils.py
    ``fixed_completions``), the same whatever the batch layout, so that runs of different layouts distil the same
    samples."""

    def sample(self, model, prompt_ids, prompt_mask, *, seed, extra_inputs):
        return fixed_completions(prompt_ids, prompt_mask, self.processing_class.eos_token_id,
                                 len(self.processing_class), self.sampling.max_completion_length)


class FixedOnPolicyTrainer(FixedCompletions, RecordingTrainer):
    pass


class RecordingSinKDTrainer(Recording, SinKDTrainer):
    pass


class RecordingMoEMimicTrainer(Recording, MoEMimicTrainer):
    pass


# --method: (config class, trainer class, method-specific config fields)
METHODS = {
    "kd": (DistillConfig, RecordingTrainer, dict(loss_chunk_size=7, kd_ratio=0.5, divergence="fkl")),
    # Sinkhorn blocks of at most 7 tokens: every micro-batch holds several transport problems, and the 10 + 45
    # tokens of the two halves group differently in one micro-batch of 8 rows than in two of 4
    "sinkd": (SinKDConfig, RecordingSinKDTrainer, dict(sinkhorn_block=7, sinkhorn_scale=0.05)),
    # an upcycled MoE student (every layer sparse, 4 experts, top-2), d2s: experts/routers/FFNs train, plus the
    # per-micro-batch load-balancing loss with a large coefficient so that it shows in the update
    "moe_mimic": (MoEMimicConfig, RecordingMoEMimicTrainer, dict(loss_chunk_size=7, moe_stage="d2s",
                                                                  aux_loss_coef=0.5)),
    # a teacher with a SentencePiece-style tokenizer (tests/test_cross_tokenizer.py), the hybrid loss on aligned
    # spans (chunks of about 7 student tokens, never splitting a span)
    "cross_tokenizer": (DistillConfig, RecordingTrainer, dict(loss_chunk_size=7, kd_ratio=0.8,
                                                              cross_tokenizer_loss="hybrid")),
    # two teachers, each row routed to one by its "domain" column (ROUTES): rank 0's shard holds both teachers'
    # rows, rank 1's only the "math" teacher's, so under ZeRO-3 the "words" teacher runs an idle forward there
    "multi_teacher": (DistillConfig, RecordingTrainer, dict(
        loss_chunk_size=7, kd_ratio=0.7, teacher_routing_column="domain",
        teachers=[{"name": "words"}, {"name": "math", "weight": 2.0}])),
}

#: the domain (routed teacher) of each of rows()'s 8 rows under --method multi_teacher
ROUTES = ["words", "math", "words", "words", "math", "math", "math", "math"]


# --on-policy: the trainer class replacing the method's (None: the method's) and the on-policy config fields
ON_POLICY = {
    "off": (None, {}),
    # every micro-batch student-sampled, with completions fixed by the prompts
    "fixed": (FixedOnPolicyTrainer, dict(lmbda=1.0, max_completion_length=6)),
    # every micro-batch sampled by the student with transformers generate (ZeRO-3: the parameters gathered)
    "generate": (None, dict(lmbda=1.0, max_completion_length=6)),
}


def train(tag: str, mode: str, batch: int, accumulation: int, steps: int, lr: float, save: bool,
          method: str = "kd", on_policy: str = "off") -> None:
    tokenizer = make_tokenizer()
    student = tiny_llama(len(tokenizer), hidden=32, layers=2, seed=1)
    teacher = tiny_llama(len(tokenizer) + 7, hidden=48, layers=2, seed=2)
    teacher_tokenizer = None
    if method == "cross_tokenizer":
        from test_cross_tokenizer import metaspace_tokenizer

        teacher_tokenizer = metaspace_tokenizer(200)
        teacher = tiny_llama(len(teacher_tokenizer), hidden=48, layers=2, seed=2)
    data = rows()
    if method == "multi_teacher":
        teacher = {"words": teacher, "math": tiny_llama(len(tokenizer), hidden=40, layers=2, seed=3)}
        data = [{**row, "domain": domain} for row, domain in zip(data, ROUTES)]
    if method == "moe_mimic":
        student = upcycle_to_moe(student, num_experts=4, top_k=2, every=1, seed=3)
    init = {name: p.detach().clone() for name, p in student.named_parameters()}

    config_class, trainer_class, method_fields = METHODS[method]
    on_policy_class, on_policy_fields = ON_POLICY[on_policy]
    trainer_class = on_policy_class or trainer_class
    args = config_class(
        output_dir=str(OUT / f"{tag}.trainer"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        optim="sgd",
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        use_cpu=False,  # the backend comes from the launcher's patch (gloo / MULTI_CPU), as under a real launch
        disable_tqdm=True,
        dataloader_num_workers=0,
        use_chunked_loss=True,
        **method_fields,
        **on_policy_fields,
        deepspeed=deepspeed_config(3 if mode == "zero3" else 2) if mode in ("zero2", "zero3") else None,
    )
    snapshot = Step1Snapshot(tag)
    trainer = trainer_class(
        model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(data),
        processing_class=tokenizer, callbacks=[snapshot],
        **({"teacher_processing_class": teacher_tokenizer} if teacher_tokenizer is not None else {}),
    )
    trainer.micro = []
    snapshot.trainer = trainer
    trainer.train()

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    facts = {
        "rank": rank,
        "world_size": int(trainer.accelerator.num_processes),
        "distributed_type": str(trainer.accelerator.distributed_type),
        "is_deepspeed": bool(trainer.is_deepspeed_enabled),
        "student_engine": engine_facts(trainer.model_wrapped),
        "student_params": partition_facts(trainer.model_wrapped),
        **teacher_facts(trainer),
        "micro": trainer.micro,
        "log_history": trainer.state.log_history,
        "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
    }
    (OUT / f"{tag}.rank{rank}.json").write_text(json.dumps(facts, indent=1, default=str))

    final = full_state(trainer.model_wrapped)
    if save:
        trainer.save_model(str(OUT / f"{tag}.model"))
    if is_rank0():
        torch.save(init, OUT / f"{tag}.init.pt")
        torch.save(final, OUT / f"{tag}.final.pt")
        (OUT / f"{tag}.json").write_text(json.dumps(facts, indent=1, default=str))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["single", "ddp", "zero2", "zero3"], required=True)
    parser.add_argument("--runs", default="4x1", help="comma-separated BATCHxACCUMULATION layouts (single mode)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--method", choices=sorted(METHODS), default="kd")
    parser.add_argument("--on-policy", choices=sorted(ON_POLICY), default="off")
    options = parser.parse_args()
    for layout in options.runs.split(","):
        batch, accumulation = (int(x) for x in layout.split("x"))
        prefix = "" if options.method == "kd" else f"{options.method}_"
        prefix += "" if options.on_policy == "off" else f"{options.on_policy}_"
        tag = f"{prefix}{options.mode}_{batch}x{accumulation}"
        train(tag, options.mode, batch, accumulation, options.steps, options.lr, options.save, options.method,
              options.on_policy)


if __name__ == "__main__":
    main()
