"""Peak memory and time of one DistillTrainer step: chunked engine vs dense logits, each mode in a fresh process.

    python scripts/bench_memory.py                       # the anchor: vocab 64k, batch 4, sequence 512
    python scripts/bench_memory.py --vocab 32000 --seq 256 --steps 3

Models: a tiny Llama student (2 layers x 256) and teacher (4 layers x 512), random weights, forward KL with
kd_ratio 0.5. Reports the peak resident memory (ru_maxrss) of each process and the median seconds per step after
the first, and the ratio dense / chunked. The ratios are the result; absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _worker(args) -> None:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

    from llmkd import DistillConfig, DistillTrainer

    torch.manual_seed(0)
    vocab = {f"t{i}": i for i in range(args.vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                        pad_token="t0", unk_token="t1", eos_token="t2")

    def llama(layers, hidden):
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=2,
                             max_position_embeddings=args.seq, tie_word_embeddings=False)
        return LlamaForCausalLM(config)

    student, teacher = llama(2, 256), llama(4, 512)
    generator = torch.Generator().manual_seed(1)
    rows = [{"input_ids": torch.randint(3, args.vocab, (args.seq,), generator=generator).tolist()}
            for _ in range(args.batch * (args.steps + 1))]
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    config = DistillConfig(
        output_dir="/tmp/llmkd_bench_memory", per_device_train_batch_size=args.batch, max_steps=args.steps,
        use_chunked_loss=args.mode == "chunked", loss_chunk_size=args.chunk, kd_ratio=0.5, save_strategy="no",
        report_to="none", disable_tqdm=True, logging_steps=1000, max_length=args.seq, dataloader_num_workers=0,
        verify_logit_head=False,
    )
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=config, train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.mode, "peak_rss_mb": peak_mb,
                      "sec_per_step": statistics.median(times[1:] if len(times) > 1 else times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=64000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1,
                        help="Run the (chunked, dense) pair this many times, alternating, and report medians.")
    parser.add_argument("--mode", choices=["chunked", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        _worker(args)
        return
    runs: dict[str, list[dict]] = {"chunked": [], "dense": []}
    for _ in range(args.repeats):
        for mode in runs:
            command = [sys.executable, __file__, "--mode", mode] + [
                f"--{k}={getattr(args, k)}" for k in ("vocab", "batch", "seq", "steps", "chunk")]
            output = subprocess.run(command, capture_output=True, text=True,
                                    env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if output.returncode != 0:
                raise SystemExit(f"{mode} run failed:\n{output.stderr[-4000:]}")
            runs[mode].append(json.loads(output.stdout.strip().splitlines()[-1]))
    results = {mode: {key: statistics.median(r[key] for r in rows) for key in ("peak_rss_mb", "sec_per_step")}
               for mode, rows in runs.items()}
    print(f"vocab {args.vocab}, batch {args.batch}, sequence {args.seq}, chunk {args.chunk}, {args.steps} steps, "
          f"{args.repeats} alternating repeat(s), torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':<8} {'peak RSS (MB)':>14} {'sec/step':>9}")
    for mode, row in results.items():
        print(f"{mode:<8} {row['peak_rss_mb']:>14.0f} {row['sec_per_step']:>9.2f}")
    print(f"dense / chunked: memory {results['dense']['peak_rss_mb'] / results['chunked']['peak_rss_mb']:.2f}x, "
          f"time {results['dense']['sec_per_step'] / results['chunked']['sec_per_step']:.2f}x")


if __name__ == "__main__":
    main()
