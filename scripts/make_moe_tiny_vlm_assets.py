"""Build the offline assets of the tiny VLM MoE recipes (recipes/moe/tiny-vlm-*.yaml) in recipes/assets/moe-tiny-vlm/.

The task is the MoE study's synthetic one (scripts/moe_study_task.py: 16 x 16 images with 1-3 coloured shapes;
"what objects ?" and "is there a <object> ?", hallucination = naming an absent object). This script writes:

- ``teacher/``: a tiny LLaVA (CLIP 2 x 64 tower pretrained per cell, Llama 3 x 96) trained with plain CE, and its
  processor (word-level tokenizer + CLIP image processor);
- ``student/``: the dense student to distil (Llama 4 x 48 with the teacher's vision tower copied in, fresh
  projector and language model) and the same processor;
- ``mimic/``: processed rows for the mimic stages (``input_ids``, ``labels``, ``pixel_values``), 25% of the
  hallucinatable answers hallucinated (noisy captions), a ``datasets`` folder;
- ``preference/``: image preference pairs (``images``, ``prompt``, ``chosen`` correct, ``rejected`` hallucinated).

    OMP_NUM_THREADS=1 python scripts/make_moe_tiny_vlm_assets.py      # about 1 minute here
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from datasets import Array3D, Dataset, Features, Sequence, Value

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe_study_task as task  # noqa: E402
from moe_hallucination_study import train_teacher  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "moe-tiny-vlm"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(OUTPUT))
    parser.add_argument("--teacher_images", type=int, default=2000)
    parser.add_argument("--mimic_images", type=int, default=600)
    parser.add_argument("--pref_images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.output)
    tokenizer = task.make_tokenizer()
    processor = task.make_processor(tokenizer)

    teacher = train_teacher(tokenizer, processor, task.make_split(args.teacher_images, seed=args.seed),
                            SimpleNamespace(vision_steps=300, teacher_steps=800, teacher_lr=1e-3, data_seed=args.seed),
                            str(out / "scratch"))
    held_out = task.make_split(100, seed=args.seed + 3)
    print("teacher on 200 held-out questions:", task.evaluate(teacher, processor, held_out), flush=True)
    teacher.save_pretrained(out / "teacher")
    processor.save_pretrained(out / "teacher")

    student = task.tiny_llava(tokenizer, hidden=48, layers=4, seed=args.seed, vision_from=teacher)
    student.save_pretrained(out / "student")
    processor.save_pretrained(out / "student")

    rng = random.Random(args.seed)
    examples = task.make_split(args.mimic_images, seed=args.seed + 1)
    answers = [task.noisy_answer(example, rng, 0.25) for example in examples]
    rows = task.mimic_rows(processor, examples, answers)
    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                         "pixel_values": Array3D((3, task.IMAGE_SIZE, task.IMAGE_SIZE), "float32")})
    Dataset.from_list(rows, features=features).save_to_disk(str(out / "mimic"))
    pairs = task.preference_rows(task.make_split(args.pref_images, seed=args.seed + 2), seed=args.seed)
    Dataset.from_list(pairs).save_to_disk(str(out / "preference"))
    for leftover in (out / "scratch",):
        if leftover.exists():
            import shutil

            shutil.rmtree(leftover)
    print(f"wrote {out}: teacher, student, {len(rows)} mimic rows, {len(pairs)} preference pairs")


if __name__ == "__main__":
    main()
