"""Per-rank TAIDTrainer run under DeepSpeed ZeRO-3 (2 CPU processes): writes each rank's t after every step.

Ranks see different data (and so different local losses); the schedule must still hold the same t on every rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback
from utils import make_tokenizer, prompt_completion_rows, tiny_llama
from zero_worker import deepspeed_config

from llmkd import TAIDConfig, TAIDTrainer

OUT = Path(os.environ["LLMKD_TEST_OUT"])


class RecordT(TrainerCallback):
    def __init__(self):
        self.trainer = None
        self.ts = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ts.append(float(self.trainer.schedule.t))


def main() -> None:
    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    rows = prompt_completion_rows(32, seed=3)
    for i, row in enumerate(rows):
        row["completion"] += " one two" * (i % 4)  # ranks get different token counts and losses
    recorder = RecordT()
    args = TAIDConfig(
        output_dir=str(OUT / "run"), per_device_train_batch_size=2, max_steps=5, learning_rate=5e-2,
        logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, t_start=0.4,
        alpha=0.2, beta=0.5, deepspeed=deepspeed_config(3), optim="sgd", lr_scheduler_type="constant",
    )
    trainer = TAIDTrainer(model=tiny_llama(len(tokenizer), hidden=32, seed=1),
                          teacher_model=tiny_llama(len(tokenizer), hidden=48, seed=2), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    recorder.trainer = trainer
    trainer.add_callback(recorder)  # after the schedule's own callback, so it sees the updated t
    trainer.train()
    rank = int(os.environ["RANK"])
    local = [e["kd_loss"] for e in trainer.state.log_history if "kd_loss" in e]
    (OUT / f"taid_rank{rank}.json").write_text(json.dumps({
        "ts": recorder.ts, "schedule": trainer.schedule.state_dict(), "logged_kd": local,
        "zero_stage": int(trainer.model_wrapped.zero_optimization_stage()),
    }))


if __name__ == "__main__":
    main()
