"""Miniature LLaVA-MoD study: does preference distillation reduce hallucination on a synthetic VLM task?

    OMP_NUM_THREADS=1 python scripts/moe_hallucination_study.py --seeds 0 1 2 --output docs/moe_study.json

Offline, CPU only, one thread: 8 min 11 s wall for 3 seeds on this 2-core machine shared with other jobs (load
average 3-4; the teacher 74 s, then per seed d2d ~65 s, d2s ~20 s, each preference run ~12 s, the SFT control ~7 s,
evaluations included; 8 min 21 s on a repeat); about 1.3 GB of memory. Deterministic: three runs gave identical
numbers.

The task (scripts/moe_study_task.py): 16 x 16 images with 1-3 coloured shapes; "what objects ?" (answer: the list)
and "is there a <object> ?" (yes/no); a hallucination is an answer naming an absent object, or "yes" for an absent
object. Results and their reading: docs/MOE.md, "Miniature study: hallucination on a synthetic VLM task".

Pipeline (docs/ALGORITHMS.md section 3), every student model scored on the same held-out questions by greedy decoding:

1. teacher: a CLIP tower (2 x 64) pretrained to classify each cell's object, then a LLaVA (that tower frozen, Llama
   3 x 96) trained with plain CE (``transformers.Trainer``) on clean labels, once (independent of the seed);
2. ``d2d``: a fresh dense student (Llama 4 x 48, the teacher's vision tower copied in and frozen, a fresh
   projector) distilled with ``MoEMimicTrainer(moe_stage="d2d")`` (forward KL + CE) on the students' "general
   data": fewer images than the teacher's, with ``--label_noise`` of the answers hallucinated (noisy captions);
3. ``d2s``: the d2d student upcycled inside ``MoEMimicTrainer(moe_stage="d2s")`` (layers 0 and 2 get 4 experts,
   top-2; only FFNs/experts/routers and the projector train) on the same general data;
4. ``d2s+kto_pair@lr`` / ``d2s+sigmoid@lr``: ``PreferenceDistillTrainer`` from the d2s student, the teacher as the
   reference, on pairs (chosen: the correct answer, rejected: a hallucinated one) from images no model saw, at
   each of ``--pref_lrs`` (1e-5 and 5e-5; the paper's 2e-6 is for a 2B student, and 1e-5 already moves these
   students only a little);
   the trainable set is the one d2s left (FFNs/experts/routers + projector);
5. ``d2s+sft@lr`` (control): the d2s student trained with CE only (``kd_weight=0``) on the same pairs' chosen
   answers, same steps and batch, so that a gain of the preference stage can be told apart from "more clean data".

Seeds change the students' initialisation, data order and router initialisation; the data (``--data_seed``) and
the teacher are fixed. Prints a markdown table (mean and sample std over seeds) and writes every number as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_study_task as task  # noqa: E402

STAGES = ("d2d", "d2s", "kto_pair", "sigmoid", "sft")
METRICS = ("accuracy", "hallucination", "list_accuracy", "list_hallucination", "yesno_accuracy", "yes_on_absent",
           "yes_on_present", "yesno_auc")


def fresh_copy(model):
    """A copy of ``model`` with the same weights and trainable set, without the forward hooks a trainer left on it.

    (``copy.deepcopy`` of a student trained by ``MoEMimicTrainer`` fails: the trainer's RouterMonitor stays hooked
    on the routers and keeps the last forward's router logits, non-leaf tensors, alive; see docs/MOE.md.)
    """
    copied = type(model)._from_config(model.config, dtype=next(model.parameters()).dtype)
    copied.load_state_dict(model.state_dict())
    copied.generation_config = copy.deepcopy(model.generation_config)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    for name, parameter in copied.named_parameters():
        parameter.requires_grad_(name in trainable)
    return copied.train(model.training)


def common_args(output_dir: str, seed: int, steps: int, lr: float, batch_size: int) -> dict:
    return dict(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.0, logging_steps=max(steps // 4, 1),
                save_strategy="no", report_to="none", seed=seed, disable_tqdm=True, dataloader_num_workers=0)


def train_teacher(tokenizer, processor, examples, args, output_dir: str):
    """The vision tower first (per-cell object classification), then the LLaVA with the tower frozen."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from llmkd.data.collator import DistillDataCollator

    tower, cell_accuracy = task.pretrain_vision_tower(processor, examples[::2], args.vision_steps, 2e-3,
                                                      seed=args.data_seed)  # one question of two: each image once
    print(f"vision tower: cell accuracy {cell_accuracy:.4f} on its last training batches", flush=True)
    model = task.tiny_llava(tokenizer, hidden=96, layers=3, seed=args.data_seed, vision_from=tower)
    model.model.vision_tower.requires_grad_(False)
    rows = task.mimic_rows(processor, examples)
    config = TrainingArguments(**common_args(output_dir, args.data_seed, args.teacher_steps, args.teacher_lr, 32))
    trainer = Trainer(model=model, args=config, train_dataset=Dataset.from_list(rows),
                      data_collator=DistillDataCollator(pad_token_id=tokenizer.pad_token_id))
    trainer.train()
    return model.eval()


def mimic(stage: str, student, teacher, tokenizer, rows, seed: int, steps: int, lr: float, output_dir: str,
          kd_weight: float = 1.0, batch_size: int = 32):
    """One MoEMimicTrainer stage; returns the trained student (the upcycled MoE model in d2s) and the last logs."""
    from datasets import Dataset

    from llmkd import MoEMimicConfig, MoEMimicTrainer

    config = MoEMimicConfig(**common_args(output_dir, seed, steps, lr, batch_size), moe_stage=stage,
                            kd_weight=kd_weight, task="causal_lm")
    trainer = MoEMimicTrainer(model=student, teacher_model=copy.deepcopy(teacher), args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    return trainer.model.eval(), _last_logs(trainer)


def preference(loss_type: str, lr: float, student, teacher, processor, pairs, seed: int, args, output_dir: str):
    from datasets import Dataset

    from llmkd import PreferenceDistillConfig, PreferenceDistillTrainer

    config = PreferenceDistillConfig(**common_args(output_dir, seed, args.pref_steps, lr, 16),
                                     loss_type=[loss_type], beta=args.beta, max_length=None)
    trainer = PreferenceDistillTrainer(model=fresh_copy(student), teacher_model=copy.deepcopy(teacher),
                                       args=config, train_dataset=Dataset.from_list(pairs),
                                       processing_class=processor)
    trainer.train()
    return trainer.model.eval(), _last_logs(trainer)


def _last_logs(trainer) -> dict:
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    keep = ("loss", "kd_loss", "ce_loss", "moe_aux_loss", "moe_load_max", "rewards/margins", "rewards/accuracies",
            "teacher_margin")
    return {key: logs[-1][key] for key in keep if logs and key in logs[-1]}


def summarise(per_seed: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    summary = {}
    for model, by_seed in per_seed.items():
        summary[model] = {}
        for metric in METRICS:
            values = [scores[metric] for scores in by_seed.values()]
            summary[model][metric] = {"mean": statistics.fmean(values),
                                      "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                      "min": min(values), "max": max(values)}
    return summary


def markdown(summary, per_seed, seeds) -> str:
    def cell(stats):
        return f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}"

    lines = ["| model | accuracy % | hallucination % | list acc. % | list halluc. % | yes on absent % | "
             "yes on present % | yes/no AUC % |", "|---|---|---|---|---|---|---|---|"]
    for model, stats in summary.items():
        lines.append(f"| {model} | " + " | ".join(cell(stats[m]) for m in (
            "accuracy", "hallucination", "list_accuracy", "list_hallucination", "yes_on_absent", "yes_on_present",
            "yesno_auc")) + " |")
    lines += ["", "| model | " + " | ".join(f"seed {s} acc. / halluc. %" for s in seeds) + " |",
              "|---" * (len(seeds) + 1) + "|"]
    for model, by_seed in per_seed.items():
        cells = []
        for s in seeds:
            scores = by_seed.get(s, by_seed.get(seeds[0]))  # the teacher is scored once
            cells.append(f"{100 * scores['accuracy']:.1f} / {100 * scores['hallucination']:.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="docs/moe_study.json", help="where the JSON results go")
    parser.add_argument("--output_dir", default="outputs/moe_hallucination_study", help="trainers' scratch folder")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: runs beside other work)")
    parser.add_argument("--data_seed", type=int, default=0, help="seed of every data split and of the teacher")
    parser.add_argument("--teacher_images", type=int, default=4000)
    parser.add_argument("--student_images", type=int, default=1500, help="images of the students' general data")
    parser.add_argument("--pref_images", type=int, default=600, help="images of the preference pairs")
    parser.add_argument("--held_out_images", type=int, default=300)
    parser.add_argument("--label_noise", type=float, default=0.25,
                        help="share of the general data's answers replaced by a hallucinated one")
    parser.add_argument("--vision_steps", type=int, default=400, help="steps of the vision tower's pretraining")
    parser.add_argument("--teacher_steps", type=int, default=1500)
    parser.add_argument("--teacher_lr", type=float, default=1e-3)
    parser.add_argument("--student_hidden", type=int, default=48, help="width of the students' 4-layer Llama")
    parser.add_argument("--d2d_steps", type=int, default=1200)
    parser.add_argument("--d2d_lr", type=float, default=2e-3)
    parser.add_argument("--d2s_steps", type=int, default=300)
    parser.add_argument("--d2s_lr", type=float, default=5e-4)
    parser.add_argument("--pref_steps", type=int, default=150)
    parser.add_argument("--pref_lrs", type=float, nargs="+", default=[1e-5, 5e-5],
                        help="learning rates of the preference stage (each loss runs at each)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--sft_lr", type=float, default=1e-5, help="lr of the d2s+sft control (pref_steps steps)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                        help="stages to run and score (d2d and d2s always run: the later stages start from them)")
    parser.add_argument("--teacher_dir", default=None,
                        help="reuse a teacher saved by an earlier run here (trained and saved there when absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    started = time.time()
    load_at_start = os.getloadavg()[0]  # the machine is shared: the wall time depends on what else runs

    tokenizer = task.make_tokenizer()
    processor = task.make_processor(tokenizer)
    teacher_data = task.make_split(args.teacher_images, seed=10_000 + args.data_seed)
    general = task.make_split(args.student_images, seed=20_000 + args.data_seed)
    noise_rng = random.Random(25_000 + args.data_seed)
    general_answers = [task.noisy_answer(e, noise_rng, args.label_noise) for e in general]
    pref_data = task.make_split(args.pref_images, seed=30_000 + args.data_seed)
    held_out = task.make_split(args.held_out_images, seed=40_000 + args.data_seed)
    general_rows = task.mimic_rows(processor, general, general_answers)
    pairs = task.preference_rows(pref_data, seed=35_000 + args.data_seed)
    chosen_rows = task.mimic_rows(processor, [e for e in pref_data if e.kind == "list" or e.asked_absent])
    noisy = sum(a != e.answer for a, e in zip(general_answers, general))
    print(f"data: teacher {len(teacher_data)} questions, general {len(general)} ({noisy} hallucinated labels), "
          f"{len(pairs)} preference pairs, held-out {len(held_out)} ({time.time() - started:.0f} s)", flush=True)

    from transformers import LlavaForConditionalGeneration

    if args.teacher_dir and os.path.isdir(args.teacher_dir):
        teacher = LlavaForConditionalGeneration.from_pretrained(args.teacher_dir).eval()
        teacher_seconds = 0.0
    else:
        start = time.time()
        teacher = train_teacher(tokenizer, processor, teacher_data, args, os.path.join(args.output_dir, "teacher"))
        teacher_seconds = time.time() - start
        if args.teacher_dir:
            teacher.save_pretrained(args.teacher_dir)
    models = [stage for stage in ("d2d", "d2s") if stage in args.stages]
    models += [f"d2s+{loss}@{lr:g}" for loss in ("kto_pair", "sigmoid") if loss in args.stages for lr in args.pref_lrs]
    models += [f"d2s+sft@{args.sft_lr:g}"] if "sft" in args.stages else []
    per_seed: dict[str, dict[int, dict]] = {model: {} for model in ("teacher", *models)}
    per_seed["teacher"][args.data_seed] = task.evaluate(teacher, processor, held_out)
    print(f"teacher: {per_seed['teacher'][args.data_seed]} ({teacher_seconds:.0f} s)", flush=True)

    train_logs: dict[str, dict[int, dict]] = {model: {} for model in models}
    for seed in args.seeds:
        def record(name, model, logs, start):
            per_seed[name][seed] = task.evaluate(model, processor, held_out)
            train_logs[name][seed] = {**logs, "seconds": round(time.time() - start, 1)}
            scores = per_seed[name][seed]
            print(f"seed {seed} {name:18s} accuracy {scores['accuracy']:.3f} hallucination "
                  f"{scores['hallucination']:.3f} (list {scores['list_hallucination']:.3f}, yes on absent "
                  f"{scores['yes_on_absent']:.3f}, yes on present {scores['yes_on_present']:.3f}, AUC "
                  f"{scores['yesno_auc']:.3f}) "
                  f"{time.time() - start:.0f} s  {logs}", flush=True)

        out = os.path.join(args.output_dir, f"seed{seed}")
        start = time.time()
        student = task.tiny_llava(tokenizer, hidden=args.student_hidden, layers=4, seed=seed, vision_from=teacher)
        dense, logs = mimic("d2d", student, teacher, tokenizer, general_rows, seed, args.d2d_steps, args.d2d_lr,
                            os.path.join(out, "d2d"))
        if "d2d" in args.stages:
            record("d2d", dense, logs, start)
        start = time.time()
        sparse, logs = mimic("d2s", dense, teacher, tokenizer, general_rows, seed, args.d2s_steps, args.d2s_lr,
                             os.path.join(out, "d2s"))
        if "d2s" in args.stages:
            record("d2s", sparse, logs, start)
        for loss_type in ("kto_pair", "sigmoid"):
            for lr in args.pref_lrs if loss_type in args.stages else ():
                start = time.time()
                model, logs = preference(loss_type, lr, sparse, teacher, processor, pairs, seed, args,
                                         os.path.join(out, f"{loss_type}_{lr:g}"))
                record(f"d2s+{loss_type}@{lr:g}", model, logs, start)
        if "sft" in args.stages:
            start = time.time()
            model, logs = mimic("d2s", fresh_copy(sparse), teacher, tokenizer, chosen_rows, seed, args.pref_steps,
                                args.sft_lr, os.path.join(out, "sft"), kd_weight=0.0, batch_size=16)
            record(f"d2s+sft@{args.sft_lr:g}", model, logs, start)

    summary = summarise(per_seed)
    table = markdown(summary, per_seed, args.seeds)
    wall = time.time() - started
    print("\n" + table + f"\n\nwall time {wall:.0f} s", flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump({"command": " ".join(["python", "scripts/moe_hallucination_study.py", *sys.argv[1:]]),
                       "settings": vars(args), "wall_seconds": round(wall, 1),
                       "teacher_seconds": round(teacher_seconds, 1),
                       "load_average_at_start_and_end": [load_at_start, os.getloadavg()[0]], "summary": summary,
                       "per_seed": {m: {str(s): v for s, v in by.items()} for m, by in per_seed.items()},
                       "train_logs": {m: {str(s): v for s, v in by.items()} for m, by in train_logs.items()},
                       "table": table}, handle, indent=1)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
