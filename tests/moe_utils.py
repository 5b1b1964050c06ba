"""Tiny dense and MoE models for the MoE / preference tests (built from configs, nothing downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from utils import tiny_llama

IMAGE_TOKEN = 320  # one id past make_tokenizer()'s vocabulary, as in test_vlm.py
PATCHES = 4  # (8 / 4) ** 2 patches, CLS dropped


def tiny_dense(family: str, vocab: int, hidden: int = 32, layers: int = 3, seed: int = 0):
    """A tiny dense causal LM of ``family`` (llama, qwen2, qwen3), eval mode."""
    if family == "llama":
        return tiny_llama(vocab, hidden=hidden, layers=layers, seed=seed).eval()
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=False)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
        with torch.no_grad():  # non-zero q/k/v biases, so that dropping them would show
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
        return model.eval()
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=hidden // 4)).eval()
    raise ValueError(family)


def tiny_llava(vocab: int, hidden: int, seed: int, layers: int = 2, image_token_id: int = IMAGE_TOKEN
               ) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def image_batch(n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of n LLaVA inputs: 2 text tokens, 4 image tokens, 4 text tokens; 8x8 random images."""
    generator = torch.Generator().manual_seed(seed)
    ids = [[7, 8] + [IMAGE_TOKEN] * PATCHES + [9, 10 + i, 11, 12] for i in range(n)]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.ones(n, len(ids[0]), dtype=torch.long),
            "pixel_values": torch.randn(n, 3, 8, 8, generator=generator)}
