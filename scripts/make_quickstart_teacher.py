"""Train the quickstart's teacher and write it, with its tokenizer and the students' config, into the package.

    python scripts/make_quickstart_teacher.py            # about 3 minutes on 2 free CPU cores

The teacher is a 4-layer LlamaForCausalLM trained from scratch on a large generated training set of three-digit
additions (llmkd/quickstart/task.py) whose answers are noisy as the students' are (30% of the rows have one wrong
digit): from 400k such rows it learns the rule, and its output distribution is what the students distil. It is
evaluated on held-out pairs with the right answers, and saved with save_pretrained (safetensors) into
llmkd/assets/quickstart/teacher/, which `llmkd quickstart` loads offline. The same script writes the config of the
(smaller) student into llmkd/assets/quickstart/student/config.json; the quickstart initialises it from a seed.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llmkd.quickstart.evaluate import completion_perplexity, exact_match
from llmkd.quickstart.task import make_split, make_tokenizer

ASSETS = os.path.join(os.path.dirname(__file__), os.pardir, "llmkd", "assets", "quickstart")


def llama_config(tokenizer, hidden: int, layers: int, heads: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=32,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def student_config(tokenizer) -> LlamaConfig:
    """The students of the quickstart: 2 layers, half the teacher's width."""
    return llama_config(tokenizer, hidden=64, layers=2, heads=4)


def tensorize(rows, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), both (N, T), right-padded; labels are -100 on the prompt and the padding. The prompt is
    each prompt's own token count (8 for the character-level tokenizer; another tokenizer's tokens end at ``=`` too,
    scripts/cross_tokenizer_study.py)."""
    texts = [row["prompt"] + row["completion"] + tokenizer.eos_token for row in rows]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    input_ids = encoded["input_ids"]
    labels = input_ids.masked_fill(encoded["attention_mask"] == 0, -100)
    prompt_tokens = [len(ids) for ids in tokenizer([row["prompt"] for row in rows])["input_ids"]]
    positions = torch.arange(input_ids.shape[1])[None, :]
    labels[positions < torch.tensor(prompt_tokens)[:, None]] = -100
    return input_ids, labels


def train_teacher(tokenizer, train_rows, held_out, args) -> LlamaForCausalLM:
    """The teacher trained from scratch on ``train_rows`` with cross-entropy on the completions (``args``: steps,
    batch_size, learning_rate, hidden, layers, eval_every, seed, as this script's options); progress printed, held-out
    exact match every ``eval_every`` steps (the character-level tokenizer only)."""
    input_ids, labels = tensorize(train_rows, tokenizer)
    print(f"{len(train_rows)} training rows, {len(held_out)} held-out rows, sequences of {input_ids.shape[1]} tokens")
    model = LlamaForCausalLM(llama_config(tokenizer, args.hidden, args.layers, heads=4))
    print(f"teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(args.steps // 20, 1)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(args.steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_factor)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_rows), generator=generator)
    start, cursor = time.time(), 0
    model.train()
    for step in range(1, args.steps + 1):
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(train_rows), generator=generator), 0
        index = order[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        logits = model(input_ids=input_ids[index]).logits[:, :-1]
        loss = F.cross_entropy(logits.transpose(1, 2), labels[index, 1:], ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True)
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            accuracy = exact_match(model, tokenizer, held_out[:500])
            print(f"step {step}: held-out exact match (500 rows) {accuracy:.3f}", flush=True)

    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=ASSETS, help="Where teacher/ and student/ are written.")
    parser.add_argument("--train_examples", type=int, default=400_000)
    parser.add_argument("--label_noise", type=float, default=0.3, help="Fraction of rows with a wrong digit.")
    parser.add_argument("--held_out_examples", type=int, default=2_000)
    parser.add_argument("--steps", type=int, default=2_000)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tokenizer = make_tokenizer()
    train_rows = make_split("train", args.train_examples, seed=args.seed, label_noise=args.label_noise)
    held_out = make_split("held_out", args.held_out_examples, seed=args.seed)
    start = time.time()
    model = train_teacher(tokenizer, train_rows, held_out, args)
    accuracy = exact_match(model, tokenizer, held_out)
    perplexity = completion_perplexity(model, tokenizer, held_out)
    print(f"teacher held-out exact match {accuracy:.4f}, completion perplexity {perplexity:.4f} "
          f"({len(held_out)} rows, {time.time() - start:.0f} s)")

    os.makedirs(args.output_dir, exist_ok=True)
    teacher_dir = os.path.join(args.output_dir, "teacher")
    model.save_pretrained(teacher_dir, safe_serialization=True)
    tokenizer.save_pretrained(teacher_dir)
    student_config(tokenizer).save_pretrained(os.path.join(args.output_dir, "student"))
    print(f"wrote {os.path.abspath(teacher_dir)} and the student config")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
