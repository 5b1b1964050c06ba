"""The quickstart's task: three-digit addition with the sum written lowest digit first ("347+589=" -> "639",
"748+552=" -> "0031"), and a character-level tokenizer.

The sum is reversed because that is the order in which carries are computed: a small transformer then learns the
task from far fewer examples than with the sum written the usual way (Lee et al., 2023, "Teaching Arithmetic to
Small Transformers"), which is what lets the quickstart train a student in a minute on a CPU.

Every pair of operands a, b in [100, 999] belongs to exactly one split, decided by a hash of the pair, so the
held-out pairs are never seen in training by the teacher or the students. All prompts have 8 characters and all
completions 3 or 4 digits, so batches need no padding on the prompt side.
"""

from __future__ import annotations

import hashlib
import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

LOW, HIGH = 100, 999
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
CHARACTERS = list("0123456789+=")
HELD_OUT_PERCENT = 10  # a pair is held out when its hash falls in the first 10 of 100 buckets
PROMPT_LENGTH = 8  # "abc+def="


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over digits, '+' and '=', with ``<pad>`` (id 0), ``</s>`` (id 1), ``<unk>``."""
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *CHARACTERS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK, padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
    )


def is_held_out(a: int, b: int) -> bool:
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 100 < HELD_OUT_PERCENT


def example(a: int, b: int) -> dict[str, str]:
    """One row in TRL's prompt/completion layout: the sum's digits lowest first."""
    return {"prompt": f"{a}+{b}=", "completion": str(a + b)[::-1]}


def make_split(split: str, n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct rows of ``split`` ("train" or "held_out"), drawn deterministically from ``seed``."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}.")
    want_held_out = split == "held_out"
    rng = random.Random(f"{split}-{seed}")
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if (a, b) in seen or is_held_out(a, b) != want_held_out:
            continue
        seen.add((a, b))
        rows.append(example(a, b))
    return rows
