"""Time and peak memory of one distillation step, per trainer, against the floor and TRL's GKDTrainer (issue 9).

    OMP_NUM_THREADS=2 python scripts/bench_step.py --config ci        # small, ~2 minutes
    OMP_NUM_THREADS=2 python scripts/bench_step.py --config anchor    # vocab 64k, batch 4, seq 512
    OMP_NUM_THREADS=2 python scripts/bench_step.py --config qwen      # vocab 152k, seq 1024
    python scripts/bench_step.py --config anchor --modes floor kd     # a subset

Every mode runs in a fresh process with the same models (tiny Llama student 2 x 256, teacher 4 x 512, random
weights, seeded), the same token rows and the same settings (AdamW, no gradient clipping, fp32):

- ``floor``: the work no method can avoid: the teacher's forward including its output head (logits computed, then
  dropped), the student's forward + backward with a plain cross-entropy on the same tokens, the optimizer step.
  Every mode trains on the second half of each row (the "completion"; the first half is the prompt), as
  completion-only distillation does; plain forwards compute logits at every position, llmkd's chunked engine only
  at the trained ones;
- ``gkd``: TRL's ``GKDTrainer`` in its off-policy forward-KL setting (``lmbda=0``, ``beta=0``);
- ``kd``: llmkd ``DistillTrainer`` (forward KL, kd_ratio 0.5); ``taid``: ``TAIDTrainer``; ``sinkd``:
  ``SinKDTrainer`` (LM, batch mode); ``cache``: ``DistillTrainer`` from a top-64 teacher cache written first
  (the writing is not timed).

Reported per mode: the median seconds per step over ``--steps`` steps after ``--warmup`` warm-up steps, the peak
resident memory of the process (``ru_maxrss``), and the ratios to ``floor`` and to ``gkd``. Absolute numbers depend
on the machine; the ratios, taken in one invocation, are the result.
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
MODES = ("floor", "gkd", "kd", "taid", "sinkd", "cache")


def _tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", unk_token="t1", eos_token="t2")
    fast.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
                          "{% if add_generation_prompt %} {% endif %}")
    return fast


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


class _Timer:
    """A TrainerCallback timing every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def callback(self):
        from transformers import TrainerCallback

        timer = self

        class Timer(TrainerCallback):
            def on_step_begin(self, *_, **__):
                timer.start = time.perf_counter()

            def on_step_end(self, *_, **__):
                timer.times.append(time.perf_counter() - timer.start)

        return Timer()


def _floor(args, student, teacher, rows) -> list[float]:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    teacher.eval()
    half = args.seq // 2
    times = []
    for step in range(args.warmup + args.steps):
        batch = torch.tensor(rows[step * args.batch:(step + 1) * args.batch])
        start = time.perf_counter()
        with torch.no_grad():
            teacher(input_ids=batch).logits  # computed, then dropped
        logits = student(input_ids=batch).logits
        targets = batch[:, 1:].clone()
        targets[:, : half - 1] = -100  # the same trained tokens as the other modes: the second half
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def _common(args, output_dir: str) -> dict:
    return dict(output_dir=output_dir, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
                learning_rate=1e-4, max_grad_norm=0.0, save_strategy="no", report_to="none", disable_tqdm=True,
                logging_steps=1000, dataloader_num_workers=0, seed=0)


def _gkd(args, student, teacher, rows, tokenizer, output_dir) -> list[float]:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    half = args.seq // 2
    data = [{"messages": [{"role": "user", "content": " ".join(f"t{i}" for i in row[:half])},
                          {"role": "assistant", "content": " ".join(f"t{i}" for i in row[half:])}]}
            for row in rows]
    timer = _Timer()
    config = GKDConfig(**_common(args, output_dir), lmbda=0.0, beta=0.0, temperature=1.0, bf16=False,
                       gradient_checkpointing=False, max_length=args.seq + 8, disable_dropout=True)
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(data),
                         processing_class=tokenizer, callbacks=[timer.callback()])
    trainer.train()
    return timer.times


def _llmkd(args, mode, student, teacher, rows, tokenizer, output_dir) -> list[float]:
    from datasets import Dataset

    from llmkd import DistillConfig, DistillTrainer, SinKDConfig, SinKDTrainer, TAIDConfig, TAIDTrainer

    half = args.seq // 2
    data = Dataset.from_list([{"input_ids": row, "labels": [-100] * half + row[half:]} for row in rows])
    common = dict(_common(args, output_dir), max_length=args.seq, verify_logit_head=False, kd_ratio=0.5)
    timer = _Timer()
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
    else:
        config_class, trainer_class = {"kd": (DistillConfig, DistillTrainer), "taid": (TAIDConfig, TAIDTrainer),
                                       "sinkd": (SinKDConfig, SinKDTrainer)}[mode]
        config = config_class(**common)
        trainer = trainer_class(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                processing_class=tokenizer, callbacks=[timer.callback()])
    trainer.train()
    return timer.times


def _worker(args) -> None:
    import datasets  # noqa: F401 - every mode imports the same libraries, so that peak memory compares the steps
    import torch
    import trl  # noqa: F401

    import llmkd  # noqa: F401

    torch.manual_seed(0)
    tokenizer = _tokenizer(args.vocab)
    student, teacher = _models(args.vocab, args.seq)
    rows = _rows(args.vocab, args.seq, args.batch * (args.warmup + args.steps))
    output_dir = tempfile.mkdtemp(prefix=f"llmkd_bench_{args.mode}_")
    if args.mode == "floor":
        times = _floor(args, student, teacher, rows)
    elif args.mode == "gkd":
        times = _gkd(args, student, teacher, rows, tokenizer, output_dir)
    else:
        times = _llmkd(args, args.mode, student, teacher, rows, tokenizer, output_dir)
    measured = times[args.warmup:] or times
    print(json.dumps({"mode": args.mode, "sec_per_step": statistics.median(measured), "steps": len(measured),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="ci")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=5, help="measured steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    for key in ("vocab", "batch", "seq"):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"override the configuration's {key}")
    args = parser.parse_args()
    for key, value in CONFIGS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.mode:
        _worker(args)
        return
    results = {}
    for mode in args.modes:
        command = [sys.executable, __file__, "--mode", mode] + [
            f"--{k}={getattr(args, k)}" for k in ("config", "vocab", "batch", "seq", "steps", "warmup")]
        started = time.perf_counter()
        output = subprocess.run(command, capture_output=True, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1"))
        if output.returncode != 0:
            print(f"{mode}: FAILED\n{output.stderr[-3000:]}", file=sys.stderr)
            continue
        results[mode] = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{mode}: {results[mode]['sec_per_step']:.2f} s/step, {results[mode]['peak_rss_mb']:.0f} MB "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print(f"config {args.config}: vocab {args.vocab}, batch {args.batch}, sequence {args.seq}; median of "
          f"{args.steps} steps after {args.warmup} warm-up; torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| mode | sec/step | peak RSS (MB) | time / floor | memory / floor | time / gkd | memory / gkd |")
    print("|---|---|---|---|---|---|---|")
    for mode, row in results.items():
        cells = [f"{row['sec_per_step']:.2f}", f"{row['peak_rss_mb']:.0f}"]
        for base in ("floor", "gkd"):
            if base in results:
                cells += [f"{row['sec_per_step'] / results[base]['sec_per_step']:.2f}x",
                          f"{row['peak_rss_mb'] / results[base]['peak_rss_mb']:.2f}x"]
            else:
                cells += ["-", "-"]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump({"config": args.config, "vocab": args.vocab, "batch": args.batch, "seq": args.seq,
                       "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
