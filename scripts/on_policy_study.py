"""Does on-policy distillation work? The study of docs/ON_POLICY.md, on two offline tasks, written by this script.

    OMP_NUM_THREADS=1 python scripts/on_policy_study.py --tasks addition --results WORK_DIR/addition.jsonl &
    OMP_NUM_THREADS=1 python scripts/on_policy_study.py --tasks reversal --results WORK_DIR/reversal.jsonl; wait
    cat WORK_DIR/addition.jsonl WORK_DIR/reversal.jsonl > WORK_DIR/results.jsonl
    python scripts/on_policy_study.py --table_only --write   # the table of the runs recorded, into docs/ON_POLICY.md

Tasks (character-level, the quickstart's tokenizer):

* ``addition``: the quickstart's three-digit addition, lowest digit first, with its shipped teacher;
* ``reversal``: write a string of 10 digits backwards (``"4013775209=" -> "9025773104"``): every answer token
  follows the student's own earlier tokens for 10 steps, where a student trained on the dataset's completions only
  never sees its own mistakes (exposure bias, the case on-policy distillation is meant for). Its teacher (the
  quickstart teacher's architecture) is trained here once (2000 steps of 128 of 100k noisy rows) and cached in
  ``--work_dir``.

As in the quickstart, the students' training rows are noisy (30% of them have one wrong digit) and the held-out rows
are right, so a teacher's distribution carries what the labels lack. Every student has the quickstart student's
architecture, is initialised from the seed, and trains for the same steps on the same rows in the same order.

Methods (``kd_ratio`` 0.5 as in the quickstart: half CE, half divergence on the dataset's and the teacher's
completions; student samples carry no CE, their labels being the student's own tokens, so a fully on-policy run
learns from the divergence alone, and its warm start is CE + divergence; SFT is CE alone): ``sft``, ``fkl``
(off-policy forward KL), ``rkl`` (off-policy reverse KL), ``on_rkl`` (lmbda 1, reverse KL), ``on_jsd``
(lmbda 1, JSD beta 0.5), ``mixed`` (lmbda 0.5, JSD beta 0.5: TRL's GKD defaults), ``seq_kd`` (forward KL on
teacher samples), ``sampled_token`` (lmbda 1, the sampled-token policy gradient), ``taid`` and ``on_taid`` (TAID
off- and on-policy, lmbda 1). Each method that samples runs twice: from scratch (``max_steps`` of the method), and
from a warm start, GKD's protocol: the ``fkl`` method's trained student (``max_steps`` of off-policy forward KL,
the scratch ``fkl`` run of the seed, shared), then ``max_steps // 3`` more steps of the method at
``--warm_learning_rate``; ``fkl`` itself runs that continuation too, the off-policy control of the warm runs. (Drafts
of this study warm-started from a third of the FKL steps, then from a phase of the method's own loss: on addition a
student after a third of the steps has not learnt the task yet, greedy exact match 0, which is no warm start.)
For the other methods that do not sample, the scratch run is reported.

Reported per (task, method, start), mean and range over the seeds: held-out greedy exact match, and the teacher's
mean negative log-likelihood per token of the student's own samples (temperature 1) on the held-out prompts: how
likely the teacher finds what the student writes, the quantity reverse KL / on-policy methods optimise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, PrinterCallback, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import write_section  # noqa: E402

from llmkd import DistillConfig, DistillTrainer, TAIDConfig, TAIDTrainer  # noqa: E402
from llmkd.constants import IGNORE_INDEX  # noqa: E402
from llmkd.data import DistillDataCollator, prepare_dataset  # noqa: E402
from llmkd.generation import SamplingSettings, completion_batch, sample_completions  # noqa: E402
from llmkd.quickstart.evaluate import exact_match  # noqa: E402
from llmkd.quickstart.run import asset_path  # noqa: E402
from llmkd.quickstart.task import _with_a_wrong_digit, make_split, make_tokenizer  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "ON_POLICY.md")
REVERSAL_DIGITS = 10
WARM_START = "fkl_full"  # warm runs continue the trained fkl student for max_steps // 3 steps

# method -> (trainer family, config fields); "sft" is plain transformers.Trainer
METHODS = {
    "sft": ("sft", {}),
    "fkl": ("kd", {"divergence": "fkl"}),
    "rkl": ("kd", {"divergence": "rkl"}),
    "on_rkl": ("kd", {"divergence": "rkl", "lmbda": 1.0}),
    "on_jsd": ("kd", {"divergence": "jsd", "jsd_beta": 0.5, "lmbda": 1.0}),
    "mixed": ("kd", {"divergence": "jsd", "jsd_beta": 0.5, "lmbda": 0.5}),
    "seq_kd": ("kd", {"divergence": "fkl", "seq_kd": True}),
    "sampled_token": ("kd", {"divergence": "rkl", "lmbda": 1.0, "on_policy_objective": "sampled_token"}),
    "taid": ("taid", {}),
    "on_taid": ("taid", {"lmbda": 1.0}),
}


def samples(fields: dict) -> bool:
    return fields.get("lmbda", 0) > 0 or fields.get("seq_kd", False)


# ------------------------------------------------------------------------------------------------------ tasks
def reversal_rows(n: int, seed: int, label_noise: float, held_out: bool) -> list[dict[str, str]]:
    """``n`` distinct rows "d1..d12=" -> "d12..d1"; a string is held out when its hash bucket says so, so the two
    splits never share a string; ``label_noise`` of the rows get one wrong digit in the answer."""
    rng = random.Random(f"reversal-{'held_out' if held_out else 'train'}-{seed}")
    noise = random.Random(f"reversal-noise-{seed}")
    rows, seen = [], set()
    while len(rows) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(REVERSAL_DIGITS))
        if digits in seen or (hash_bucket(digits) < 10) != held_out:
            continue
        seen.add(digits)
        answer = digits[::-1]
        if label_noise and noise.random() < label_noise:
            answer = _with_a_wrong_digit(answer, noise)
        rows.append({"prompt": digits + "=", "completion": answer})
    return rows


def hash_bucket(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little") % 100


def task_data(task: str, seed: int, args) -> tuple[list[dict], list[dict], int]:
    """(noisy training rows, held-out rows, completion tokens to generate)."""
    if task == "addition":
        return (make_split("train", args.train_examples, seed=seed, label_noise=0.3),
                make_split("held_out", args.held_out_examples, seed=0), 5)
    return (reversal_rows(args.reversal_train_examples, seed, 0.3, held_out=False),
            reversal_rows(args.held_out_examples, 0, 0.0, held_out=True), REVERSAL_DIGITS + 1)


def teacher_for(task: str, tokenizer, args):
    if task == "addition":
        return AutoModelForCausalLM.from_pretrained(asset_path("teacher"), use_safetensors=True)
    path = os.path.join(args.work_dir, "reversal_teacher")
    if not os.path.exists(os.path.join(path, "config.json")):
        print("[study] training the reversal teacher (once; cached in", path, ")", flush=True)
        torch.manual_seed(0)
        config = AutoConfig.from_pretrained(asset_path("teacher"))
        teacher = AutoModelForCausalLM.from_config(config)
        rows = reversal_rows(100_000, 1000, 0.3, held_out=False)
        train_ce(teacher, tokenizer, rows, os.path.join(args.work_dir, "teacher_run"), steps=args.teacher_steps,
                 batch_size=128, seed=0)
        teacher.save_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    return teacher


# --------------------------------------------------------------------------------------------------- training
def training_fields(args, run_dir: str, seed: int, steps: int) -> dict:
    return dict(output_dir=run_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(steps // 20, 1),
                weight_decay=0.01, max_grad_norm=1.0, logging_steps=max(steps // 10, 1), save_strategy="no",
                report_to="none", seed=seed, data_seed=seed, remove_unused_columns=False, dataloader_num_workers=0,
                disable_tqdm=True)


def train_ce(model, tokenizer, rows, run_dir, *, steps, batch_size, seed, args=None):
    """Cross-entropy on the completion tokens with transformers.Trainer (SFT, and the reversal teacher)."""
    fields = training_fields(args, run_dir, seed, steps) if args else dict(
        output_dir=run_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=3e-3,
        lr_scheduler_type="cosine", warmup_steps=max(steps // 20, 1), weight_decay=0.01, max_grad_norm=1.0,
        logging_steps=max(steps // 10, 1), save_strategy="no", report_to="none", seed=seed,
        remove_unused_columns=False, disable_tqdm=True)
    dataset = prepare_dataset(Dataset.from_list(rows), tokenizer, max_length=None, completion_only_loss=True)
    trainer = Trainer(model=model, args=TrainingArguments(**fields), train_dataset=dataset,
                      data_collator=DistillDataCollator(pad_token_id=tokenizer.pad_token_id),
                      processing_class=tokenizer)
    if args is not None:  # the students run quietly; the teacher's progress is printed
        trainer.remove_callback(PrinterCallback)
    trainer.train()
    return model


def new_student(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path("student")))


def warm_path(task: str, seed: int, args) -> str:
    return os.path.join(args.work_dir, "warm", f"{task}-{seed}-{WARM_START}")


def warm_student(task: str, seed: int, teacher, tokenizer, rows, args):
    """GKD's starting point: the trained student of off-policy forward KL (the scratch ``fkl`` run of the seed,
    saved by :func:`train_student`; trained here if that run was made before it was saved)."""
    path = warm_path(task, seed, args)
    if not os.path.exists(os.path.join(path, "config.json")):
        train_student(task, "fkl", False, seed, teacher, tokenizer, rows, 0, args)
    return AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)


def run_method(method: str, student, seed: int, teacher, tokenizer, rows, completion_tokens, args, steps: int,
               run_dir: str, learning_rate: float | None = None):
    family, fields = METHODS[method]
    if learning_rate is not None:
        args = argparse.Namespace(**{**vars(args), "learning_rate": learning_rate})
    if family == "sft":
        return train_ce(student, tokenizer, rows, run_dir, steps=steps, batch_size=args.batch_size, seed=seed,
                        args=args)
    fields = dict(fields, kd_ratio=args.kd_ratio)
    if samples(fields):
        fields.update(max_completion_length=completion_tokens)
    config_class, trainer_class = (DistillConfig, DistillTrainer) if family == "kd" else (TAIDConfig, TAIDTrainer)
    config = config_class(**training_fields(args, run_dir, seed, steps), **fields)
    trainer = trainer_class(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return trainer.model


def train_student(task: str, method: str, warm: bool, seed: int, teacher, tokenizer, rows, completion_tokens, args):
    """From scratch: ``max_steps`` of the method (the ``fkl`` student is saved: the warm start). Warm: the trained
    ``fkl`` student, then ``max_steps // 3`` steps of the method at ``warm_learning_rate`` (a schedule of its own)."""
    run_dir = os.path.join(args.work_dir, "runs", f"{task}-{method}-{'warm' if warm else 'scratch'}-{seed}")
    if not warm:
        student = run_method(method, new_student(seed), seed, teacher, tokenizer, rows, completion_tokens, args,
                             args.max_steps, run_dir)
        if method == "fkl":
            student.save_pretrained(warm_path(task, seed, args))
        return student
    student = warm_student(task, seed, teacher, tokenizer, rows, args)
    return run_method(method, student, seed, teacher, tokenizer, rows, completion_tokens, args, args.max_steps // 3,
                      run_dir, learning_rate=args.warm_learning_rate)


# ------------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def teacher_nll_of_samples(student, teacher, tokenizer, rows, completion_tokens: int, seed: int) -> float:
    """The teacher's mean NLL per token (EOS included) of completions the student samples at temperature 1 after
    the held-out prompts."""
    encoded = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True)
    settings = SamplingSettings(max_completion_length=completion_tokens, temperature=1.0)
    generated = sample_completions(student, encoded["input_ids"], encoded["attention_mask"], settings, seed=seed,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    batch = completion_batch(encoded["input_ids"], encoded["attention_mask"], generated, tokenizer.eos_token_id,
                             tokenizer.pad_token_id)
    teacher.eval()
    logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(nll) / max(int((targets != IGNORE_INDEX).sum()), 1)


def runs_wanted(args) -> list[tuple[str, str, bool]]:
    wanted = []
    for task in args.tasks:
        for method in args.methods:
            starts = (False, True) if samples(METHODS[method][1]) or method == "fkl" else (False,)
            wanted += [(task, method, warm) for warm in starts]
    return wanted


def summarise(results: list[dict], args) -> list[str]:
    lines = [f"Measured by `{command_line(args)}`, one process per task (`--tasks addition` and `--tasks reversal` "
             f"side by side on the 2 cores), then `--table_only --write` ({args.max_steps} steps of {args.batch_size} "
             "rows, "
             f"{args.train_examples} (addition) and {args.reversal_train_examples} (reversal) noisy training rows, "
             f"{args.held_out_examples} held-out rows, seeds "
             f"{', '.join(map(str, args.seeds))}; mean over seeds, [min, max]). Exact match: held-out greedy exact "
             "match (higher is better). Teacher NLL: the teacher's mean negative log-likelihood per token of the "
             "student's own samples at temperature 1 on the held-out prompts (lower is better). \"vs fkl\": the "
             "exact match minus the fkl run's of the same seed and start (scratch: fkl from scratch; warm: fkl's own "
             "continuation), mean [min, max] over seeds. \"scratch\": all the "
             "steps of the method from the random initialisation. \"warm\": GKD's protocol, the trained student "
             f"of the scratch fkl run of the seed, then {args.max_steps // 3} more steps of the method (peak learning "
             f"rate {args.warm_learning_rate:g}); fkl warm is the off-policy control of those steps. \"train s\": "
             "seconds of training, two studies sharing the 2 cores.", ""]
    for task in args.tasks:
        teacher_rows = [r for r in results if r["task"] == task and r["method"] == "teacher"]
        teacher_text = (f"; teacher exact match {teacher_rows[0]['exact_match']:.3f}, teacher NLL of its own samples "
                        f"{teacher_rows[0]['teacher_nll']:.3f}") if teacher_rows else ""
        lines += [f"**{task}**{teacher_text}", "",
                  "| method | start | seeds | exact match | vs fkl, same start and seed "
                  "| teacher NLL of student samples | train s |", "|---|---|---|---|---|---|---|"]
        for _, method, warm in [w for w in runs_wanted(args) if w[0] == task]:
            rows = [r for r in results if r["task"] == task and r["method"] == method and r["warm"] == warm]
            if not rows:
                continue
            em = [r["exact_match"] for r in rows]
            nll = [r["teacher_nll"] for r in rows]
            control = {r["seed"]: r["exact_match"] for r in results
                       if r["task"] == task and r["method"] == "fkl" and r["warm"] == warm}
            paired = [r["exact_match"] - control[r["seed"]] for r in rows if r["seed"] in control]
            versus = "-" if method == "fkl" or not paired else (
                f"{statistics.mean(paired):+.3f} [{min(paired):+.3f}, {max(paired):+.3f}]")
            start = ("warm" if warm else "scratch") if samples(METHODS[method][1]) or method == "fkl" else "-"
            lines.append(f"| {method} | {start} | {len(rows)} | "
                         f"{statistics.mean(em):.3f} [{min(em):.3f}, {max(em):.3f}] | {versus} | "
                         f"{statistics.mean(nll):.3f} [{min(nll):.3f}, {max(nll):.3f}] | "
                         f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
        lines.append("")
    return lines


def command_line(args) -> str:
    parts = ["OMP_NUM_THREADS=1 python scripts/on_policy_study.py"]
    defaults = parse_args([])
    for key in ("tasks", "methods", "seeds"):
        if getattr(args, key) != getattr(defaults, key):
            parts.append(f"--{key} " + " ".join(map(str, getattr(args, key))))
    for key in ("max_steps", "batch_size", "train_examples", "reversal_train_examples", "kd_ratio",
                "held_out_examples", "learning_rate", "warm_learning_rate"):
        if getattr(args, key) != getattr(defaults, key):
            parts.append(f"--{key} {getattr(args, key)}")
    return " ".join(parts)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=["addition", "reversal"], default=["addition", "reversal"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=900)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warm_learning_rate", type=float, default=1e-3,
                        help="The peak learning rate of the warm runs (fine-tuning the trained fkl student).")
    parser.add_argument("--train_examples", type=int, default=1000)
    parser.add_argument("--reversal_train_examples", type=int, default=4000,
                        help="Training rows of the reversal task (more than addition's: with 1000 strings the "
                             "student memorises rather than learns to copy backwards).")
    parser.add_argument("--kd_ratio", type=float, default=0.5,
                        help="CE weight 1 - kd_ratio on the dataset's and the teacher's completions (student "
                             "samples never carry CE).")
    parser.add_argument("--held_out_examples", type=int, default=300)
    parser.add_argument("--teacher_steps", type=int, default=2000)
    parser.add_argument("--work_dir", default="/tmp/llmkd_on_policy_study")
    parser.add_argument("--results", default=None, help="JSON lines of every run (default: WORK_DIR/results.jsonl); "
                        "runs already there are not rerun.")
    parser.add_argument("--write", action="store_true", help="Write the table into docs/ON_POLICY.md.")
    parser.add_argument("--table_only", action="store_true",
                        help="Train nothing: the table of the runs already recorded (with --write, into the doc).")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    results_path = args.results or os.path.join(args.work_dir, "results.jsonl")
    results = [json.loads(line) for line in open(results_path)] if os.path.exists(results_path) else []
    # warm rows of the first draft (a warm phase with the method's own loss) are superseded by the FKL warm start
    results = [r for r in results if not r["warm"] or r.get("warm_start") == WARM_START]
    done = {(r["task"], r["method"], r["warm"], r["seed"]) for r in results}
    tokenizer = make_tokenizer()
    for task in [] if args.table_only else args.tasks:
        teacher = teacher_for(task, tokenizer, args)
        _, held_out, completion_tokens = task_data(task, 0, args)
        if (task, "teacher", False, 0) not in done:
            row = {"task": task, "method": "teacher", "warm": False, "seed": 0, "seconds": 0.0,
                   "exact_match": exact_match(teacher, tokenizer, held_out, max_new_tokens=completion_tokens),
                   "teacher_nll": teacher_nll_of_samples(teacher, teacher, tokenizer, held_out, completion_tokens, 0)}
            results.append(row)
            with open(results_path, "a") as handle:
                handle.write(json.dumps(row) + "\n")
        # seeds outermost: a study stopped early has every method on its first seeds
        for seed in args.seeds:
            for _, method, warm in [w for w in runs_wanted(args) if w[0] == task]:
                if (task, method, warm, seed) in done:
                    continue
                train_rows, held_out, completion_tokens = task_data(task, seed, args)
                start = time.time()
                student = train_student(task, method, warm, seed, teacher, tokenizer, train_rows, completion_tokens,
                                        args)
                seconds = time.time() - start
                row = {"task": task, "method": method, "warm": warm, "seed": seed, "seconds": seconds,
                       "warm_start": WARM_START if warm else None,
                       "exact_match": exact_match(student, tokenizer, held_out, max_new_tokens=completion_tokens),
                       "teacher_nll": teacher_nll_of_samples(student, teacher, tokenizer, held_out,
                                                             completion_tokens, seed)}
                print(f"[study] {json.dumps(row)}", flush=True)
                results.append(row)
                with open(results_path, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
    lines = summarise(results, args)
    print("\n".join(lines))
    if args.write:
        write_section(DOC, "on_policy_study", lines)


if __name__ == "__main__":
    main()
