"""The quickstart's task: three-digit addition with every number written lowest digit first, and a character-level
tokenizer. "743+985=639" is 347 + 589 = 936; "847+255=0031" is 748 + 552 = 1300.

Numbers are written lowest digit first because that is the order in which carries are computed and it puts the
digits to add at fixed distances from the digit being written: a small transformer then learns the task from a few
hundred examples instead of hundreds of thousands (Lee et al., 2023, "Teaching Arithmetic to Small Transformers"),
which is what lets the quickstart train students in a minute on a CPU.

The training answers can be made noisy, as scraped data is: with ``label_noise=p`` a fraction ``p`` of the
training rows has one digit of its answer replaced by a different random digit. Held-out rows are always right.

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
    """One row in TRL's prompt/completion layout, every number lowest digit first."""
    return {"prompt": f"{little_endian(a)}+{little_endian(b)}=", "completion": little_endian(a + b)}


def little_endian(number: int) -> str:
    return str(number)[::-1]


def make_split(split: str, n: int, seed: int, label_noise: float = 0.0) -> list[dict[str, str]]:
    """``n`` distinct rows of ``split`` ("train" or "held_out"), drawn deterministically from ``seed``; in the
    training split, a fraction ``label_noise`` of the rows (chosen at random) has one wrong digit in its answer."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}.")
    if not 0.0 <= label_noise <= 1.0 or (label_noise and split != "train"):
        raise ValueError(f"label_noise must be in [0, 1] and only the train split can be noisy; got {label_noise} "
                         f"for split {split!r}.")
    want_held_out = split == "held_out"
    rng = random.Random(f"{split}-{seed}")
    noise_rng = random.Random(f"noise-{seed}")
    seen: set[tuple[int, int]] = set()
    rows = []
    while len(rows) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        if (a, b) in seen or is_held_out(a, b) != want_held_out:
            continue
        seen.add((a, b))
        row = example(a, b)
        if label_noise and noise_rng.random() < label_noise:
            row["completion"] = _with_a_wrong_digit(row["completion"], noise_rng)
        rows.append(row)
    return rows


def _with_a_wrong_digit(answer: str, rng: random.Random) -> str:
    position = rng.randrange(len(answer))
    wrong = rng.choice([digit for digit in "0123456789" if digit != answer[position]])
    return answer[:position] + wrong + answer[position + 1 :]
