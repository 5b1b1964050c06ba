"""upcycle_to_moe: a dense Llama / Qwen2 / Qwen3 (or a LLaVA's language model) becomes a standard transformers MoE
model computing the same function at initialisation, which saves and loads back without custom code."""

from __future__ import annotations

import pytest
import torch
from moe_utils import IMAGE_TOKEN, image_batch, tiny_dense, tiny_llava
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

from llmkd import upcycle_to_moe
from llmkd.models.moe import moe_config_for, moe_layer_indices
from llmkd.models.routing import find_routers, routing_shape

VOCAB = 64
EXPECTED = {"llama": "Qwen2MoeForCausalLM", "qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_upcycled_logits_equal_the_dense_logits(family):
    dense = tiny_dense(family, VOCAB, layers=4)
    moe = upcycle_to_moe(dense).eval()
    assert type(moe).__name__ == EXPECTED[family]
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_layers_0_2_4_are_sparse_with_exact_expert_copies(family):
    dense = tiny_dense(family, VOCAB, layers=5)
    moe = upcycle_to_moe(dense, num_experts=4, top_k=2, every=2)
    assert moe_layer_indices(5, 2) == [0, 2, 4]
    for index, layer in enumerate(moe.model.layers):
        dense_mlp = dense.model.layers[index].mlp
        if index % 2 == 0:
            experts = layer.mlp.experts
            assert experts.gate_up_proj.shape[0] == 4
            fused = torch.cat([dense_mlp.gate_proj.weight, dense_mlp.up_proj.weight])
            for e in range(4):
                assert torch.equal(experts.gate_up_proj[e], fused)
                assert torch.equal(experts.down_proj[e], dense_mlp.down_proj.weight)
            assert layer.mlp.gate.weight.shape == (4, 32) and layer.mlp.gate.weight.abs().sum() > 0
        else:
            assert not hasattr(layer.mlp, "experts")
            assert torch.equal(layer.mlp.gate_proj.weight, dense_mlp.gate_proj.weight)
    assert len(find_routers(moe)) == 3
    assert routing_shape(moe) == (4, 2)
    shared = [v for k, v in moe.state_dict().items() if "shared_expert" in k]
    assert all(not v.any() for v in shared) and (family == "qwen3") == (not shared)  # Qwen2-MoE: zero, adds 0
    assert moe.config.norm_topk_prob is True and moe.config.router_aux_loss_coef == 0.01


def test_the_selected_gates_are_renormalised_to_one():
    moe = upcycle_to_moe(tiny_dense("llama", VOCAB))
    router = moe.model.layers[0].mlp.gate
    logits, scores, indices = router(torch.randn(10, 32))
    assert indices.shape == (10, 2)
    torch.testing.assert_close(scores.sum(-1), torch.ones(10))
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(scores, probs.gather(1, indices) / probs.gather(1, indices).sum(-1, keepdim=True))


def test_equivalence_does_not_depend_on_the_router():
    """Identical experts and gates summing to one: any router gives the dense function (not only the initial one)."""
    dense = tiny_dense("qwen2", VOCAB)
    moe = upcycle_to_moe(dense, num_experts=8, top_k=3, every=1, seed=5).eval()
    with torch.no_grad():
        for _, router in find_routers(moe):
            router.weight.normal_(0, 10.0)
        torch.testing.assert_close(moe(tokens(1)).logits, dense(tokens(1)).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_save_and_load_back_with_auto_model(tmp_path, family):
    dense = tiny_dense(family, VOCAB)
    moe = upcycle_to_moe(dense).eval()
    with torch.no_grad():
        moe.model.layers[0].mlp.experts.down_proj[1].mul_(1.5)  # experts differ after training: must survive
        expected = moe(tokens()).logits
    moe.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == EXPECTED[family]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens()).logits, expected, rtol=0, atol=0)


def test_upcycled_model_generates_like_the_dense_model():
    dense = tiny_dense("llama", VOCAB)
    moe = upcycle_to_moe(dense).eval()
    prompt = tokens()[:1, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    generated = dense.generate(prompt, **kwargs)
    # The two models' logits agree to ~1e-6 (float32 rounding of the expert mixture), so their greedy choices agree
    # wherever the largest logit leads the next by more than twice that: checked on the dense model's sequence,
    # teacher-forced, so that the precondition is asserted rather than hoped for, then the generations compared.
    with torch.no_grad():
        dense_logits, moe_logits = dense(generated).logits, moe(generated).logits
    torch.testing.assert_close(moe_logits, dense_logits, rtol=0, atol=1e-5)
    steps = dense_logits[0, prompt.shape[1] - 1:-1]
    top2 = steps.topk(2, dim=-1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > 2e-5).all()), f"a near-tie in the greedy choice: {top2}"
    assert torch.equal(moe.generate(prompt, **kwargs), generated)


def test_llava_language_model_is_upcycled_and_vision_parts_copied(tmp_path):
    dense = tiny_llava(IMAGE_TOKEN + 10, hidden=32, seed=0, layers=2).eval()
    moe = upcycle_to_moe(dense).eval()
    assert isinstance(moe, LlavaForConditionalGeneration)
    assert moe.config.text_config.model_type == "qwen2_moe"
    assert len(find_routers(moe)) == 1  # layer 0 of 2
    batch = image_batch()
    with torch.no_grad():
        expected = dense(**batch).logits
        torch.testing.assert_close(moe(**batch).logits, expected, rtol=0, atol=1e-5)
        moe_state, dense_state = moe.state_dict(), dense.state_dict()
        for name, value in dense_state.items():
            if "vision_tower" in name or "multi_modal_projector" in name:
                assert torch.equal(moe_state[name], value)
    moe.save_pretrained(tmp_path)
    loaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=1e-5)


def test_the_dense_model_is_left_unchanged():
    dense = tiny_dense("llama", VOCAB)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle_to_moe(dense)
    with torch.no_grad():
        moe.model.layers[0].mlp.experts.down_proj.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_unsupported_models_are_refused_with_a_reason():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match="supports dense decoders of the families"):
        moe_config_for(GPT2Config())
    dense = tiny_dense("llama", VOCAB)
    with pytest.raises(ValueError, match="top_k must be in"):
        upcycle_to_moe(dense, num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="every must be >= 1"):
        upcycle_to_moe(dense, every=0)
    biased = tiny_dense("llama", VOCAB)
    biased.config.mlp_bias = True
    with pytest.raises(ValueError, match="mlp_bias"):
        upcycle_to_moe(biased)
