"""Does cross-tokenizer distillation work? The study of docs/CROSS_TOKENIZER.md, written by this script.

    OMP_NUM_THREADS=2 python scripts/cross_tokenizer_study.py --teacher_only        # the teacher, once (~4 min)
    OMP_NUM_THREADS=1 python scripts/cross_tokenizer_study.py --seeds 0 2 --results W/a.jsonl &
    OMP_NUM_THREADS=1 python scripts/cross_tokenizer_study.py --seeds 1 --results W/b.jsonl; wait
    cat W/a.jsonl W/b.jsonl > W/results.jsonl
    python scripts/cross_tokenizer_study.py --table_only --write   # the table, into docs/CROSS_TOKENIZER.md

The task is the quickstart's three-digit addition, every number lowest digit first (llmkd/quickstart/task.py), with
its noisy training answers (30% of the rows have one wrong digit; held-out rows are right). Two tokenizers of the
same text:

* the teacher's: BPE trained here on the task's text (``--teacher_vocab`` tokens), with numbers cut into pairs of
  digits from their start before the merges: ``743`` is ``74`` + ``3``, ``3101`` is ``31`` + ``01``;
* the students': the quickstart's character-level tokenizer (one token per digit).

So a number is a 1:2 span (a teacher token of two digits against the student's two) followed, for three digits,
by a 1:1 span; the operators and the end of sequence are 1:1. (A first draft let BPE merge whole numbers freely:
its segmentation then depends on the digits, "133" is "1" + "33" but "251" is one token, and the teacher did not
learn the task in 2000 steps, loss 1.8 per token.) The teacher (4 layers, hidden 128, the quickstart teacher's
architecture) is trained here once with the teacher's tokenizer (``--teacher_steps`` of 128 of 400k rows; 2000
steps, the quickstart teacher's budget, left it at exact match 0.75) and
cached in ``--work_dir``. Every student has the quickstart student's architecture (2 layers, hidden 64), is
initialised from the seed and trains for ``--max_steps`` of ``--batch_size`` on the same 1000 noisy rows in the
same order, with the quickstart's optimiser settings.

Methods: ``sft`` (cross-entropy alone), ``uld``, ``hybrid`` (forward KL on the shared vocabulary) and ``span``
(span likelihood matching), each with ``kd_ratio`` 0.5 (half CE, half the cross-tokenizer loss), all with the
character-level student; and two students with the teacher's own tokenizer: ``sft_same`` and ``fkl_same``
(forward KL, kd_ratio 0.5), the same-tokenizer ceiling.

Reported per method, mean and range over the seeds: held-out greedy exact match and held-out bits per byte (the
negative log-likelihood of the answers' tokens, end of sequence excluded, in bits, divided by the answers'
characters: comparable across tokenizers, where per-token perplexity is not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import write_section  # noqa: E402
from make_quickstart_teacher import student_config, train_teacher  # noqa: E402

from llmkd import DistillConfig, DistillTrainer  # noqa: E402
from llmkd.constants import IGNORE_INDEX  # noqa: E402
from llmkd.cross_tokenizer import RowAligner, shared_vocabulary  # noqa: E402
from llmkd.data import DistillDataCollator, prepare_dataset  # noqa: E402
from llmkd.quickstart.evaluate import exact_match  # noqa: E402
from llmkd.quickstart.run import training_arguments  # noqa: E402
from llmkd.quickstart.task import EOS, PAD, UNK, make_split, make_tokenizer  # noqa: E402

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "CROSS_TOKENIZER.md")
METHODS = {  # name -> (tokenizer: "student" (character-level) or "teacher", cross_tokenizer_loss, divergence)
    "sft": ("student", None, None),
    "uld": ("student", "uld", None),
    "hybrid": ("student", "hybrid", "fkl"),
    "span": ("student", "span", None),
    "sft_same": ("teacher", None, None),
    "fkl_same": ("teacher", None, "fkl"),
}


def teacher_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """BPE trained on the task's text, which it sees as words of one or two digits (``+`` and ``=`` split off, each
    number cut into pairs of digits from its start), specials as the quickstart's."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex("[+=]"), behavior="isolated"),
        pre_tokenizers.Split(Regex("[0-9][0-9]"), behavior="isolated")])  # a number's digits in pairs
    tokenizer.decoder = decoders.Fuse()
    texts = [row["prompt"] + row["completion"] for row in make_split("train", 20_000, seed=100)]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   padding_side="left", model_input_names=["input_ids", "attention_mask"])


def the_teacher(tokenizer, args):
    """The teacher trained with the teacher's tokenizer (cached in ``work_dir/teacher``)."""
    folder = os.path.join(args.work_dir, f"teacher_v{args.teacher_vocab}_s{args.teacher_steps}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        rows = make_split("train", 400_000, seed=0, label_noise=0.3)
        settings = SimpleNamespace(steps=args.teacher_steps, batch_size=128, learning_rate=3e-3, hidden=128, layers=4,
                                   eval_every=0, seed=0)
        model = train_teacher(tokenizer, rows, [], settings)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@torch.no_grad()
def bits_per_byte(model, tokenizer, rows) -> float:
    """The answers' negative log-likelihood in bits (teacher-forced after the prompt; the end-of-sequence token
    excluded) divided by the answers' characters."""
    model.eval()
    texts = [row["prompt"] + row["completion"] for row in rows]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    prompt_tokens = torch.tensor([len(ids) for ids in tokenizer([row["prompt"] for row in rows])["input_ids"]])
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    labels[torch.arange(labels.shape[1])[None, :] < prompt_tokens[:, None]] = IGNORE_INDEX
    logits = model(**encoded).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="sum")
    return float(nll) / math.log(2) / sum(len(row["completion"]) for row in rows)


def train_student(method: str, seed: int, teacher, tokenizers: dict, rows, args):
    side, cross_loss, divergence = METHODS[method]
    tokenizer = tokenizers[side]
    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(student_config(tokenizer))
    settings = SimpleNamespace(output_dir=args.work_dir, max_steps=args.max_steps, batch_size=args.batch_size,
                               learning_rate=args.learning_rate, seed=seed)
    fields = {**training_arguments(settings, f"{method}-{seed}"), "disable_tqdm": True}
    if divergence is None and cross_loss is None:  # SFT: the model's own cross-entropy, as the quickstart's
        dataset = prepare_dataset(rows, tokenizer, max_length=None, completion_only_loss=True)
        trainer = Trainer(model=student, args=TrainingArguments(**fields), train_dataset=dataset,
                          data_collator=DistillDataCollator(pad_token_id=tokenizer.pad_token_id))
    else:
        config = DistillConfig(**fields, kd_ratio=args.kd_ratio, divergence=divergence or "fkl",
                               cross_tokenizer_loss=cross_loss, max_length=None)
        trainer = DistillTrainer(model=student, teacher_model=teacher, args=config,
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                                 teacher_processing_class=tokenizers["teacher"])
    trainer.train()
    return trainer.model


def alignment_summary(tokenizers, rows) -> dict:
    """How the two tokenizations of the held-out texts align: spans per row, the share of 1:1 spans, dropped spans,
    and the shared vocabulary."""
    aligner = RowAligner(tokenizers["student"], tokenizers["teacher"])
    student = tokenizers["student"]
    spans = one_to_one = dropped = 0
    for row in rows:
        ids = student(row["prompt"] + row["completion"])["input_ids"] + [student.eos_token_id]
        aligned = aligner.align(ids)
        spans += aligned.num_spans
        dropped += aligned.dropped_spans
        counts_s = torch.bincount(torch.tensor(aligned.student_spans[aligned.student_spans >= 0]),
                                  minlength=aligned.num_spans)
        counts_t = torch.bincount(torch.tensor(aligned.teacher_spans[aligned.teacher_spans >= 0]),
                                  minlength=aligned.num_spans)
        one_to_one += int(((counts_s == 1) & (counts_t == 1)).sum())
    shared = len(shared_vocabulary(tokenizers["student"], tokenizers["teacher"])[0])
    return {"spans_per_row": spans / len(rows), "one_to_one": one_to_one / max(spans, 1), "dropped": dropped,
            "shared_vocabulary": shared, "student_vocabulary": len(tokenizers["student"]),
            "teacher_vocabulary": len(tokenizers["teacher"])}


def spread(values) -> str:
    return f"{statistics.mean(values):.3f} [{min(values):.3f}, {max(values):.3f}]"


def summarise(results: list[dict], args) -> list[str]:
    teacher = next((r for r in results if r["method"] == "teacher"), None)
    stats = next((r["alignment"] for r in results if r["method"] == "alignment"), None)
    lines = [f"Written by `{command_line(args)}` (then `--table_only --write`); {args.max_steps} steps of "
             f"{args.batch_size} rows, seeds {sorted({r['seed'] for r in results if 'exact_match' in r})}, 500 "
             "held-out rows. Mean [min, max] over the seeds.", ""]
    if stats:
        lines += [f"Alignment of the held-out texts: {stats['spans_per_row']:.1f} spans per row, "
                  f"{stats['one_to_one']:.0%} of them 1:1, {stats['dropped']} dropped; vocabularies: student "
                  f"{stats['student_vocabulary']}, teacher {stats['teacher_vocabulary']}, shared "
                  f"{stats['shared_vocabulary']}.", ""]
    lines += ["| method | student tokenizer | exact match | bits per byte | seconds per run |", "|---|---|---|---|---|"]
    if teacher:
        lines.append(f"| teacher | teacher's ({teacher['vocab']}) | {teacher['exact_match']:.3f} | "
                     f"{teacher['bits_per_byte']:.3f} | - |")
    for method, (side, _, _) in METHODS.items():
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        name = "character-level" if side == "student" else "teacher's"
        lines.append(f"| {method} | {name} | {spread([r['exact_match'] for r in runs])} | "
                     f"{spread([r['bits_per_byte'] for r in runs])} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    return lines


def command_line(args) -> str:
    parts = ["python scripts/cross_tokenizer_study.py"]
    defaults = parse_args([])
    for key in ("max_steps", "batch_size", "learning_rate", "kd_ratio", "teacher_vocab", "teacher_steps"):
        if getattr(args, key) != getattr(defaults, key):
            parts.append(f"--{key} {getattr(args, key)}")
    return " ".join(parts)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_steps", type=int, default=1500)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--kd_ratio", type=float, default=0.5)
    parser.add_argument("--teacher_vocab", type=int, default=128)
    parser.add_argument("--teacher_steps", type=int, default=5000)
    parser.add_argument("--work_dir", default="/tmp/llmkd_cross_tokenizer_study")
    parser.add_argument("--results", default=None, help="JSON lines of every run (default: WORK_DIR/results.jsonl); "
                        "runs already there are not rerun.")
    parser.add_argument("--teacher_only", action="store_true", help="Train (or load) the teacher and stop.")
    parser.add_argument("--table_only", action="store_true", help="Train nothing: the table of the recorded runs.")
    parser.add_argument("--write", action="store_true", help="Write the table into docs/CROSS_TOKENIZER.md.")
    return parser.parse_args(argv)


def append(path: str, row: dict, results: list[dict]) -> None:
    results.append(row)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    results_path = args.results or os.path.join(args.work_dir, "results.jsonl")
    results = [json.loads(line) for line in open(results_path)] if os.path.exists(results_path) else []
    if not args.table_only:
        tokenizers = {"student": make_tokenizer(), "teacher": teacher_tokenizer(args.teacher_vocab)}
        teacher = the_teacher(tokenizers["teacher"], args)
        held_out = make_split("held_out", 500, seed=0)
        if args.teacher_only:
            return
        if not any(r["method"] == "teacher" for r in results):
            append(results_path, {"method": "teacher", "seed": 0, "vocab": len(tokenizers["teacher"]),
                                  "exact_match": exact_match(teacher, tokenizers["teacher"], held_out),
                                  "bits_per_byte": bits_per_byte(teacher, tokenizers["teacher"], held_out)}, results)
            append(results_path, {"method": "alignment", "seed": 0,
                                  "alignment": alignment_summary(tokenizers, held_out)}, results)
        done = {(r["method"], r["seed"]) for r in results}
        for seed in args.seeds:
            rows = make_split("train", 1000, seed=seed, label_noise=0.3)
            for method in args.methods:
                if (method, seed) in done:
                    continue
                start = time.time()
                student = train_student(method, seed, teacher, tokenizers, rows, args)
                tokenizer = tokenizers[METHODS[method][0]]
                row = {"method": method, "seed": seed, "seconds": time.time() - start,
                       "exact_match": exact_match(student, tokenizer, held_out),
                       "bits_per_byte": bits_per_byte(student, tokenizer, held_out)}
                print(f"[study] {json.dumps(row)}", flush=True)
                append(results_path, row, results)
    lines = summarise(results, args)
    print("\n".join(lines))
    if args.write:
        write_section(DOC, "cross_tokenizer_study", lines)


if __name__ == "__main__":
    main()
