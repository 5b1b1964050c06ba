"""Turn LLaVA-format conversations with images into the processed rows the VLM mimic stage trains on.

Input: a JSON (list) or JSONL file of LLaVA-style records::

    {"image": "coco/000000123.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                                                    {"from": "gpt", "value": "A cat on a mat."}, ...]}

Output: a ``datasets`` folder (``save_to_disk``) with ``input_ids``, ``labels`` (-100 everywhere but the assistant
turns) and the processor's image fields (``pixel_values``, ``image_sizes``, ...), i.e. what
:class:`~llmkd.MoEMimicTrainer` (and every llmkd trainer) passes to student and teacher unchanged. The student's
processor expands each ``<image>`` placeholder into its image tokens; teacher and student must share it (same
tokenizer and vision preprocessing, e.g. the LLaVA-OneVision 0.5B / 7B pair).

    python scripts/prepare_vlm_mimic_data.py --processor llava-hf/llava-onevision-qwen2-0.5b-ov-hf \
        --data llava_instruct.json --image_root images/ --output data/llava-mimic-processed [--max_length 4096]
"""

from __future__ import annotations

import argparse
import json
import os

from datasets import Dataset
from PIL import Image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def read_records(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in handle if line.strip()]
        return json.load(handle)


def as_messages(conversations: list[dict], image_token: str) -> list[dict]:
    messages = []
    for turn in conversations:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"Unknown speaker {turn.get('from')!r} in a conversation; expected one of {sorted(ROLES)}.")
        messages.append({"role": role, "content": turn["value"].replace("<image>", image_token)})
    return messages


def process_record(record: dict, processor, image_root: str, max_length: int | None) -> dict:
    """One processed row: ``input_ids`` (S,), ``labels`` (S,) and the processor's image fields."""
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    messages = as_messages(record["conversations"], image_token)
    images = [Image.open(os.path.join(image_root, record["image"])).convert("RGB")] if record.get("image") else None
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    encoded = processor(images=images, text=full_text, return_tensors="pt", add_special_tokens=False)
    input_ids = encoded["input_ids"][0].tolist()
    labels = [-100] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # the assistant turn spans [len(prompt up to it), len(conversation through it)) in processed tokens
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        start = len(processor(images=images, text=before, add_special_tokens=False)["input_ids"][0])
        end = len(processor(images=images, text=through, add_special_tokens=False)["input_ids"][0])
        labels[start:end] = input_ids[start:end]
    if max_length is not None:
        if sum(1 for t in input_ids[:max_length] if t == getattr(processor, "image_token_id", None)) != sum(
                1 for t in input_ids if t == getattr(processor, "image_token_id", None)):
            raise ValueError(f"max_length={max_length} would cut image tokens of a record; raise it.")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    row = {"input_ids": input_ids, "labels": labels}
    for key, value in encoded.items():
        if key not in ("input_ids", "attention_mask", "token_type_ids"):
            row[key] = value[0].tolist()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processor", required=True, help="The student's processor (path or Hub name).")
    parser.add_argument("--data", required=True, help="LLaVA-format .json or .jsonl.")
    parser.add_argument("--image_root", default=".", help="Folder the records' image paths are relative to.")
    parser.add_argument("--output", required=True, help="Folder for Dataset.save_to_disk.")
    parser.add_argument("--max_length", type=int, default=None)
    args = parser.parse_args(argv)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(args.processor)
    if getattr(processor.tokenizer, "chat_template", None) is None:
        raise ValueError(f"{args.processor}'s tokenizer has no chat template: cannot tell prompts from answers.")
    records = read_records(args.data)
    rows = [process_record(record, processor, args.image_root, args.max_length) for record in records]
    Dataset.from_list(rows).save_to_disk(args.output)
    print(f"wrote {len(rows)} processed rows to {args.output}")


if __name__ == "__main__":
    main()
