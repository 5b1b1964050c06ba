"""DualHeadModel: the inference formula, the alpha/beta grid search, any transformers vision backbone, save/load and
the Auto-class round trip (no remote code), image-classification pipeline."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from test_dho_support import CLASS_NAMES, student_processor, tiny_resnet_config, tiny_student, tiny_vit_config
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    CLIPVisionConfig,
    ConvNextConfig,
    MobileNetV2Config,
    ResNetModel,
)

from llmkd import DualHeadConfig, DualHeadModel
from llmkd.models.dual_head import (
    DEFAULT_ALPHA_GRID,
    DEFAULT_BETA_GRID,
    combine_head_predictions,
    search_inference_weights,
)

pytestmark = pytest.mark.usefixtures("single_thread")

BACKBONES = {
    "clip_vision": lambda: CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2),
    "vit": tiny_vit_config,
    "resnet": tiny_resnet_config,
    "mobilenet_v2": lambda: MobileNetV2Config(image_size=16, depth_multiplier=0.35, finegrained_output=False),
    "convnext": lambda: ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2),
}


def naive_combined(ce_logits, kd_logits, alpha, beta):
    """alpha * softmax(h_ce) + (1 - alpha) * softmax(h_kd / beta), one row at a time in Python floats."""
    rows = []
    for ce_row, kd_row in zip(ce_logits.tolist(), kd_logits.tolist()):
        ce_exp = [math.exp(v) for v in ce_row]
        kd_exp = [math.exp(v / beta) for v in kd_row]
        rows.append([alpha * c / sum(ce_exp) + (1 - alpha) * k / sum(kd_exp) for c, k in zip(ce_exp, kd_exp)])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("alpha,beta", [(0.4, 0.5), (0.0, 1.0), (1.0, 2.0), (0.25, 4.0), (0.75, 0.75)])
def test_inference_formula(alpha, beta):
    generator = torch.Generator().manual_seed(1)
    ce, kd = torch.randn(6, 5, generator=generator) * 3, torch.randn(6, 5, generator=generator) * 3
    log_p = combine_head_predictions(ce, kd, alpha, beta)
    torch.testing.assert_close(log_p.exp().double(), naive_combined(ce, kd, alpha, beta), rtol=1e-5, atol=1e-7)


def test_forward_returns_the_combined_prediction_and_both_heads():
    model = tiny_student(alpha=0.3, beta=1.5).eval()
    pixels = torch.randn(3, 3, 16, 16)
    out = model(pixel_values=pixels, labels=torch.tensor([0, 1, 3]))
    assert out.ce_logits.shape == out.kd_logits.shape == out.logits.shape == (3, len(CLASS_NAMES))
    torch.testing.assert_close(out.logits.exp().double(), naive_combined(out.ce_logits, out.kd_logits, 0.3, 1.5),
                               rtol=1e-5, atol=1e-7)
    expected_nll = -out.logits[torch.arange(3), torch.tensor([0, 1, 3])].mean()
    torch.testing.assert_close(out.loss, expected_nll)
    out.loss.backward()
    assert model.ce_head.weight.grad is not None and model.kd_head.weight.grad is not None


def test_inference_weights_are_checked():
    model = tiny_student()
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        model.set_inference_weights(1.5, 1.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        model.set_inference_weights(0.5, 0.0)
    with pytest.raises(ValueError, match="alpha must be"):
        DualHeadConfig(backbone_config=tiny_resnet_config(), alpha=-0.1)


def naive_search(ce, kd, labels, alphas, betas):
    """Accuracy and NLL of every grid point with numpy, best = highest accuracy, then lowest NLL, then grid order."""
    best, table = None, np.zeros((len(alphas), len(betas)))
    for i, alpha in enumerate(alphas):
        for j, beta in enumerate(betas):
            p = naive_combined(ce, kd, alpha, beta).numpy()
            accuracy = float((p.argmax(-1) == labels.numpy()).mean())
            nll = float(-np.log(p[np.arange(len(labels)), labels.numpy()]).mean())
            table[i, j] = accuracy
            if best is None or accuracy > best[0] or (accuracy == best[0] and nll < best[1] - 1e-9):
                best = (accuracy, nll, alpha, beta)
    return best, table


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grid_search_finds_the_best_grid_point(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (40,), generator=generator)
    # two noisy heads that are right on different examples, so the best mix is strictly inside the grid
    ce = torch.randn(40, 5, generator=generator) * 2
    kd = torch.randn(40, 5, generator=generator) * 2
    ce[torch.arange(20), labels[:20]] += 2.5
    kd[torch.arange(20, 40), labels[20:]] += 2.5
    found = search_inference_weights(ce, kd, labels)
    (accuracy, nll, alpha, beta), table = naive_search(ce, kd, labels, DEFAULT_ALPHA_GRID, DEFAULT_BETA_GRID)
    assert (found.alpha, found.beta) == (alpha, beta)
    assert found.accuracy == pytest.approx(accuracy) and found.nll == pytest.approx(nll, rel=1e-4)
    np.testing.assert_allclose(found.accuracies.numpy(), table)
    assert found.accuracy == table.max()


def test_grid_search_refuses_bad_input():
    with pytest.raises(ValueError, match="empty split"):
        search_inference_weights(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must both be \(N, C\)"):
        search_inference_weights(torch.zeros(4, 3), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_any_vision_backbone_round_trips_through_the_auto_classes(name, tmp_path):
    """Build from a backbone config, save (safetensors), reload with AutoConfig / AutoModel /
    AutoModelForImageClassification (llmkd registered the classes: no remote code): same outputs, same alpha/beta."""
    model = tiny_student(BACKBONES[name](), alpha=0.35, beta=1.25).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(pixel_values=pixels)
    model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors") and not os.path.exists(tmp_path / "pytorch_model.bin")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llmkd_dual_head" and saved["alpha"] == 0.35 and saved["beta"] == 1.25
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DualHeadConfig)
    for auto_class in (AutoModel, AutoModelForImageClassification):
        loaded = auto_class.from_pretrained(tmp_path, trust_remote_code=False).eval()
        assert type(loaded) is DualHeadModel
        assert (loaded.config.alpha, loaded.config.beta) == (0.35, 1.25)
        assert loaded.config.id2label == dict(enumerate(CLASS_NAMES))
        with torch.no_grad():
            got = loaded(pixel_values=pixels)
        for key in ("logits", "ce_logits", "kd_logits"):
            torch.testing.assert_close(got[key], expected[key])


def test_alpha_beta_survive_save_and_load_after_being_set(tmp_path):
    model = tiny_student()
    assert (model.config.alpha, model.config.beta) == (0.4, 0.5)  # the paper's no-validation defaults
    model.set_inference_weights(0.85, 4.0)
    model.save_pretrained(tmp_path)
    loaded = DualHeadModel.from_pretrained(tmp_path)
    assert (loaded.config.alpha, loaded.config.beta) == (0.85, 4.0)


def test_from_backbone_loads_the_backbone_weights(tmp_path):
    torch.manual_seed(0)
    backbone = ResNetModel(tiny_resnet_config())
    backbone.save_pretrained(tmp_path / "backbone")
    model = DualHeadModel.from_backbone(str(tmp_path / "backbone"), id2label=dict(enumerate(CLASS_NAMES)))
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)
    assert model.config.num_labels == len(CLASS_NAMES) and model.config.feature_size == 16
    with pytest.raises(ValueError, match="needs num_labels"):
        DualHeadModel.from_backbone(str(tmp_path / "backbone"))


def test_from_backbone_takes_the_vision_tower_of_a_clip_checkpoint(tmp_path):
    from test_dho_support import tiny_clip, word_tokenizer

    clip = tiny_clip(word_tokenizer())
    clip.save_pretrained(tmp_path / "clip")
    model = DualHeadModel.from_backbone(str(tmp_path / "clip"), num_labels=3)
    assert type(model.backbone).__name__ == "CLIPVisionModel"
    for key, value in clip.vision_model.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value)


def test_feature_pooling_choices():
    vit = tiny_student(tiny_vit_config(), feature_pooling="cls").eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        hidden = vit.backbone(pixel_values=pixels).last_hidden_state
        torch.testing.assert_close(vit(pixel_values=pixels).features, hidden[:, 0])
    mean = tiny_student(tiny_vit_config(), feature_pooling="mean").eval()
    mean.load_state_dict(vit.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(mean(pixel_values=pixels).features, hidden.mean(1))
    with pytest.raises(ValueError, match="needs a \\(B, S, D\\) token output"):
        tiny_student(tiny_resnet_config(), feature_pooling="cls")
    with pytest.raises(ValueError, match="feature_pooling='nope'"):
        DualHeadConfig(backbone_config=tiny_resnet_config(), feature_pooling="nope")


def test_serves_as_an_image_classification_pipeline(tmp_path):
    from PIL import Image
    from transformers import pipeline

    model = tiny_student(alpha=0.6, beta=2.0).eval()
    model.save_pretrained(tmp_path)
    student_processor().save_pretrained(tmp_path)
    classify = pipeline("image-classification", model=str(tmp_path), device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).convert("RGB")
    scores = classify(image, top_k=len(CLASS_NAMES))
    pixels = student_processor()(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        p = model(pixel_values=pixels).logits.exp()[0]
    assert {s["label"] for s in scores} == set(CLASS_NAMES)
    for item in scores:
        assert item["score"] == pytest.approx(p[CLASS_NAMES.index(item["label"])].item(), rel=1e-4)


def test_gradient_checkpointing_is_the_backbones():
    model = tiny_student(tiny_vit_config()).train()
    pixels = torch.randn(2, 3, 16, 16)
    plain = torch.autograd.grad(model(pixel_values=pixels).logits.sum(), model.backbone.embeddings.cls_token)[0]
    model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.backbone.layers)
    checkpointed = torch.autograd.grad(model(pixel_values=pixels).logits.sum(), model.backbone.embeddings.cls_token)[0]
    torch.testing.assert_close(checkpointed, plain)
