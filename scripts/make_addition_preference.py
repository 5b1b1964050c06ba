"""Write recipes/data/addition_preference.jsonl: preference pairs for the offline MoE recipes' preference stage.

Each row is a clean training-split addition (operand pairs never in the held-out split) in TRL's preference layout:
``prompt`` "405+533=" (numbers lowest digit first, as the quickstart), ``chosen`` the right sum, ``rejected`` the
same sum with one wrong digit: a plausible, confidently wrong ("hallucinated") answer. Deterministic.

    python scripts/make_addition_preference.py [--rows 1000] [--seed 1]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from llmkd.quickstart.task import _with_a_wrong_digit, make_split

OUTPUT = Path(__file__).resolve().parents[1] / "recipes" / "data" / "addition_preference.jsonl"


def preference_rows(rows: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(f"preference-{seed}")
    pairs = []
    for row in make_split("train", rows, seed=seed):
        pairs.append({"prompt": row["prompt"], "chosen": row["completion"],
                      "rejected": _with_a_wrong_digit(row["completion"], rng)})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args()
    rows = preference_rows(args.rows, args.seed)
    Path(args.output).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} pairs to {args.output}")


if __name__ == "__main__":
    main()
