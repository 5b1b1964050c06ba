"""The paper's claim at small scale: SinKD against KL, RKL, JSD and plain SFT on the offline classification task.

    python scripts/bench_sinkd_tiny_cls.py --seeds 0 1 2          # ~1 minute per run on a free CPU core

Every run trains the same freshly initialised 2 x 64 BERT student (recipes/assets/sinkd-tiny-cls/student, seeded)
on the same 2000 noisy rows (recipes/data/sentiment_train.jsonl) in the same order, for the same steps, from the
same 4 x 128 teacher, and differs only in its loss:

- ``sft``: cross-entropy only (kd_ratio 0, no Sinkhorn term);
- ``kl`` / ``rkl`` / ``jsd``: ``DistillTrainer`` with ``0.9 * divergence_T + 0.1 * CE`` at T = 2;
- ``sinkd``: ``SinKDTrainer`` with the paper's settings (``0.9 * KD_T + 0.1 * CE + 0.8 * L_sink``).

It prints held-out accuracy (2000 clean rows) per method and seed, and the mean, and writes them as JSON. The paper
reports SinKD > JS > RKL > KL on GLUE dev (BERT-base -> 6-layer BERT); this is a check of the direction at toy
scale, not a reproduction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from datasets import load_dataset

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
ASSETS = os.path.join(ROOT, "recipes", "assets", "sinkd-tiny-cls")
DATA = os.path.join(ROOT, "recipes", "data")
METHODS = ("sft", "kl", "rkl", "jsd", "sinkd")


def run(method: str, seed: int, epochs: float, output_dir: str) -> float:
    from llmkd import DistillConfig, DistillTrainer, SinKDConfig, SinKDTrainer

    common = dict(
        output_dir=output_dir, model_name_or_path=os.path.join(ASSETS, "student"), init_student_from_config=True,
        teacher_model_name_or_path=os.path.join(ASSETS, "teacher"), max_length=32, per_device_train_batch_size=32,
        per_device_eval_batch_size=256, num_train_epochs=epochs, learning_rate=1e-3, lr_scheduler_type="linear",
        warmup_steps=0.06, weight_decay=0.01, logging_steps=1000, save_strategy="no", report_to="none", seed=seed,
        disable_tqdm=True, temperature=2.0,
    )
    if method in ("sft", "sinkd"):
        extra = dict(kd_ratio=0.0, sinkhorn_weight=0.0) if method == "sft" else {}
        config, trainer_class = SinKDConfig(**common, **extra), SinKDTrainer
    else:
        divergence = {"kl": "fkl", "rkl": "rkl", "jsd": "jsd"}[method]
        config, trainer_class = DistillConfig(**common, divergence=divergence, kd_ratio=0.9), DistillTrainer
    train = load_dataset("json", data_files=os.path.join(DATA, "sentiment_train.jsonl"), split="train")
    held_out = load_dataset("json", data_files=os.path.join(DATA, "sentiment_held_out.jsonl"), split="train")
    trainer = trainer_class(args=config, train_dataset=train, eval_dataset=held_out)
    trainer.train()
    return float(trainer.evaluate()["eval_accuracy"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--output_dir", default="outputs/bench_sinkd_tiny_cls")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: runs beside other work)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    results: dict[str, dict[int, float]] = {m: {} for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            start = time.time()
            accuracy = run(method, seed, args.epochs, os.path.join(args.output_dir, f"{method}_{seed}"))
            results[method][seed] = accuracy
            print(f"seed {seed} {method:6s} held-out accuracy {accuracy:.4f} ({time.time() - start:.0f} s)",
                  flush=True)
    print("\n| method | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---" * (len(args.seeds) + 2) + "|")
    for method, by_seed in results.items():
        values = [by_seed[s] for s in args.seeds]
        print(f"| {method} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {statistics.mean(values):.4f} |")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump({"epochs": args.epochs, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
