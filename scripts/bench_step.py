"""Time and peak memory of one distillation step, per trainer, against the floor and TRL's GKDTrainer (issue 9).

    OMP_NUM_THREADS=2 python scripts/bench_step.py --config ci --write       # small, ~2 minutes
    OMP_NUM_THREADS=2 python scripts/bench_step.py --config anchor --write   # vocab 64k, batch 4, seq 512
    OMP_NUM_THREADS=2 python scripts/bench_step.py --config qwen --write     # vocab 152k, seq 1024
    OMP_NUM_THREADS=2 python scripts/bench_step.py --config qwen --sweep --write   # seq 256..2048, batch 1
    python scripts/bench_step.py --config anchor --modes floor kd --profile  # a subset, with profiles

``--write`` replaces this configuration's section of BENCHMARKS.md (between its markers) with the tables, the
machine and the exact command; ``--output`` also keeps the raw numbers as JSON.

Every mode runs in a fresh process with the same models (tiny Llama student 2 x 256, teacher 4 x 512, random
weights, seeded), the same token rows and the same settings (AdamW, no gradient clipping, fp32):

- ``floor``: the work no method can avoid: the teacher's forward including its output head (logits computed, then
  dropped), the student's forward + backward with a plain cross-entropy on the same tokens, the optimizer step.
  Every mode trains on the same positions: all of them (``--trained all``, default: the floor's plain forward
  computes logits at every position, so nobody saves work the floor does not), or the second half of each row
  (``--trained completion``; the first half is the prompt), where llmkd's chunked engine projects only the
  trained positions while plain forwards compute logits everywhere;
- ``gkd``: TRL's ``GKDTrainer`` in its off-policy forward-KL setting (``lmbda=0``, ``beta=0``);
- ``kd``: llmkd ``DistillTrainer`` (forward KL, kd_ratio 0.5); ``taid``: ``TAIDTrainer``; ``sinkd``:
  ``SinKDTrainer`` (LM, batch mode, blocks of 512 tokens) with the Sinkhorn cost on the teacher's top-64 tokens of
  each block plus a tail bucket (``sinkhorn_top_k: 64``); ``sinkd_full``: the same with the exact
  full-vocabulary cost (``n x n x V`` work per block); ``cache``: ``DistillTrainer`` from a top-64 teacher cache
  written first (the writing is not timed); ``cross_uld`` / ``cross_hybrid`` / ``cross_span``: ``DistillTrainer``
  with a teacher of another tokenizer (``cross_tokenizer_loss``, docs/CROSS_TOKENIZER.md) on the same text: the
  teacher's tokenizer has the same words under shuffled ids, so every token is a 1:1 span and every word is in the
  shared vocabulary, the most work per token these losses do (both full vocabularies at every position; the
  hybrid's divergence on all of them). The alignment is computed in dataset preparation, not timed.

Reported per mode: the median seconds per step over ``--steps`` steps after ``--warmup`` warm-up steps, the peak
resident memory of the process (``ru_maxrss``), the resident memory once models and data are built (before the
first step), and the ratios to ``floor`` and to ``gkd``. With ``--profile``, one step after the warm-up runs under
``torch.profiler`` and the operators with the most self CPU time are reported. Absolute numbers depend on the
machine; the ratios, taken in one invocation, are the result.
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

CONFIGS = {
    "ci": dict(vocab=8000, batch=2, seq=128),
    "anchor": dict(vocab=64000, batch=4, seq=512),
    "qwen": dict(vocab=152000, batch=4, seq=1024),
}
MODES = ("floor", "gkd", "kd", "taid", "sinkd", "sinkd_full", "cache", "cross_uld", "cross_hybrid", "cross_span")
CROSS_MODES = ("cross_uld", "cross_hybrid", "cross_span")
DEFAULT_MODES = ("floor", "gkd", "kd", "taid", "sinkd", "cache")
SWEEP_SEQS = (256, 512, 1024, 2048)
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # special tokens must not be prefixes of words ("t1" would split "t123": added tokens match inside words)
    words = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
                          "{% if add_generation_prompt %} {% endif %}")
    return fast


def _teacher_tokenizer(vocab: int):
    """The student tokenizer's words under shuffled ids (the same specials): another tokenizer of the same text."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = list(range(3, vocab))
    random.Random(0).shuffle(ids)
    words = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{f"t{i}": j for i, j in zip(range(3, vocab), ids)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def _models(vocab: int, seq: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(layers: int, hidden: int, seed: int):
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                             max_position_embeddings=seq + 8, tie_word_embeddings=False)
        return LlamaForCausalLM(config)

    return llama(2, 256, 1), llama(4, 512, 2)


def _rows(vocab: int, seq: int, count: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (seq,), generator=generator).tolist() for _ in range(count)]


class _StepProfiler:
    """``torch.profiler`` around one chosen step; ``top_ops`` summarises it (operators by self CPU time)."""

    def __init__(self, step: int | None):
        self.step = step
        self.profiler = None
        self.top_ops: list[dict] = []

    def begin(self, step: int) -> None:
        if step == self.step:
            import torch.profiler

            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def end(self, step: int, seconds: float) -> None:
        if step != self.step or self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        events = sorted(self.profiler.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total_us = seconds * 1e6
        self.top_ops = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count,
                         "share": e.self_cpu_time_total / total_us} for e in events[:8]]
        self.profiler = None


class _Timer:
    """A TrainerCallback timing every optimizer step (and profiling one)."""

    def __init__(self, profiler: _StepProfiler):
        self.times: list[float] = []
        self.profiler = profiler

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, *_, **__):
                timer.profiler.begin(len(timer.times))
                timer.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                timer.times.append(time.perf_counter() - timer.start)
                timer.profiler.end(len(timer.times) - 1, timer.times[-1])

        return Timer()


def _labels(args, row: list[int]) -> list[int]:
    """The trained positions of a row: all, or the second half (``--trained completion``)."""
    if args.trained == "all":
        return list(row)
    half = args.seq // 2
    return [-100] * half + row[half:]


def _floor(args, student, teacher, rows, profiler) -> list[float]:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    teacher.eval()
    times = []
    for step in range(args.total_steps):
        batch_rows = rows[step * args.batch:(step + 1) * args.batch]
        batch = torch.tensor(batch_rows)
        targets = torch.tensor([_labels(args, row) for row in batch_rows])[:, 1:]  # the same trained tokens
        profiler.begin(step)
        start = time.perf_counter()
        with torch.no_grad():
            teacher(input_ids=batch).logits  # computed, then dropped
        logits = student(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        profiler.end(step, times[-1])
    return times


def _common(args, output_dir: str) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=args.batch, max_steps=args.total_steps,
                learning_rate=1e-4, max_grad_norm=0.0, save_strategy="no", report_to="none", disable_tqdm=True,
                logging_steps=1000, dataloader_num_workers=0, seed=0)


def _gkd(args, student, teacher, rows, tokenizer, output_dir, profiler) -> list[float]:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    # GKD trains the assistant turn: with --trained all it is the whole row but a short prompt (its collator needs one)
    half = 8 if args.trained == "all" else args.seq // 2
    data = [{"messages": [{"role": "user", "content": " ".join(f"t{i}" for i in row[:half])},
                          {"role": "assistant", "content": " ".join(f"t{i}" for i in row[half:])}]}
            for row in rows]
    timer = _Timer(profiler)
    config = GKDConfig(**_common(args, output_dir), lmbda=0.0, beta=0.0, temperature=1.0, bf16=False,
                       gradient_checkpointing=False, max_length=args.seq + 8, disable_dropout=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(data),
                         processing_class=tokenizer, callbacks=[timer.callback()])
    trainer.train()
    return timer.times


def _llmkd(args, mode, student, teacher, rows, tokenizer, output_dir, profiler) -> list[float]:
    from datasets import Dataset

    from llmkd import DistillConfig, DistillTrainer, SinKDConfig, SinKDTrainer, TAIDConfig, TAIDTrainer

    data = Dataset.from_list([{"input_ids": row, "labels": _labels(args, row)} for row in rows])
    common = dict(_common(args, output_dir), max_length=args.seq, verify_logit_head=False, kd_ratio=0.5)
    timer = _Timer(profiler)
    if mode == "cache":
        from llmkd.cache import write_teacher_cache
        from llmkd.data import prepare_dataset

        cache_dir = os.path.join(output_dir, "cache")
        prepared = prepare_dataset(data, tokenizer, max_length=args.seq)
        write_teacher_cache(teacher, prepared, tokenizer, cache_dir, top_k=64, temperature=1.0,
                            shard_rows=len(rows), batch_size=args.batch, teacher_name="bench-teacher", progress=False)
        config = DistillConfig(**common, teacher_cache=cache_dir)
        trainer = DistillTrainer(model=student, args=config, train_dataset=data, processing_class=tokenizer,
                                 callbacks=[timer.callback()])
    elif mode in CROSS_MODES:
        config = DistillConfig(**common, cross_tokenizer_loss=mode.split("_", 1)[1])
        trainer = DistillTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                 processing_class=tokenizer, teacher_processing_class=_teacher_tokenizer(args.vocab),
                                 callbacks=[timer.callback()])
    else:
        config_class, trainer_class, extra = {
            "kd": (DistillConfig, DistillTrainer, {}), "taid": (TAIDConfig, TAIDTrainer, {}),
            "sinkd": (SinKDConfig, SinKDTrainer, {"sinkhorn_top_k": 64}),
            "sinkd_full": (SinKDConfig, SinKDTrainer, {}),
        }[mode]
        config = config_class(**common, **extra)
        trainer = trainer_class(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                processing_class=tokenizer, callbacks=[timer.callback()])
    trainer.train()
    return timer.times


def _rss_mb() -> float:
    """The resident memory of this process now, in MB."""
    with open("/proc/self/statm", encoding="utf-8") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(args) -> None:
    if args.memory_limit_gb:  # a mode that needs more fails with an out-of-memory error instead of the OOM killer
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import datasets  # noqa: F401 - every mode imports the same libraries, so that peak memory compares the steps
    import torch
    import trl  # noqa: F401

    import llmkd  # noqa: F401

    torch.manual_seed(0)
    tokenizer = _tokenizer(args.vocab)
    student, teacher = _models(args.vocab, args.seq)
    rows = _rows(args.vocab, args.seq, args.batch * args.total_steps)
    output_dir = tempfile.mkdtemp(prefix=f"llmkd_bench_{args.mode}_")
    profiler = _StepProfiler(args.warmup + args.steps if args.profile else None)  # one extra step
    base_rss = _rss_mb()
    if args.mode == "floor":
        times = _floor(args, student, teacher, rows, profiler)
    elif args.mode == "gkd":
        times = _gkd(args, student, teacher, rows, tokenizer, output_dir, profiler)
    else:
        times = _llmkd(args, args.mode, student, teacher, rows, tokenizer, output_dir, profiler)
    measured = [t for i, t in enumerate(times[args.warmup:], args.warmup) if i != profiler.step] or times
    result = {"mode": args.mode, "sec_per_step": statistics.median(measured), "steps": len(measured),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "base_rss_mb": base_rss,
              "profile": profiler.top_ops}
    if args.mode in CROSS_MODES:  # the once-per-row alignment of dataset preparation, timed apart
        from llmkd.cross_tokenizer import RowAligner

        aligner = RowAligner(tokenizer, _teacher_tokenizer(args.vocab))
        started = time.perf_counter()
        for row in rows[:8]:
            aligner.align(row, _labels(args, row))
        result["align_ms_per_row"] = (time.perf_counter() - started) / min(len(rows), 8) * 1e3
    print(json.dumps(result))


def _run_mode(args, mode: str, seq: int) -> dict | None:
    command = [sys.executable, os.path.abspath(__file__), "--mode", mode, f"--seq={seq}"] + [
        f"--{k}={getattr(args, k)}" for k in ("config", "vocab", "batch", "steps", "warmup", "trained")]
    if args.profile:
        command.append("--profile")
    command.append(f"--memory_limit_gb={args.memory_limit_gb}")
    started = time.perf_counter()
    output = subprocess.run(command, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1"))
    if output.returncode != 0:
        print(f"{mode} (seq {seq}): FAILED\n{output.stderr[-3000:]}", file=sys.stderr)
        lines = [line for line in output.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1][:200] if lines else f"exit status {output.returncode}"
        if "memory" in output.stderr.lower():
            reason = f"out of memory under the {args.memory_limit_gb:g} GB limit ({reason})"
        return {"mode": mode, "failed": reason}
    result = json.loads(output.stdout.strip().splitlines()[-1])
    print(f"{mode} (seq {seq}): {result['sec_per_step']:.2f} s/step, {result['peak_rss_mb']:.0f} MB "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return result


MODE_NAMES = {
    "floor": "floor (teacher fwd with head, student CE fwd+bwd, AdamW)",
    "gkd": "TRL GKDTrainer (lmbda=0, beta=0)",
    "kd": "llmkd DistillTrainer, forward KL",
    "taid": "TAIDTrainer",
    "sinkd": "SinKDTrainer (LM, batch mode, cost on top-64 + tail)",
    "sinkd_full": "SinKDTrainer (LM, batch mode, full-vocabulary cost)",
    "cache": "DistillTrainer from a top-64 cache",
    "cross_uld": "DistillTrainer, teacher with another tokenizer, ULD (top-64)",
    "cross_hybrid": "DistillTrainer, teacher with another tokenizer, hybrid (forward KL + ULD)",
    "cross_span": "DistillTrainer, teacher with another tokenizer, span likelihood",
}


def _machine() -> str:
    import platform

    import torch

    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM; Python {platform.python_version()}, torch "
            f"{torch.__version__}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")


def _step_table(args, results: dict) -> list[str]:
    lines = [f"Configuration `{args.config}`: vocab {args.vocab}, batch {args.batch}, sequence {args.seq}, trained "
             f"positions: {args.trained}; median of {args.steps} steps after {args.warmup} warm-up.", "",
             "| mode | sec/step | peak RSS (MB) | time / floor | memory / floor | time / gkd | memory / gkd |",
             "|---|---|---|---|---|---|---|"]
    failed = {mode: row["failed"] for mode, row in results.items() if "failed" in row}
    results = {mode: row for mode, row in results.items() if "failed" not in row}
    for mode, row in results.items():
        cells = [f"{row['sec_per_step']:.2f}", f"{row['peak_rss_mb']:.0f}"]
        for base in ("floor", "gkd"):
            if base in results:
                cells += [f"{row['sec_per_step'] / results[base]['sec_per_step']:.2f}x",
                          f"{row['peak_rss_mb'] / results[base]['peak_rss_mb']:.2f}x"]
            else:
                cells += ["-", "-"]
        lines.append(f"| {MODE_NAMES[mode]} | " + " | ".join(cells) + " |")
    for mode, reason in failed.items():
        lines.append(f"| {MODE_NAMES[mode]} | failed: {reason} | | | | | |")
    aligned = {mode: row["align_ms_per_row"] for mode, row in results.items() if "align_ms_per_row" in row}
    if aligned:
        lines += ["", "Aligning one row for a teacher with another tokenizer (dataset preparation, once per row, not "
                      f"in the step): {statistics.median(aligned.values()):.0f} ms per row of {args.seq} tokens."]
    profiled = {mode: row["profile"] for mode, row in results.items() if row.get("profile")}
    if profiled:
        lines += ["", "Where one step's time goes (`torch.profiler`, self CPU time of the top operators, share of the "
                      "step's wall time):", "", "| mode | top operators |", "|---|---|"]
        for mode, ops in profiled.items():
            cells = ", ".join(f"`{op['op']}` {100 * op['share']:.0f}%" for op in ops[:6])
            lines.append(f"| {mode} | {cells} |")
    return lines


def _sweep_table(args, results: dict) -> list[str]:
    lines = [f"Vocab {args.vocab}, batch {args.batch}, trained positions: {args.trained}; peak RSS and the resident "
             f"memory once models and data are built (before the first step); `tokens x vocab` is the size of one "
             "float32 logits tensor of the step.", "",
             "| sequence | tokens x vocab (MB) | " + " | ".join(
                 f"{mode} peak / step extra (MB)" for mode in args.modes) + " |",
             "|---|---|" + "---|" * len(args.modes)]
    for seq, by_mode in results.items():
        logits_mb = args.batch * int(seq) * args.vocab * 4 / 2**20
        cells = []
        for mode in args.modes:
            row = by_mode.get(mode)
            cells.append("failed" if row is None or "failed" in row else
                         f"{row['peak_rss_mb']:.0f} / {row['peak_rss_mb'] - row['base_rss_mb']:.0f}")
        lines.append(f"| {seq} | {logits_mb:.0f} | " + " | ".join(cells) + " |")
    return lines


def _command(args) -> str:
    parts = [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')}".rstrip("="), "python scripts/bench_step.py",
             f"--config {args.config}"]
    if args.sweep:
        parts.append("--sweep")
    if args.modes != list(DEFAULT_MODES if not args.sweep else ("floor", "kd")):
        parts.append("--modes " + " ".join(args.modes))
    for key, default in (("steps", 5), ("warmup", 1), ("trained", "all")):
        if getattr(args, key) != default:
            parts.append(f"--{key} {getattr(args, key)}")
    if args.sweep and args.seqs != list(SWEEP_SEQS):
        parts.append("--seqs " + " ".join(map(str, args.seqs)))
    for key in ("vocab", "batch", "seq"):
        if args.overrides.get(key) is not None:
            parts.append(f"--{key} {args.overrides[key]}")
    if args.profile:
        parts.append("--profile")
    if args.section:
        parts.append(f"--section {args.section}")
    return " ".join(p for p in parts if p) + " --write"


def write_section(path: str, name: str, body: list[str]) -> None:
    """Replace the lines between ``<!-- bench_step:NAME -->`` and ``<!-- /bench_step:NAME -->`` in ``path`` (append
    the section if the markers are absent)."""
    begin, end = f"<!-- bench_step:{name} -->", f"<!-- /bench_step:{name} -->"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
    block = "\n".join([begin, *body, end])
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="ci")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None)
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--trained", choices=("all", "completion"), default="all",
                        help="train every position (default) or the second half of each row")
    parser.add_argument("--profile", action="store_true", help="profile one step after the warm-up")
    parser.add_argument("--sweep", action="store_true",
                        help=f"peak memory over sequence lengths {SWEEP_SEQS} (batch 1 unless --batch)")
    parser.add_argument("--seqs", nargs="+", type=int, default=list(SWEEP_SEQS), help="sequence lengths of --sweep")
    parser.add_argument("--write", action="store_true", help="update this configuration's section of BENCHMARKS.md")
    parser.add_argument("--benchmarks", default=BENCHMARKS, help="the file --write updates (default: BENCHMARKS.md)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--memory_limit_gb", type=float, default=20.0,
                        help="address-space limit of each mode's process (0: none); a mode that needs more is "
                             "reported as out of memory")
    parser.add_argument("--section", default=None,
                        help="the BENCHMARKS.md section written (default: the configuration's, -sweep for a sweep)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    for key in ("vocab", "batch", "seq"):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"override the configuration's {key}")
    args = parser.parse_args()
    args.overrides = {key: getattr(args, key) for key in ("vocab", "batch", "seq")}
    if args.sweep and args.batch is None:
        args.batch = 1
    for key, value in CONFIGS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.total_steps = args.warmup + args.steps + (1 if args.profile else 0)
    if args.mode:
        _worker(args)
        return
    if args.modes is None:
        args.modes = ["floor", "kd"] if args.sweep else list(DEFAULT_MODES)
    if args.sweep:
        results = {seq: {mode: _run_mode(args, mode, seq) for mode in args.modes} for seq in args.seqs}
        lines = _sweep_table(args, results)
        section = args.section or f"{args.config}-sweep"
    else:
        results = {mode: _run_mode(args, mode, args.seq) for mode in args.modes}
        lines = _step_table(args, results)
        section = args.section or args.config
    print("\n".join(lines))
    if args.write:
        write_section(args.benchmarks, section, [f"`{_command(args)}`", "", f"Machine: {_machine()}.", "", *lines])
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"config": args.config, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
                       "trained": args.trained, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
