"""Teacher-cache measurements: on-disk bytes per token and encoding error, and write throughput.

    python scripts/bench_cache.py sizes           # V = 32000 and 151665, k = 8/32/64, 8/6/32-bit log-probs (~2 min)
    python scripts/bench_cache.py throughput      # a 4 x 512 Llama teacher, V = 32000, 32 rows x 512 tokens (~1 min)

``sizes`` writes real caches (write_teacher_cache, one shard) of a 2 x 64 Llama teacher built from a config whose
head is scaled to a mean per-token entropy of 2.5 nats (a confident LM; a fresh head is almost uniform) over random
token rows, then compares every decoded log-probability with the float64 log-softmax of the same logits. It prints
a Markdown table: payload and on-disk bytes per token, and the largest errors.

``throughput`` times, on the same rows: the teacher's forward alone, the cache machinery alone (top-k in float32 +
encoding, on precomputed logits), and a whole write_teacher_cache run (forward, top-k, encoding, shard writes).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmkd.cache import TeacherCache, TokenEncoding, teacher_topk, write_teacher_cache


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer with exactly ``vocab`` tokens (t0 is the pad token); only its size and ids matter here."""
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", unk_token="t1")


def teacher_model(vocab: int, hidden: int, layers: int, seed: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(4, hidden // 64), num_key_value_heads=max(2, hidden // 128),
                         max_position_embeddings=1024, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def scale_head_to_entropy(model, rows: torch.Tensor, target: float) -> float:
    """Multiply the head so the mean per-token entropy on ``rows`` is about ``target`` nats; return the factor."""
    with torch.no_grad():
        logits = model(rows[:2, :128]).logits.reshape(-1, model.config.vocab_size).float()

        def entropy(factor):
            log_p = torch.log_softmax(logits * factor, -1)
            return float(-(log_p.exp() * log_p).sum(-1).mean())

        low, high = 1e-2, 1e3
        for _ in range(50):
            mid = (low * high) ** 0.5
            low, high = (mid, high) if entropy(mid) > target else (low, mid)
        model.lm_head.weight.mul_(low)
    return low


def random_rows(vocab: int, rows: int, length: int, seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * rows, "labels": ids})


def reference_logprobs(model, dataset: Dataset, row: int) -> torch.Tensor:
    """The float64 log-softmax ``(length - 1, V)`` of the teacher's logits on one row (every position is valid)."""
    with torch.no_grad():
        logits = model(torch.tensor([dataset[row]["input_ids"]])).logits[0, :-1]
    return torch.log_softmax(logits.double(), -1)


def sizes(args) -> None:
    print("| V | k | log-prob code | payload B/token | on-disk B/token (shards) | on-disk B/token (all files) | "
          "max abs error log p (p >= 0.01) | max abs error log p (all top-k) | max abs error p | max abs error tail |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for vocab in args.vocabs:
        tokenizer = word_tokenizer(vocab)
        model = teacher_model(vocab, 64, 2)
        dataset = random_rows(vocab, args.rows, args.length)
        scale_head_to_entropy(model, torch.tensor(dataset["input_ids"]), args.entropy)
        for k in args.ks:
            for bits in args.bits:
                folder = Path(tempfile.mkdtemp(prefix="llmkd_cache_bench_"))
                cache = write_teacher_cache(model, dataset, tokenizer, folder / "c", top_k=k, temperature=1.0,
                                            shard_rows=1024, batch_size=4, logprob_bits=bits, progress=False)
                shard_bytes = sum((cache.path / s["file"]).stat().st_size for s in cache.metadata["shards"])
                all_bytes = sum(p.stat().st_size for p in cache.path.iterdir())
                errors = measure_errors(cache, model, dataset, k)
                name = "float32" if bits == 32 else f"{bits}-bit companded"
                print(f"| {vocab} | {k} | {name} | {TokenEncoding(vocab, k, bits).bytes_per_token} | "
                      f"{shard_bytes / cache.num_tokens:.1f} | {all_bytes / cache.num_tokens:.1f} | "
                      f"{errors['likely']:.4f} | {errors['all']:.4f} | {errors['p']:.2e} | {errors['tail']:.2e} |",
                      flush=True)
                shutil.rmtree(folder)


def measure_errors(cache: TeacherCache, model, dataset: Dataset, k: int) -> dict[str, float]:
    worst = {"likely": 0.0, "all": 0.0, "p": 0.0, "tail": 0.0}
    for row in range(len(dataset)):
        ref = reference_logprobs(model, dataset, row)
        ids, logprobs, tail = cache.rows([row])
        true = ref.gather(1, ids)  # float64 log p of the decoded ids
        error = (logprobs.double() - true).abs()
        worst["all"] = max(worst["all"], float(error.max()))
        likely = true >= math.log(0.01)
        if likely.any():
            worst["likely"] = max(worst["likely"], float(error[likely].max()))
        worst["p"] = max(worst["p"], float((logprobs.double().exp() - true.exp()).abs().max()))
        true_tail = torch.logsumexp(ref.scatter(1, ids, -math.inf), -1)
        if k < ref.shape[1]:
            worst["tail"] = max(worst["tail"], float((tail.double() - true_tail).abs().max()))
        # the decoded ids are the true top-k (ties aside)
        assert torch.equal(ids.sort(-1).values, ref.topk(k, -1).indices.sort(-1).values)
    return worst


def throughput(args) -> None:
    torch.set_num_threads(args.threads)
    tokenizer = word_tokenizer(args.vocab)
    model = teacher_model(args.vocab, args.hidden, args.layers)
    dataset = random_rows(args.vocab, args.rows, args.length)
    scale_head_to_entropy(model, torch.tensor(dataset["input_ids"]), args.entropy)
    tokens = args.rows * (args.length - 1)
    print(f"teacher: Llama {args.layers} x {args.hidden}, V = {args.vocab}; {args.rows} rows x {args.length} tokens "
          f"({tokens} cached tokens), batch {args.batch}, k = {args.k}, {args.threads} thread(s)")

    ids = torch.tensor(dataset["input_ids"])
    with torch.no_grad():
        start = time.perf_counter()
        logits = [model(ids[i:i + args.batch]).logits[:, :-1].reshape(-1, args.vocab)
                  for i in range(0, args.rows, args.batch)]
        forward = time.perf_counter() - start
    print(f"teacher forward alone:              {tokens / forward:8.0f} tokens/s")

    encoding = TokenEncoding(args.vocab, args.k)
    start = time.perf_counter()
    for chunk in logits:
        encoding.encode(*teacher_topk(chunk, args.k))
    machinery = time.perf_counter() - start
    print(f"top-k + encoding alone:             {tokens / machinery:8.0f} tokens/s")

    folder = Path(tempfile.mkdtemp(prefix="llmkd_cache_bench_"))
    start = time.perf_counter()
    cache = write_teacher_cache(model, dataset, tokenizer, folder / "c", top_k=args.k, temperature=1.0,
                                shard_rows=8, batch_size=args.batch, progress=False)
    whole = time.perf_counter() - start
    print(f"write_teacher_cache (everything):   {cache.num_tokens / whole:8.0f} tokens/s "
          f"({whole:.1f} s, {cache.metadata['bytes_per_token']} B/token on disk)")
    start = time.perf_counter()
    for row in range(len(cache)):
        cache.rows([row])
    print(f"reading back (rows one at a time):  {cache.num_tokens / (time.perf_counter() - start):8.0f} tokens/s")
    shutil.rmtree(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    size = sub.add_parser("sizes")
    size.add_argument("--vocabs", type=int, nargs="+", default=[32000, 151665])
    size.add_argument("--ks", type=int, nargs="+", default=[8, 32, 64])
    size.add_argument("--bits", type=int, nargs="+", default=[8, 6, 32])
    size.add_argument("--rows", type=int, default=16)
    size.add_argument("--length", type=int, default=256)
    size.add_argument("--entropy", type=float, default=2.5)
    speed = sub.add_parser("throughput")
    speed.add_argument("--vocab", type=int, default=32000)
    speed.add_argument("--hidden", type=int, default=512)
    speed.add_argument("--layers", type=int, default=4)
    speed.add_argument("--rows", type=int, default=32)
    speed.add_argument("--length", type=int, default=512)
    speed.add_argument("--batch", type=int, default=4)
    speed.add_argument("--k", type=int, default=64)
    speed.add_argument("--entropy", type=float, default=2.5)
    speed.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    (sizes if args.what == "sizes" else throughput)(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
