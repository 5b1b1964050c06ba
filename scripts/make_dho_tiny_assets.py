"""Build the offline DHO assets from scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, no network):

* a tiny CLIP teacher (``CLIPModel``: 2-layer ViT on 16x16 images, 2-layer text transformer over a word-level
  tokenizer) trained here contrastively on digit images and generated captions ("a scan of a handwritten seven.")
  from a TEACHER split that no student ever sees, so that zero-shot prompts it was not trained on
  ("a photo of a seven.") classify digits, as CLIP does for photos;
* the student's config (a tiny ResNet) and image processor;
* the student's data, ``datasets`` splits ``train`` / ``validation`` / ``test`` (image + ClassLabel label).

    python scripts/make_dho_tiny_assets.py            # about a minute on one CPU thread

Writes ``recipes/assets/dho-tiny/{teacher,student,digits}`` (under 1 MB) and prints the teacher's zero-shot
accuracy on the validation and test splits.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedTokenizerFast,
    ResNetConfig,
    ViTImageProcessor,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
ASSETS = os.path.join(ROOT, "recipes", "assets", "dho-tiny")
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: captions the teacher is trained on
CAPTION_TEMPLATES = ["a scan of a handwritten {}.", "the digit {}.", "handwritten number {}.", "a {} written by hand.",
                     "a black and white image of the number {}.", "{}"]
#: prompts used for zero-shot classification: none of them is a training caption
ZERO_SHOT_TEMPLATES = ["a photo of a {}.", "an image of the digit {}.", "a handwritten {}."]
#: a stratified split of the 1797 images; the teacher split is the teacher's "pre-training data"
SPLIT_SIZES = {"teacher": 400, "train": 900, "validation": 150, "test": 347}
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def digit_splits(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images (n, 8, 8) uint8 in [0, 255], labels (n,))}, stratified by class, fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))
    splits, rest = {}, indices
    names = list(SPLIT_SIZES)
    for name in names[:-1]:
        chosen, rest = train_test_split(rest, train_size=SPLIT_SIZES[name], stratify=labels[rest], random_state=seed)
        splits[name] = np.sort(chosen)
    splits[names[-1]] = np.sort(rest)
    assert sum(len(v) for v in splits.values()) == len(labels)
    return {name: (images[idx], labels[idx]) for name, idx in splits.items()}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over every caption and prompt word, ``<s> ... </s>``."""
    words = sorted({w for t in CAPTION_TEMPLATES + ZERO_SHOT_TEMPLATES for w in t.replace("{}", "").replace(".", " . ")
                    .split()} | set(CLASS_NAMES))
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=16)


def teacher_image_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def student_image_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def student_config() -> ResNetConfig:
    """A ResNet of two basic stages (16 and 32 channels): about 30k parameters (the teacher's vision tower has
    about 100k)."""
    return ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                        downsample_in_first_stage=False)


def tiny_clip_config(tokenizer: PreTrainedTokenizerFast) -> CLIPConfig:
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(image_size=16, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def to_pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image).convert("RGB")


def shifted(image: np.ndarray, rng: random.Random, max_shift: int = 1) -> np.ndarray:
    """The image moved by up to ``max_shift`` pixels each way, with black fill (augmentation)."""
    dy, dx = rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift)
    out = np.zeros_like(image)
    src = image[max(0, -dy):image.shape[0] - max(0, dy), max(0, -dx):image.shape[1] - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def train_teacher(images: np.ndarray, labels: np.ndarray, *, steps: int, batch_size: int, seed: int,
                  learning_rate: float = 2e-3) -> tuple[CLIPModel, PreTrainedTokenizerFast]:
    """CLIP's contrastive loss on (augmented image, random caption of its class) pairs."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = make_tokenizer()
    model = CLIPModel(tiny_clip_config(tokenizer))
    processor = teacher_image_processor()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=0.1)
    model.train()
    for step in range(steps):
        batch = rng.sample(range(len(labels)), batch_size)
        pixels = processor([to_pil(shifted(images[i], rng)) for i in batch], return_tensors="pt")["pixel_values"]
        captions = [rng.choice(CAPTION_TEMPLATES).format(CLASS_NAMES[labels[i]]) for i in batch]
        tokens = tokenizer(captions, padding=True, return_tensors="pt")
        loss = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels,
                     return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps - 1:
            print(f"teacher step {step:5d}  contrastive loss {loss.item():.3f}", flush=True)
    return model.eval(), tokenizer


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: np.ndarray, labels: np.ndarray) -> float:
    from llmkd.models.clip_teacher import CLIPZeroShotClassifier

    classifier = CLIPZeroShotClassifier.from_model(model, tokenizer, CLASS_NAMES, ZERO_SHOT_TEMPLATES)
    pixels = teacher_image_processor()([to_pil(image) for image in images], return_tensors="pt")["pixel_values"]
    return float((classifier(pixel_values=pixels).logits.argmax(-1).numpy() == labels).mean())


def save_digits(splits, folder: str) -> None:
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    dataset = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"image": [to_pil(i).convert("L") for i in splits[name][0]],
                                          "label": splits[name][1].tolist()}, features=features)
        for name in ("train", "validation", "test")
    })
    dataset.save_to_disk(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=ASSETS)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    splits = digit_splits(seed=0)
    model, tokenizer = train_teacher(*splits["teacher"], steps=args.steps, batch_size=args.batch_size,
                                     seed=args.seed)
    for name in ("validation", "test"):
        print(f"teacher zero-shot accuracy on {name}: {zero_shot_accuracy(model, tokenizer, *splits[name]):.3f}")
    teacher_dir = os.path.join(args.output_dir, "teacher")
    model.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    teacher_image_processor().save_pretrained(teacher_dir)
    student_dir = os.path.join(args.output_dir, "student")
    student_config().save_pretrained(student_dir)
    student_image_processor().save_pretrained(student_dir)
    save_digits(splits, os.path.join(args.output_dir, "digits"))
    print(f"wrote {args.output_dir}")


if __name__ == "__main__":
    main()
