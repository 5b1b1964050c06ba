"""Seconds per on-policy step, split into generation / teacher / student, against llmkd's off-policy step on the
same tokens and TRL's DistillationTrainer (issue 19, item 7). The models and machine report of scripts/bench_step.py.

    OMP_NUM_THREADS=2 .venv-vllm/bin/python scripts/bench_on_policy.py --write   # all modes (vLLM needs .venv-vllm)
    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_on_policy.py --modes offpolicy llmkd_jsd trl_jsd

Every mode runs in a fresh process with the same models (bench_step's tiny Llama student 2 x 256 and teacher
4 x 512, vocab 8000, random weights, seeded), ``--batch`` prompts of ``--prompt`` tokens per step, fully on-policy
(every completion sampled by the student, ``--completion`` new tokens at most, temperature 1), fp32, AdamW:

- ``offpolicy``: llmkd ``DistillTrainer`` on dataset rows of prompt + completion tokens (the completion trained),
  forward KL: the step without generation, the baseline of the "everything but generation" ratio;
- ``llmkd_jsd`` / ``llmkd_rkl``: llmkd ``DistillTrainer`` with ``lmbda=1``, JSD (beta 0.5) / reverse KL, sampling
  with transformers ``generate``; ``llmkd_jsd_vllm``: the same with a colocated vLLM engine (``use_vllm``);
- ``trl_jsd`` / ``trl_rkl``: TRL's ``DistillationTrainer`` (always on-policy) with ``beta`` 0.5 / 1 (its generalized
  JSD; 1 is reverse KL) and transformers ``generate``; ``trl_jsd_vllm``: the same with its colocated vLLM.

Per mode: the median over ``--steps`` steps after ``--warmup`` (the first step starts llmkd's vLLM engine) of the wall
time between the ends of consecutive optimizer steps, split into *generation* (llmkd: ``get_batch_samples``, where
the step's completions are sampled and the engine synced; TRL: ``_generate``), *teacher* (the forward of the teacher's
transformer body and output head, timed by hooks; llmkd's chunked engine projects the teacher's hidden states inside
the loss, which is counted in *student*) and *student* (the rest: student forward, loss, backward, optimizer), and
the peak resident memory of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import BENCHMARKS, _machine, _models, _tokenizer, write_section  # noqa: E402

MODES = ("offpolicy", "llmkd_jsd", "llmkd_rkl", "llmkd_jsd_vllm", "trl_jsd", "trl_rkl", "trl_jsd_vllm")
MODE_NAMES = {
    "offpolicy": "llmkd off-policy (dataset completions, forward KL)",
    "llmkd_jsd": "llmkd on-policy, JSD 0.5, transformers generate",
    "llmkd_rkl": "llmkd on-policy, reverse KL, transformers generate",
    "llmkd_jsd_vllm": "llmkd on-policy, JSD 0.5, vLLM colocate",
    "trl_jsd": "TRL DistillationTrainer, beta 0.5, transformers generate",
    "trl_rkl": "TRL DistillationTrainer, beta 1 (reverse KL), transformers generate",
    "trl_jsd_vllm": "TRL DistillationTrainer, beta 0.5, vLLM colocate",
}


DEFAULTS = {"vocab": 8000, "batch": 4, "prompt": 64, "completion": 64, "steps": 4, "warmup": 1}


class Clock:
    """Step boundaries and the time spent in generation and in the teacher, per optimizer step."""

    def __init__(self):
        self.ends, self.generation, self.teacher = [], [0.0], [0.0]

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class StepClock(TrainerCallback):
            def on_train_begin(self, *_, **__):
                clock.ends.append(time.perf_counter())

            def on_step_end(self, *_, **__):
                clock.ends.append(time.perf_counter())
                clock.generation.append(0.0)
                clock.teacher.append(0.0)

        return StepClock()

    def timed(self, function, bucket: str):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                getattr(self, bucket)[-1] += time.perf_counter() - start
        return wrapper

    def hook_teacher(self, teacher) -> None:
        for module in (teacher.model, teacher.lm_head):
            module.register_forward_pre_hook(lambda *_: setattr(self, "_teacher_start", time.perf_counter()))
            module.register_forward_hook(
                lambda *_: self.teacher.__setitem__(-1, self.teacher[-1] + time.perf_counter() - self._teacher_start))

    def steps(self) -> list[dict]:
        out = []
        for i in range(1, len(self.ends)):
            total = self.ends[i] - self.ends[i - 1]
            out.append({"total": total, "generation": self.generation[i - 1], "teacher": self.teacher[i - 1],
                        "student": total - self.generation[i - 1] - self.teacher[i - 1]})
        return out


def _prompts(args) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(3)
    count = args.batch * (args.warmup + args.steps)
    return [torch.randint(3, args.vocab, (args.prompt + args.completion,), generator=generator).tolist()
            for _ in range(count)]


def _common(args, output_dir: str) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                learning_rate=1e-4, max_grad_norm=0.0, save_strategy="no", report_to="none", disable_tqdm=True,
                logging_steps=1000, dataloader_num_workers=0, seed=0, temperature=1.0, use_cpu=True)


def _llmkd(args, student, teacher, tokenizer, output_dir, clock):
    from datasets import Dataset

    from llmkd import DistillConfig, DistillTrainer

    rows = _prompts(args)
    text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731 - the bench tokenizer maps "tN" to id N
    data = Dataset.from_list([{"prompt": text(row[: args.prompt]), "completion": " " + text(row[args.prompt:])}
                              for row in rows])
    fields = {"offpolicy": {"divergence": "fkl"},
              "llmkd_jsd": {"divergence": "jsd", "jsd_beta": 0.5, "lmbda": 1.0},
              "llmkd_rkl": {"divergence": "rkl", "lmbda": 1.0},
              "llmkd_jsd_vllm": {"divergence": "jsd", "jsd_beta": 0.5, "lmbda": 1.0, "use_vllm": True,
                                 "vllm_max_model_length": args.prompt + args.completion + 8}}[args.mode]
    config = DistillConfig(**_common(args, output_dir), kd_ratio=1.0, verify_logit_head=False,
                           max_completion_length=args.completion, max_length=args.prompt + args.completion + 8,
                           **fields)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                             processing_class=tokenizer, callbacks=[clock.callback()])
    trainer.get_batch_samples = clock.timed(trainer.get_batch_samples, "generation")
    return trainer


def _trl(args, student, teacher, tokenizer, output_dir, clock):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    rows = _prompts(args)
    data = Dataset.from_list([{"prompt": " ".join(f"t{i}" for i in row[: args.prompt])} for row in rows])
    vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": args.prompt + args.completion + 8,
            } if args.mode.endswith("_vllm") else {}
    config = DistillationConfig(**_common(args, output_dir), beta=1.0 if args.mode == "trl_rkl" else 0.5,
                                max_completion_length=args.completion, bf16=False, gradient_checkpointing=False,
                                **vllm)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                  processing_class=tokenizer, callbacks=[clock.callback()])
    trainer._generate = clock.timed(trainer._generate, "generation")
    return trainer


def _worker(args) -> None:
    import torch

    torch.manual_seed(0)
    tokenizer = _tokenizer(args.vocab)
    student, teacher = _models(args.vocab, args.prompt + args.completion + 8)
    output_dir = tempfile.mkdtemp(prefix=f"llmkd_bench_on_policy_{args.mode}_")
    if args.mode.endswith("_vllm"):  # vLLM reads the student from a folder (TRL) or its config (llmkd)
        student.save_pretrained(output_dir + "/student")
        tokenizer.save_pretrained(output_dir + "/student")
        student.name_or_path = output_dir + "/student"
    clock = Clock()
    clock.hook_teacher(teacher)
    build = _trl if args.mode.startswith("trl") else _llmkd
    trainer = build(args, student, teacher, tokenizer, output_dir, clock)
    trainer.train()
    steps = clock.steps()[args.warmup:]
    print(json.dumps({"mode": args.mode, **{key: statistics.median(s[key] for s in steps)
                                            for key in ("total", "generation", "teacher", "student")},
                      "steps": len(steps), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch_threads": torch.get_num_threads()}))


def _run_mode(args, mode: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--mode", mode] + [
        f"--{k}={getattr(args, k)}" for k in ("vocab", "batch", "prompt", "completion", "steps", "warmup")]
    started = time.perf_counter()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", VLLM_CPU_KVCACHE_SPACE="1")
    output = subprocess.run(command, capture_output=True, text=True, env=env)
    if output.returncode != 0:
        print(f"{mode}: FAILED\n{output.stderr[-3000:]}", file=sys.stderr)
        lines = [line for line in output.stderr.strip().splitlines() if line.strip()]
        return {"mode": mode, "failed": (lines[-1][:240] if lines else f"exit status {output.returncode}")}
    result = json.loads(output.stdout.strip().splitlines()[-1])
    print(f"{mode}: {result['total']:.2f} s/step ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return result


def _table(args, results: dict) -> list[str]:
    lines = [f"Student 2 x 256, teacher 4 x 512, vocab {args.vocab}; {args.batch} prompts of {args.prompt} tokens per "
             f"step, up to {args.completion} sampled tokens each, fully on-policy; median of {args.steps} steps after "
             f"{args.warmup} warm-up. \"w/o generation\": teacher + student seconds, and their ratio to the "
             "off-policy step (the same number of tokens, no generation).", "",
             "| mode | s/step | generation | teacher | student | w/o generation | vs off-policy | vs TRL same backend "
             "| peak RSS (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    base = results.get("offpolicy", {})
    twins = {"llmkd_jsd": "trl_jsd", "llmkd_rkl": "trl_rkl", "llmkd_jsd_vllm": "trl_jsd_vllm"}
    for mode, row in results.items():
        if "failed" in row:
            lines.append(f"| {MODE_NAMES[mode]} | failed: {row['failed']} | | | | | | | |")
            continue
        without = row["teacher"] + row["student"]
        ratio = f"{without / (base['teacher'] + base['student']):.2f}x" if "total" in base else "-"
        twin = results.get(twins.get(mode, ""), {})
        versus = f"{row['total'] / twin['total']:.2f}x" if "total" in twin else "-"
        lines.append(f"| {MODE_NAMES[mode]} | {row['total']:.2f} | {row['generation']:.2f} | {row['teacher']:.2f} | "
                     f"{row['student']:.2f} | {without:.2f} | {ratio} | {versus} | {row['peak_rss_mb']:.0f} |")
    if "total" in results.get("llmkd_jsd", {}) and "total" in results.get("llmkd_jsd_vllm", {}):
        speedup = results["llmkd_jsd"]["generation"] / results["llmkd_jsd_vllm"]["generation"]
        lines += ["", f"vLLM colocate vs transformers generate, llmkd's generation time per step: {speedup:.2f}x "
                      "faster."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # the worker
    parser.add_argument("--vocab", type=int, default=DEFAULTS["vocab"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--prompt", type=int, default=DEFAULTS["prompt"])
    parser.add_argument("--completion", type=int, default=DEFAULTS["completion"])
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    parser.add_argument("--write", action="store_true", help="Replace the on_policy section of BENCHMARKS.md.")
    args = parser.parse_args()
    if args.mode:
        _worker(args)
        return
    results = {mode: _run_mode(args, mode) for mode in args.modes}
    lines = _table(args, results)
    command = (f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {os.path.relpath(sys.executable)} "
               f"scripts/bench_on_policy.py" + ("" if args.modes == list(MODES) else " --modes " + " ".join(args.modes))
               + "".join(f" --{key} {getattr(args, key)}" for key, default in DEFAULTS.items()
                         if getattr(args, key) != default) + " --write")
    body = [f"Measured {time.strftime('%Y-%m-%d')} on {_machine()} by `{command}`.", "", *lines]
    print("\n".join(body))
    if args.write:
        write_section(BENCHMARKS, "on_policy", body)


if __name__ == "__main__":
    main()
