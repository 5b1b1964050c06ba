"""Build the offline SinKD classification recipe's assets: a word-level tokenizer, a trained BERT teacher, the
student's config, and GLUE-style data (SST-2 layout: ``sentence``, ``label``).

    python scripts/make_sinkd_tiny_classifier.py          # about a minute on 2 CPU cores

The task is sentiment with negation: a sentence holds neutral words and one to three polar adjectives, each
possibly preceded by "not", which flips it; the label is 1 when the flipped polarities sum to more than zero.
The students' training rows are noisy (``--label_noise``, 20%: a fraction of labels flipped, as crowd labels are)
and few; the teacher trained on many noisy rows learned the rule, so its soft predictions carry what the
students' labels lack. Held-out rows are always right.

Writes ``recipes/assets/sinkd-tiny-cls/{teacher,student}`` (teacher: 4 x 128 BertForSequenceClassification with the
tokenizer; student: the 2 x 64 config and the tokenizer, initialised from a seed by the recipe) and
``recipes/data/sentiment_{train,held_out}.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
ASSETS = os.path.join(ROOT, "recipes", "assets", "sinkd-tiny-cls")
DATA = os.path.join(ROOT, "recipes", "data")

POSITIVE = "good great fine happy nice bright warm lovely".split()
NEGATIVE = "bad awful sad poor dark cold dull boring".split()
NEUTRAL = "the a movie day food it was is very really and but this that so".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's words with BERT's [CLS] a [SEP] (b [SEP]) template."""
    vocab = {token: i for i, token in enumerate(SPECIALS + ["not"] + POSITIVE + NEGATIVE + NEUTRAL)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def sentence(rng: random.Random) -> tuple[str, int]:
    """A sentence and its true label (resampled until the polarity sum is not zero)."""
    while True:
        words = [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 6))]
        total = 0
        for _ in range(rng.randint(1, 3)):
            polarity = rng.choice((1, -1))
            phrase = [rng.choice(POSITIVE if polarity > 0 else NEGATIVE)]
            if rng.random() < 0.35:
                phrase.insert(0, "not")
                polarity = -polarity
            position = rng.randint(0, len(words))
            words[position:position] = phrase
            total += polarity
        if total != 0:
            return " ".join(words), int(total > 0)


def make_rows(n: int, seed: int, label_noise: float) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text, label = sentence(rng)
        if rng.random() < label_noise:
            label = 1 - label
        rows.append({"sentence": text, "label": label, "idx": i})
    return rows


def bert_config(tokenizer, hidden: int, layers: int) -> BertConfig:
    return BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=4 * hidden, max_position_embeddings=64, num_labels=2, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
        architectures=["BertForSequenceClassification"],
    )


def accuracy(model, tokenizer, rows) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(rows), 256):
            chunk = rows[start:start + 256]
            batch = tokenizer([r["sentence"] for r in chunk], padding=True, return_tensors="pt")
            predictions = model(**batch).logits.argmax(-1)
            correct += int((predictions == torch.tensor([r["label"] for r in chunk])).sum())
    return correct / len(rows)


def train_teacher(tokenizer, rows, steps: int, batch_size: int, seed: int, lr: float) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    teacher = BertForSequenceClassification(bert_config(tokenizer, hidden=128, layers=4))
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    teacher.train()
    for step in range(steps):
        chunk = rng.sample(rows, batch_size)
        batch = tokenizer([r["sentence"] for r in chunk], padding=True, return_tensors="pt")
        loss = F.cross_entropy(teacher(**batch).logits, torch.tensor([r["label"] for r in chunk]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
    return teacher.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_examples", type=int, default=50_000)
    parser.add_argument("--train_examples", type=int, default=2_000, help="The students' training rows.")
    parser.add_argument("--held_out_examples", type=int, default=2_000)
    parser.add_argument("--label_noise", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=1_000)
    parser.add_argument("--lr", type=float, default=3e-4, help="Peak learning rate of the teacher (one-cycle).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    tokenizer = make_tokenizer()
    teacher_rows = make_rows(args.teacher_examples, seed=args.seed + 1, label_noise=args.label_noise)
    train_rows = make_rows(args.train_examples, seed=args.seed + 2, label_noise=args.label_noise)
    held_out = make_rows(args.held_out_examples, seed=args.seed + 3, label_noise=0.0)

    teacher = train_teacher(tokenizer, teacher_rows, args.steps, batch_size=64, seed=args.seed, lr=args.lr)
    print(f"teacher held-out accuracy {accuracy(teacher, tokenizer, held_out):.4f}")

    teacher.save_pretrained(os.path.join(ASSETS, "teacher"))
    tokenizer.save_pretrained(os.path.join(ASSETS, "teacher"))
    student_dir = os.path.join(ASSETS, "student")
    bert_config(tokenizer, hidden=64, layers=2).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    os.makedirs(DATA, exist_ok=True)
    for name, rows in (("sentiment_train", train_rows), ("sentiment_held_out", held_out)):
        with open(os.path.join(DATA, f"{name}.jsonl"), "w") as handle:
            handle.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
