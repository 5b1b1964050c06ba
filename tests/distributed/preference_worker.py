"""Per-rank PreferenceDistillTrainer run under DeepSpeed ZeRO-3 (2 CPU processes), the teacher (the DPO reference)
sharded as a ZeRO-3 inference engine. Writes, per rank: the teacher's partitioning, the first micro-batch's loss
computed by the trainer (sharded teacher) and by hand from unsharded copies, the logged losses and margins."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from utils import make_tokenizer, tiny_llama
from zero_worker import deepspeed_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_preference_trainer import preference_rows, sequence_logps  # noqa: E402

from llmkd import PreferenceDistillConfig, PreferenceDistillTrainer, upcycle_to_moe  # noqa: E402
from llmkd.losses import kto_pair_loss  # noqa: E402

OUT = Path(os.environ["LLMKD_TEST_OUT"])


def main() -> None:
    rank = int(os.environ["RANK"])
    tokenizer = make_tokenizer()
    student = upcycle_to_moe(tiny_llama(len(tokenizer), hidden=32, seed=1))
    teacher = tiny_llama(len(tokenizer), hidden=48, seed=2)
    full_student, full_teacher = copy.deepcopy(student).eval(), copy.deepcopy(teacher).eval()
    args = PreferenceDistillConfig(
        output_dir=str(OUT / "run"), per_device_train_batch_size=4, max_steps=8, learning_rate=2.0,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, loss_type=["kto_pair"],
        aux_loss_coef=0.0, deepspeed=deepspeed_config(3), optim="sgd", lr_scheduler_type="constant",
    )
    trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher, args=args,
                                       train_dataset=Dataset.from_list(preference_rows(64, 0)),
                                       processing_class=tokenizer)
    reference = trainer.ref_model
    partitioned = [p for p in reference.module.parameters() if hasattr(p, "ds_id")]
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():  # the sharded teacher's reference log-probs vs the full teacher's
        sharded_ref = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch)).tolist()
        full_ref = torch.cat(sequence_logps(full_teacher, batch)).tolist()
    first: dict = {}
    compute_loss = trainer.compute_loss

    def record_first_batch(model, inputs, *args, **kwargs):
        if not first:
            first.update({k: v.detach().clone() for k, v in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = record_first_batch
    trainer.train()
    with torch.no_grad():  # the first step's loss by hand, from unsharded copies of the initial models
        pc, pr = sequence_logps(full_student, first)
        rc, rr = sequence_logps(full_teacher, first)
        by_hand = float(kto_pair_loss(pc, pr, rc, rr, 0.1).mean())
    history = trainer.state.log_history
    (OUT / f"preference_rank{rank}.json").write_text(json.dumps({
        "teacher_engine": type(reference).__name__,
        "teacher_partitioned": len(partitioned),
        "teacher_parameters": len(list(reference.module.parameters())),
        "teacher_local_numel": sum(p.numel() for p in reference.module.parameters()),
        "teacher_full_numel": sum(p.numel() for p in full_teacher.parameters()),
        "sharded_ref": sharded_ref, "full_ref": full_ref, "first_loss_by_hand": by_hand,
        "zero_stage": int(trainer.model_wrapped.zero_optimization_stage()),
        "losses": [e["loss"] for e in history if "loss" in e],
        "margins": [e["rewards/margins"] for e in history if "rewards/margins" in e],
        "first_input_ids": first["input_ids"][0].tolist(),
    }))


if __name__ == "__main__":
    main()
