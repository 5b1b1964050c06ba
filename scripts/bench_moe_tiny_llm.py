"""The offline LLaVA-MoD pipeline on text (recipes/moe/tiny-llm-*.yaml), end to end, per seed: d2d -> d2s -> preference.

After each stage it measures, on the quickstart's held-out additions (operand pairs never trained on):
- exact match of the greedy answer;
- preference accuracy: the share of held-out pairs (right sum vs the same sum with one wrong digit) where the model
  gives the right answer the higher log-probability;
- the mean log-prob margin (right - wrong), the quantity the preference stage pushes beyond the teacher's.

    OMP_NUM_THREADS=1 python scripts/bench_moe_tiny_llm.py --seeds 0 1 2 [--output results.json]

Each stage runs the recipe's own settings (in process, through the same config parser as ``llmkd train``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmkd.methods import method_entry
from llmkd.quickstart.evaluate import exact_match
from llmkd.quickstart.task import _with_a_wrong_digit, make_split
from llmkd.recipes import load_config

STAGES = ("d2d", "d2s", "preference")
TEACHER = "llmkd/assets/quickstart/teacher"


@torch.no_grad()
def answer_logprob(model, tokenizer, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """Sum of log p(answer tokens + </s> | prompt), shape (n,); sequences built and right-padded by hand."""
    sequences, answer_spans = [], []
    for prompt, answer in zip(prompts, answers):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + answer_ids)
        answer_spans.append((len(prompt_ids), len(prompt_ids) + len(answer_ids)))
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    answer_mask = torch.zeros_like(ids)
    for i, (seq, (start, end)) in enumerate(zip(sequences, answer_spans)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        answer_mask[i, start:end] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (logps * answer_mask[:, 1:]).sum(1)


def measure(model, tokenizer, held_out: list[dict], wrong: list[str]) -> dict[str, float]:
    prompts = [row["prompt"] for row in held_out]
    right = answer_logprob(model, tokenizer, prompts, [row["completion"] for row in held_out])
    bad = answer_logprob(model, tokenizer, prompts, wrong)
    return {"exact_match": exact_match(model, tokenizer, held_out),
            "preference_accuracy": float((right > bad).float().mean()),
            "margin": float((right - bad).mean())}


def run_stage(stage: str, seed: int, previous: str | None, out: str) -> str:
    overrides = ["--seed", str(seed), "--output_dir", out, "--report_to", "none", "--disable_tqdm", "true"]
    if previous is not None:
        overrides += ["--model_name_or_path", previous]
    method, config = load_config(f"recipes/moe/tiny-llm-{stage}.yaml", overrides)
    if hasattr(config, "report"):
        config.report = False
    trainer = method_entry(method).trainer_class(args=config)
    trainer.train()
    trainer.save_model(out)
    trainer.processing_class.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    held_out = make_split("held_out", 200, seed=0)
    rng = random.Random("held-out-wrong")
    wrong = [_with_a_wrong_digit(row["completion"], rng) for row in held_out]
    tokenizer = AutoTokenizer.from_pretrained(TEACHER)
    results = {"teacher": measure(AutoModelForCausalLM.from_pretrained(TEACHER), tokenizer, held_out, wrong),
               "seeds": {}}
    work = tempfile.mkdtemp(prefix="llmkd_moe_bench_")
    for seed in args.seeds:
        previous, per_stage = None, {}
        for stage in STAGES:
            start = time.perf_counter()
            previous = run_stage(stage, seed, previous, os.path.join(work, f"seed{seed}-{stage}"))
            model = AutoModelForCausalLM.from_pretrained(previous)
            per_stage[stage] = measure(model, tokenizer, held_out, wrong)
            per_stage[stage]["seconds"] = round(time.perf_counter() - start, 1)
            per_stage[stage]["model"] = type(model).__name__
            print(seed, stage, per_stage[stage], flush=True)
        results["seeds"][str(seed)] = per_stage
    print("\n| model | exact match | preference accuracy | margin (nats) |\n|---|---|---|---|")
    t = results["teacher"]
    print(f"| teacher | {t['exact_match']:.3f} | {t['preference_accuracy']:.3f} | {t['margin']:.2f} |")
    for stage in STAGES:
        rows = [results["seeds"][str(s)][stage] for s in args.seeds]
        cells = [" / ".join(f"{r[key]:.3f}" if key != "margin" else f"{r[key]:.2f}" for r in rows)
                 for key in ("exact_match", "preference_accuracy", "margin")]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
