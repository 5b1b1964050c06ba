"""Step time of training from the teacher cache vs with the live teacher, same config, one invocation.

    OMP_NUM_THREADS=1 python scripts/bench_cache_training.py          # ~3 minutes on a CPU core

A tiny Llama student (2 x 256) and a larger teacher (``--teacher_layers`` x ``--teacher_hidden``, default 8 x 768:
the teacher's forward pass is what a cache saves), random weights, vocabulary 32000, batch 4 x 256 tokens of
random ids, forward KL through the chunked engine. The cache (k = ``--top_k``, 8-bit log-probabilities) is written
first (its write time is reported too); then the same student is trained for ``--steps`` steps online and from the
cache, alternating the two modes ``--repeats`` times. Reported: the median seconds per step (after each run's first
step) of each mode and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from tokenizers import Tokenizer, models

from llmkd import DistillConfig, DistillTrainer
from llmkd.cache import write_teacher_cache
from llmkd.data import prepare_dataset


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose tokens are "t0".."t{vocab-2}" plus <pad>: any id sequence round-trips."""
    words = {"<pad>": 0, **{f"t{i}": i + 1 for i in range(vocab - 1)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    from tokenizers import pre_tokenizers

    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>")


def llama(vocab: int, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--teacher_hidden", type=int, default=768)
    parser.add_argument("--teacher_layers", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    tokenizer = word_tokenizer(args.vocab)
    generator = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(f"t{i}" for i in torch.randint(0, args.vocab - 1, (args.seq,), generator=generator).tolist())}
            for _ in range(args.batch * args.steps)]
    dataset = Dataset.from_list(rows)
    student, teacher = llama(args.vocab, 256, 2, seed=1), llama(args.vocab, args.teacher_hidden, args.teacher_layers, 2)
    prepared = prepare_dataset(dataset, tokenizer, max_length=args.seq, completion_only_loss=False)
    folder = tempfile.mkdtemp(prefix="llmkd_bench_cache_")
    start = time.perf_counter()
    cache = write_teacher_cache(teacher.eval(), prepared, tokenizer, folder, top_k=args.top_k, temperature=1.0,
                                shard_rows=args.batch * 2, batch_size=args.batch, progress=False)
    write_seconds = time.perf_counter() - start
    tokens = int(cache.metadata["num_tokens"])
    print(f"cache: {tokens} tokens written in {write_seconds:.1f} s ({tokens / write_seconds:.0f} tokens/s), "
          f"k = {args.top_k}")

    medians = {"online": [], "cache": []}
    for _ in range(args.repeats):
        for mode in ("online", "cache"):
            timer = StepTimes()
            config = DistillConfig(
                output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, max_steps=args.steps,
                learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", disable_tqdm=True,
                max_length=args.seq, completion_only_loss=False, kd_ratio=1.0, verify_logit_head=False,
                teacher_cache=folder if mode == "cache" else None,
            )
            extra = {"teacher_model": teacher} if mode == "online" else {}
            trainer = DistillTrainer(model=copy.deepcopy(student), args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[timer], **extra)
            trainer.train()
            medians[mode].append(statistics.median(timer.times[1:]))
            print(f"{mode:6s}: median {medians[mode][-1]:.3f} s/step over steps 2..{args.steps}", flush=True)
    online, cached = statistics.median(medians["online"]), statistics.median(medians["cache"])
    print(f"\nonline {online:.3f} s/step, from the cache {cached:.3f} s/step: cache / online = {cached / online:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
