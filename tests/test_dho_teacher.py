"""The CLIP zero-shot teacher: logits = 100 cos(image, class), each class embedding the normalised mean of the
normalised embeddings of its prompts; built from a model object or a saved checkpoint; precomputed logits equal the
online ones; bad prompts fail clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dho_support import CLASS_NAMES, TEMPLATES, clip_processor, image_dataset, tiny_clip, word_tokenizer

from llmkd.data.images import compute_teacher_logits
from llmkd.models.clip_teacher import CLIPZeroShotClassifier

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clip_parts():
    tokenizer = word_tokenizer()
    return tiny_clip(tokenizer, seed=3), tokenizer


def naive_zero_shot_logits(clip, tokenizer, pixels, class_names, templates, scale):
    """Each prompt embedded on its own, normalised, averaged per class, normalised; image embeddings normalised;
    logits = scale * cosine, one pair at a time."""
    with torch.no_grad():
        class_embeddings = []
        for name in class_names:
            prompt_embeddings = []
            for template in templates:
                tokens = tokenizer([template.format(name)], return_tensors="pt")
                out = clip.get_text_features(**tokens)
                vector = (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].double()
                prompt_embeddings.append(vector / vector.norm())
            mean = torch.stack(prompt_embeddings).mean(0)
            class_embeddings.append(mean / mean.norm())
        out = clip.get_image_features(pixel_values=pixels)
        images = (out if isinstance(out, torch.Tensor) else out.pooler_output).double()
    logits = torch.zeros(len(images), len(class_names), dtype=torch.float64)
    for i, image in enumerate(images):
        for c, text in enumerate(class_embeddings):
            logits[i, c] = scale * torch.dot(image, text) / image.norm()
    return logits


def pixels_of(n: int = 6) -> torch.Tensor:
    from PIL import Image

    images = [Image.fromarray(row["image"] if isinstance(row["image"], np.ndarray) else np.asarray(row["image"]))
              for row in image_dataset(n)]
    return clip_processor()([i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]


def test_zero_shot_logits_match_the_formula(clip_parts):
    clip, tokenizer = clip_parts
    teacher = CLIPZeroShotClassifier.from_model(clip, tokenizer, CLASS_NAMES, TEMPLATES)
    pixels = pixels_of()
    logits = teacher(pixel_values=pixels).logits
    assert logits.shape == (6, len(CLASS_NAMES)) and teacher.num_labels == len(CLASS_NAMES)
    expected = naive_zero_shot_logits(clip, tokenizer, pixels, CLASS_NAMES, TEMPLATES, 100.0)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_logit_scale_none_uses_the_checkpoint_scale(clip_parts):
    clip, tokenizer = clip_parts
    teacher = CLIPZeroShotClassifier.from_model(clip, tokenizer, CLASS_NAMES, TEMPLATES, logit_scale=None)
    pixels = pixels_of(3)
    expected = naive_zero_shot_logits(clip, tokenizer, pixels, CLASS_NAMES, TEMPLATES,
                                      float(clip.logit_scale.detach().exp()))
    torch.testing.assert_close(teacher(pixel_values=pixels).logits.double(), expected, rtol=1e-4, atol=1e-4)


def test_from_pretrained_loads_model_and_tokenizer(clip_parts, tmp_path):
    clip, tokenizer = clip_parts
    clip.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPZeroShotClassifier.from_pretrained(str(tmp_path), CLASS_NAMES, TEMPLATES, dtype=torch.float32)
    in_memory = CLIPZeroShotClassifier.from_model(clip, tokenizer, CLASS_NAMES, TEMPLATES)
    pixels = pixels_of(4)
    torch.testing.assert_close(loaded(pixel_values=pixels).logits, in_memory(pixel_values=pixels).logits)
    assert not hasattr(loaded, "text_model")  # only the vision tower is kept


def test_precomputed_logits_equal_online_logits(clip_parts):
    clip, tokenizer = clip_parts
    teacher = CLIPZeroShotClassifier.from_model(clip, tokenizer, CLASS_NAMES, TEMPLATES)
    dataset = image_dataset(10)
    cached = compute_teacher_logits(teacher, dataset, clip_processor(), batch_size=4)
    assert cached.shape == (10, len(CLASS_NAMES)) and cached.dtype == np.float32
    np.testing.assert_allclose(cached, teacher(pixel_values=pixels_of(10)).logits.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_prompts_fail_clearly(clip_parts):
    clip, tokenizer = clip_parts
    with pytest.raises(ValueError, match="exactly one '\\{\\}'"):
        CLIPZeroShotClassifier.from_model(clip, tokenizer, CLASS_NAMES, ["a photo."])
    with pytest.raises(ValueError, match="needs class names"):
        CLIPZeroShotClassifier.from_model(clip, tokenizer, [], TEMPLATES)
    with pytest.raises(ValueError, match="at least one prompt template"):
        CLIPZeroShotClassifier.from_model(clip, tokenizer, CLASS_NAMES, [])
