"""Tiny, offline building blocks for the DHO tests (no test lives here): a word-level tokenizer, a tiny CLIP, tiny
vision students, image processors, and generated 8x8 images whose class is a bright row."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    PreTrainedTokenizerFast,
    ResNetConfig,
    ViTConfig,
    ViTImageProcessor,
)

from llmkd.models.dual_head import DualHeadConfig, DualHeadModel

CLASS_NAMES = ["top", "upper", "lower", "bottom"]
TEMPLATES = ["a photo of a {}.", "a {} bar."]


def word_tokenizer() -> PreTrainedTokenizerFast:
    words = sorted(set(CLASS_NAMES) | {"a", "photo", "of", "bar", ".", "the", "row"})
    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def tiny_clip(tokenizer, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=8,
    )
    return CLIPModel(config).eval()


def zero_shot_teacher(seed: int = 5):
    """The tiny CLIP as a zero-shot classifier over CLASS_NAMES with TEMPLATES (the DHO tests' teacher)."""
    from llmkd.models.clip_teacher import CLIPZeroShotClassifier

    tokenizer = word_tokenizer()
    return CLIPZeroShotClassifier.from_model(tiny_clip(tokenizer, seed=seed), tokenizer, CLASS_NAMES, TEMPLATES)


def clip_processor() -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})


def student_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def tiny_resnet_config() -> ResNetConfig:
    return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")


def tiny_vit_config() -> ViTConfig:
    """A ViT without dropout (LayerNorm only: no statistic couples the examples of a batch)."""
    return ViTConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_student(backbone_config=None, num_labels: int = len(CLASS_NAMES), seed: int = 0, **kwargs) -> DualHeadModel:
    torch.manual_seed(seed)
    id2label = dict(enumerate(CLASS_NAMES)) if num_labels == len(CLASS_NAMES) else None
    extra = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else \
        {"num_labels": num_labels}
    return DualHeadModel(DualHeadConfig(backbone_config=backbone_config or tiny_resnet_config(), **extra, **kwargs))


def bar_images(n: int, seed: int = 0, noise: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 8x8 uint8 images; class c has a bright row at 2c (+ noise); labels cycle through the classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASS_NAMES)
    images = rng.normal(40.0, noise, size=(n, 8, 8))
    for i, label in enumerate(labels):
        images[i, 2 * label] += 180.0
    return np.clip(images, 0, 255).astype(np.uint8), labels


def image_dataset(n: int, seed: int = 0, labels=None) -> datasets.Dataset:
    images, default_labels = bar_images(n, seed)
    labels = default_labels if labels is None else labels
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=CLASS_NAMES)})
    from PIL import Image

    return datasets.Dataset.from_dict({"image": [Image.fromarray(i) for i in images],
                                       "label": [int(v) for v in labels]}, features=features)
