"""Write the data of llmkd's offline evaluation tasks (eval/data/*.jsonl), deterministically.

    python scripts/make_eval_tasks.py            # (re)write eval/data/
    python scripts/make_eval_tasks.py --check    # exit 1 if eval/data/ differs from what this script writes

Every row comes from the quickstart's three-digit addition task (numbers written lowest digit first, see
``llmkd/quickstart/task.py``), drawn from the HELD-OUT operand pairs only (pairs that no training split, the
quickstart teacher's included, ever contains). One draw of 600 held-out rows (seed 0) is cut into three disjoint
parts; its first 200 rows are exactly ``recipes/data/addition_held_out.jsonl``:

- ``addition_exact_match.jsonl``  rows 0-199: ``prompt``/``completion``; lm-eval ``generate_until``, exact match.
- ``addition_choice.jsonl``       rows 200-399: the prompt, four ``choices`` (the right sum and three plausible
  wrong ones: the sum without carries, one digit changed, and the sum of a neighbouring pair) and ``label`` (the
  index of the right one); lm-eval ``multiple_choice``, accuracy.
- ``addition_perplexity.jsonl``   rows 400-599: ``text`` = whole equations; lm-eval ``loglikelihood_rolling``,
  perplexity per byte / per word and bits per byte.
- ``sentiment_held_out.jsonl``    a copy of ``recipes/data/sentiment_held_out.jsonl`` (the SinKD classification
  task's clean held-out rows), evaluated on classifiers with ``evaluate`` accuracy and F1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llmkd.quickstart.task import little_endian, make_split  # noqa: E402

DATA_DIR = os.path.join(ROOT, "eval", "data")
SEED = 0
PART = 200


def _digits_without_carry(a: int, b: int) -> str:
    """The little-endian sum of a and b with every carry dropped (a classic wrong answer)."""
    x, y = little_endian(a), little_endian(b)
    return "".join(str((int(p) + int(q)) % 10) for p, q in zip(x, y, strict=True))


def _one_digit_changed(answer: str, rng: random.Random) -> str:
    position = rng.randrange(len(answer))
    digit = rng.choice([d for d in "0123456789" if d != answer[position]])
    return answer[:position] + digit + answer[position + 1 :]


def _operands(prompt: str) -> tuple[int, int]:
    left, right = prompt.rstrip("=").split("+")
    return int(left[::-1]), int(right[::-1])


def choice_row(row: dict[str, str], rng: random.Random) -> dict:
    """Four distinct answers to ``row``'s prompt, the right one at a random position."""
    a, b = _operands(row["prompt"])
    right = row["completion"]
    wrong: list[str] = []
    candidates = [_digits_without_carry(a, b), little_endian(a + b + rng.choice([-10, -1, 1, 10]))]
    while len(wrong) < 3:
        candidate = candidates.pop(0) if candidates else _one_digit_changed(right, rng)
        if candidate != right and candidate not in wrong:
            wrong.append(candidate)
    choices = wrong[:]
    label = rng.randrange(4)
    choices.insert(label, right)
    return {"prompt": row["prompt"], "choices": choices, "label": label}


def build() -> dict[str, list[dict]]:
    rows = make_split("held_out", 3 * PART, seed=SEED)
    rng = random.Random(f"choices-{SEED}")
    with open(os.path.join(ROOT, "recipes", "data", "sentiment_held_out.jsonl"), encoding="utf-8") as handle:
        sentiment = [json.loads(line) for line in handle if line.strip()]
    return {
        "addition_exact_match.jsonl": rows[:PART],
        "addition_choice.jsonl": [choice_row(row, rng) for row in rows[PART : 2 * PART]],
        "addition_perplexity.jsonl": [{"text": row["prompt"] + row["completion"]} for row in rows[2 * PART :]],
        "sentiment_held_out.jsonl": sentiment,
    }


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Compare eval/data/ with a fresh build; write nothing.")
    args = parser.parse_args(argv)
    stale = []
    os.makedirs(DATA_DIR, exist_ok=True)
    for name, rows in build().items():
        path = os.path.join(DATA_DIR, name)
        text = render(rows)
        if args.check:
            current = open(path, encoding="utf-8").read() if os.path.exists(path) else None
            if current != text:
                stale.append(path)
            continue
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        print(f"wrote {path} ({len(rows)} rows)")
    if stale:
        print("out of date (run python scripts/make_eval_tasks.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
