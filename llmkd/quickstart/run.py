"""``llmkd quickstart``: distil a trained teacher into a smaller student, offline, on a laptop CPU, in minutes.

What it does, top to bottom:

1. loads the teacher shipped in the package (``llmkd/assets/quickstart/teacher``: a 4-layer, 1.05M-parameter Llama
   trained by ``scripts/make_quickstart_teacher.py`` on 400k noisy additions) and its character-level tokenizer;
2. draws the students' small training set (``--train_examples`` additions, ``--label_noise`` of them with one wrong
   digit in the answer, as in scraped data) and a held-out set of pairs never seen in training, with right answers;
3. builds the student (2 layers, half the teacher's width, 0.13M parameters;
   ``llmkd/assets/quickstart/student/config.json``) twice from the same seed, and trains it for the same number of
   steps on the same rows in the same order:

   - the SFT student with plain ``transformers.Trainer``: the model's own cross-entropy on the completion tokens,
     no teacher anywhere;
   - the distilled student with the method's trainer (``--method``, default ``kd``: :class:`~llmkd.DistillTrainer`
     with ``0.5 * cross-entropy + 0.5 * forward KL to the teacher`` at temperature 1; ``--method taid`` is
     :class:`~llmkd.TAIDTrainer` with ``0.5 * cross-entropy + 0.5 * KL(p_t || q_theta)`` and the paper's schedule
     defaults, a target that moves from the student (t = 0.4) to the teacher (t = 1) over the run; the two methods
     differ in the distillation target only. ``kd`` is the default because it beat SFT on every seed measured, TAID
     did not: docs/QUICKSTART.md);

4. prints held-out exact match (greedy generation) and completion perplexity of teacher / SFT / distilled student,
   saves the distilled student with ``save_pretrained`` (and the tokenizer) into ``OUTPUT_DIR/distilled_student``,
   and writes ``OUTPUT_DIR/results.json`` and PNG loss curves.

Why the answers are noisy: distillation pays when the teacher's distribution carries information the labels lack.
The teacher saw 400k noisy rows and learned the rule; its distribution on a training row puts most of its mass on
the right digit even where that row's label is wrong, while SFT fits the wrong digits. With clean answers, a teacher
this sure of itself gives distributions that are nearly the one-hot labels: in our runs on 300 clean rows the SFT and
the KD students both failed (held-out exact match under 1%), and from about 500 clean rows SFT alone already succeeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib import resources

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from ..data import DistillDataCollator, prepare_dataset
from ..methods import method_entry
from .evaluate import completion_perplexity, exact_match
from .plots import plot_loss_curves
from .task import make_split

# The distilled student's method-specific settings; a method not listed runs with its config's defaults.
# kd (the default): half cross-entropy, half forward KL at temperature 1; it beat SFT on all 7 seeds measured.
# taid: the paper's schedule (TAIDConfig's defaults, written out so that results.json records them) with half
# cross-entropy as for kd; with the official schedule (2026-12-02) it lost to SFT on one seed of seven.
# Every configuration tried, per seed: docs/QUICKSTART.md.
# on_policy: kd's trainer and loss; the first third of the steps off-policy (a warm start, GKD's protocol: the samples
# of an untrained student are noise; off_policy_steps is set by method_settings), then half of the micro-batches
# sampled by the student (lmbda 0.5), forward KL without CE on those.
METHOD_SETTINGS = {
    "taid": {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "kd_ratio": 0.5},
    "kd": {"divergence": "fkl", "kd_ratio": 0.5, "temperature": 1.0},
    "on_policy": {"divergence": "fkl", "kd_ratio": 0.5, "temperature": 1.0, "lmbda": 0.5,
                  "max_completion_length": 8},
}
# quickstart names that are a method of llmkd.methods.METHODS with settings, not a method of their own
QUICKSTART_VARIANTS = {"on_policy": "kd"}


def quickstart_method(name: str):
    """The :class:`~llmkd.methods.MethodEntry` a quickstart ``--method`` runs (a method, or a variant of one)."""
    return method_entry(QUICKSTART_VARIANTS.get(name, name))


def method_settings(args: argparse.Namespace) -> dict:
    """The distilled student's method-specific config fields for this run (METHOD_SETTINGS, and for on_policy
    ``off_policy_steps`` = a third of ``max_steps``: 500 of the default 1500)."""
    settings = dict(METHOD_SETTINGS.get(args.method, {}))
    if args.method == "on_policy":
        settings["off_policy_steps"] = args.max_steps // 3
    return settings


def asset_path(*parts: str) -> str:
    """A path inside the package's ``assets/quickstart`` folder (works from a wheel install too)."""
    return str(resources.files("llmkd").joinpath("assets", "quickstart", *parts))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="llmkd quickstart",
        description="Distil a trained addition teacher into a smaller student and compare it with the same student "
        "trained by plain SFT on the same data and steps (offline, CPU, about two minutes).",
    )
    parser.add_argument("--output_dir", default="./quickstart_output", help="Where the student, results and plots go.")
    parser.add_argument("--method", default="kd",
                        help="The distillation method: a name in llmkd.methods.METHODS, or on_policy (kd on the "
                             "student's own samples after a warm start, docs/ON_POLICY.md).")
    parser.add_argument("--max_steps", type=int, default=1500, help="Optimizer steps of each student.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the students' weights, data and data order.")
    parser.add_argument("--train_examples", type=int, default=1000, help="Training rows the students see.")
    parser.add_argument("--label_noise", type=float, default=0.3,
                        help="Fraction of training rows with one wrong digit in the answer (held-out rows are right).")
    parser.add_argument("--held_out_examples", type=int, default=2000, help="Held-out rows evaluated.")
    parser.add_argument("--batch_size", type=int, default=64, help="Rows per optimizer step.")
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="Peak learning rate of both students.")
    return parser.parse_args(argv)


def training_arguments(args: argparse.Namespace, name: str) -> dict:
    """The TrainingArguments fields both students share, so that they differ in their loss only."""
    return dict(
        output_dir=os.path.join(args.output_dir, "runs", name),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(args.max_steps // 20, 1),
        weight_decay=0.01,
        max_grad_norm=1.0,
        logging_steps=max(args.max_steps // 50, 1),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )


def new_student(seed: int):
    """The student, initialised from ``seed`` (the same weights for both students of a run)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_path("student")))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def train_sft(args, tokenizer, train_rows) -> tuple[torch.nn.Module, list[dict], float]:
    """Plain supervised fine-tuning: transformers.Trainer and the model's own cross-entropy on the completion
    tokens, with the same tokenization and collator as the distilled student. Returns (model, log history, s)."""
    dataset = prepare_dataset(train_rows, tokenizer, max_length=None, completion_only_loss=True)
    trainer = Trainer(
        model=new_student(args.seed), args=TrainingArguments(**training_arguments(args, "sft")),
        train_dataset=dataset, data_collator=DistillDataCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    start = time.time()
    trainer.train()
    return trainer.model, trainer.state.log_history, time.time() - start


def train_distilled(args, tokenizer, teacher, train_rows):
    """The method's trainer and config (``llmkd.methods.method_entry(args.method)``). Returns (trainer, s)."""
    entry = quickstart_method(args.method)
    config = entry.config_class(
        **training_arguments(args, f"distilled-{args.method}"), **method_settings(args)
    )
    trainer = entry.trainer_class(
        model=new_student(args.seed), teacher_model=teacher, args=config, train_dataset=Dataset.from_list(train_rows),
        processing_class=tokenizer,
    )
    start = time.time()
    trainer.train()
    return trainer, time.time() - start


def evaluate(model, tokenizer, rows) -> dict[str, float]:
    return {"exact_match": exact_match(model, tokenizer, rows),
            "perplexity": completion_perplexity(model, tokenizer, rows)}


def format_table(results: dict) -> str:
    """The results as a text table: one line per model."""
    lines = [f"{'model':<20}{'params':>8}{'held-out exact match':>22}{'completion perplexity':>23}{'train time':>12}"]
    for name, row in results["models"].items():
        seconds = row.get("train_seconds")
        lines.append(f"{name:<20}{row['parameters'] / 1e6:>7.2f}M{row['exact_match']:>22.3f}"
                     f"{row['perplexity']:>23.3f}{'-' if seconds is None else f'{seconds:.0f} s':>12}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    """Run the quickstart as ``args`` (from :func:`parse_args`) say. Returns ``{"results": the dict written to
    results.json, "student": the distilled student, "trainer": its trainer, "sft_student", "teacher",
    "tokenizer"}``."""
    start = time.time()
    quickstart_method(args.method)  # an unknown method fails here, before any work
    os.makedirs(args.output_dir, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(asset_path("teacher"))
    teacher = AutoModelForCausalLM.from_pretrained(asset_path("teacher"), use_safetensors=True)
    train_rows = make_split("train", args.train_examples, seed=args.seed, label_noise=args.label_noise)
    # The held-out rows do not depend on --seed, so runs with different seeds are compared on the same rows.
    held_out = make_split("held_out", args.held_out_examples, seed=0)
    example = held_out[0]
    print(f"[quickstart] task: three-digit addition, every number written lowest digit first (e.g. "
          f"{example['prompt']}{example['completion']}); the students train on {len(train_rows)} rows, "
          f"{args.label_noise:.0%} of them with one wrong digit in the answer, for {args.max_steps} steps of "
          f"{args.batch_size} rows; {len(held_out)} held-out rows (pairs never trained on, right answers)")

    results = {"method": args.method, "seed": args.seed, "max_steps": args.max_steps, "batch_size": args.batch_size,
               "train_examples": len(train_rows), "label_noise": args.label_noise,
               "held_out_examples": len(held_out), "method_settings": method_settings(args),
               "models": {}}
    results["models"]["teacher"] = {"parameters": count_parameters(teacher), "train_seconds": None,
                                    **evaluate(teacher, tokenizer, held_out)}

    print("[quickstart] training the SFT student (transformers.Trainer, cross-entropy only, no teacher)")
    sft_model, sft_history, sft_seconds = train_sft(args, tokenizer, train_rows)
    results["models"]["SFT student"] = {"parameters": count_parameters(sft_model), "train_seconds": sft_seconds,
                                        **evaluate(sft_model, tokenizer, held_out)}

    print(f"[quickstart] training the distilled student (method {args.method!r})")
    trainer, distilled_seconds = train_distilled(args, tokenizer, teacher, train_rows)
    student = trainer.model
    results["models"]["distilled student"] = {"parameters": count_parameters(student),
                                              "train_seconds": distilled_seconds,
                                              **evaluate(student, tokenizer, held_out)}

    student_dir = os.path.join(args.output_dir, "distilled_student")
    trainer.save_model(student_dir)
    tokenizer.save_pretrained(student_dir)
    plots = plot_loss_curves(sft_history, trainer.state.log_history, args.output_dir, method=args.method)
    results["wall_seconds"] = time.time() - start
    results["distilled_student_dir"] = os.path.abspath(student_dir)
    results["plots"] = [os.path.abspath(path) for path in plots]
    with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)

    print()
    print(format_table(results))
    print(f"\nwall time {results['wall_seconds']:.0f} s. Distilled student: {student_dir} "
          f"(AutoModelForCausalLM.from_pretrained). Loss curves: {', '.join(plots)}")
    return {"results": results, "student": student, "trainer": trainer, "sft_student": sft_model,
            "teacher": teacher, "tokenizer": tokenizer}


def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0
