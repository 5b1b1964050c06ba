"""Sparse upcycling: turn a dense decoder into a standard transformers MoE model (docs/ALGORITHMS.md section 3).

Every ``every``-th decoder layer (0, every, 2*every, ...) gets ``num_experts`` experts, each an exact copy of
that layer's dense FFN, and a new router ``Linear(d, E)`` without bias; the other layers keep their dense FFN.
Routing is top-``top_k`` with the selected gates renormalised to sum to 1, so at initialisation the MoE model
computes the dense model's function exactly (identical experts, gates summing to 1), whatever the router says.

The result is a model of a family transformers ships, saved with ``save_pretrained`` and loaded back with
``AutoModelForCausalLM`` (or the VLM's class) without custom code:

================  ====================  ===========================================================
dense family      MoE family            how the layers map
================  ====================  ===========================================================
Qwen3             Qwen3-MoE             same attention (q/k norms); ``mlp_only_layers`` = dense layers
Qwen2             Qwen2-MoE             same attention (q/k/v biases); an all-zero shared expert of width 1
Llama             Qwen2-MoE             ``qkv_bias=False`` = Llama attention; the same zero shared expert
================  ====================  ===========================================================

Qwen2-MoE always has a gated shared expert. Upcycling gives it width 1 (``shared_expert_intermediate_size=1``)
and all-zero weights, so it adds exactly zero; the MoE trainers keep it frozen (at zero), so the model stays the
E-expert MoE of the paper. Width 0 would be cleaner but DeepSpeed ZeRO-3 cannot gather zero-element parameters.
LLaVA-style VLMs are upcycled in their language model, the vision tower and projector are copied unchanged.
"""

from __future__ import annotations

import copy
import logging

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, Qwen2MoeConfig, Qwen3MoeConfig

logger = logging.getLogger(__name__)

SUPPORTED_DENSE = ("llama", "qwen2", "qwen3")
MOE_MODEL_TYPES = ("qwen2_moe", "qwen3_moe")


def moe_layer_indices(num_layers: int, every: int) -> list[int]:
    """The decoder layers that become sparse: 0, every, 2*every, ..."""
    if every < 1:
        raise ValueError(f"every must be >= 1 (1: every layer sparse, 2: layers 0, 2, 4, ...), got {every}.")
    return list(range(0, num_layers, every))


def _shared_fields(dense: PretrainedConfig) -> dict:
    """The fields a Qwen2-MoE / Qwen3-MoE config takes over unchanged from a Llama / Qwen2 / Qwen3 config."""
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
             "tie_word_embeddings", "rope_parameters", "attention_dropout", "pad_token_id", "bos_token_id",
             "eos_token_id")
    fields = {name: copy.deepcopy(getattr(dense, name)) for name in names if hasattr(dense, name)}
    if fields.get("num_key_value_heads") is None:
        fields["num_key_value_heads"] = dense.num_attention_heads
    for name in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
        if getattr(dense, name, None) is not None:
            fields[name] = copy.deepcopy(getattr(dense, name))
    return fields


def moe_config_for(dense: PretrainedConfig, num_experts: int = 4, top_k: int = 2, every: int = 2,
                   aux_loss_coef: float = 0.01) -> PretrainedConfig:
    """The MoE text config that holds ``dense`` (a Llama / Qwen2 / Qwen3 text config) upcycled."""
    model_type = getattr(dense, "model_type", None)
    if model_type not in SUPPORTED_DENSE:
        raise ValueError(
            f"upcycle_to_moe supports dense decoders of the families {SUPPORTED_DENSE} (as a causal LM or as the "
            f"language model of a LLaVA-style VLM); got model_type {model_type!r}. Convert the model to one of these "
            "families first, or upcycle it with your own mapping."
        )
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}.")
    if getattr(dense, "mlp_bias", False):
        raise ValueError("The dense model's FFN has biases (mlp_bias=True); transformers' MoE experts have none, "
                         "so the upcycled model could not compute the same function.")
    if model_type == "llama" and getattr(dense, "attention_bias", False):
        raise ValueError("This Llama model has attention biases (attention_bias=True, o_proj included); Qwen2-MoE "
                         "attention has no o_proj bias, so it cannot be upcycled exactly.")
    if model_type == "llama" and getattr(dense, "pretraining_tp", 1) not in (1, None):
        raise ValueError("pretraining_tp > 1 is not supported: set config.pretraining_tp = 1 first.")
    sparse = moe_layer_indices(dense.num_hidden_layers, every)
    dense_layers = [i for i in range(dense.num_hidden_layers) if i not in sparse]
    fields = _shared_fields(dense)
    moe_fields = dict(
        num_experts=num_experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=dense_layers, moe_intermediate_size=dense.intermediate_size,
        intermediate_size=dense.intermediate_size, router_aux_loss_coef=aux_loss_coef, output_router_logits=False,
    )
    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    if model_type == "qwen3":
        config = Qwen3MoeConfig(**fields, **moe_fields, attention_bias=getattr(dense, "attention_bias", False),
                                head_dim=head_dim)
    else:
        config = Qwen2MoeConfig(**fields, **moe_fields, qkv_bias=(model_type == "qwen2"),
                                shared_expert_intermediate_size=1)
        config.head_dim = head_dim
    config.dtype = getattr(dense, "dtype", None)
    return config


def _text_config(model: PreTrainedModel) -> PretrainedConfig:
    return model.config.get_text_config()


def _is_vlm(model: PreTrainedModel) -> bool:
    return _text_config(model) is not model.config


def _dense_layer_prefix(model: PreTrainedModel) -> str:
    """The state-dict prefix of the decoder layers: 'model.layers.' or 'model.language_model.layers.'."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for name, module in model.named_modules():
        if decoder is not None and module is decoder and hasattr(module, "layers"):
            return f"{name}.layers." if name else "layers."
    names = [name for name, _ in model.named_parameters() if ".layers.0.mlp.gate_proj." in name]
    if not names:
        raise ValueError(f"Cannot find the decoder layers of {type(model).__name__}.")
    return names[0].split("layers.0.")[0] + "layers."


def upcycle_to_moe(model: PreTrainedModel, num_experts: int = 4, top_k: int = 2, every: int = 2,
                   aux_loss_coef: float = 0.01, router_init_std: float | None = None,
                   seed: int = 0) -> PreTrainedModel:
    """Upcycle a dense causal LM (Llama, Qwen2, Qwen3) or a LLaVA-style VLM into a sparse MoE model.

    Args:
        model: the dense model (not partitioned: under DeepSpeed ZeRO-3 upcycle before training, e.g. with
            ``llmkd upcycle``). It is left unchanged.
        num_experts: E, experts per sparse layer, each an exact copy of the layer's dense FFN.
        top_k: experts per token; the selected gates are renormalised to sum to 1.
        every: layers 0, every, 2*every, ... become sparse (docs/ALGORITHMS.md: every other layer, ``every=2``).
        aux_loss_coef: the load-balancing loss coefficient written to the config (``router_aux_loss_coef``).
        router_init_std: std of the routers' normal initialisation (default: the config's initializer_range).
        seed: seed of the router initialisation.

    Returns:
        A new model of a standard transformers MoE family (see the module docstring), same dtype and device, whose
        logits equal the dense model's at initialisation.
    """
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError("The model's parameters are partitioned by DeepSpeed ZeRO-3; upcycle the dense model before "
                         "training (`llmkd upcycle --model PATH --output_dir DIR`) and train the saved MoE model.")
    dense_text = _text_config(model)
    moe_text = moe_config_for(dense_text, num_experts, top_k, every, aux_loss_coef)
    if _is_vlm(model):
        config = copy.deepcopy(model.config)
        config.text_config = moe_text
    else:
        config = moe_text
    parameter = next(model.parameters())
    if _is_vlm(model):
        moe = type(model)._from_config(config, dtype=parameter.dtype)
    else:
        moe = AutoModelForCausalLM.from_config(config, dtype=parameter.dtype)
    moe.to(parameter.device)

    prefix = _dense_layer_prefix(model)
    sparse = set(moe_layer_indices(dense_text.num_hidden_layers, every))
    source = model.state_dict()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    std = dense_text.initializer_range if router_init_std is None else router_init_std
    target = {}
    for name, tensor in moe.state_dict().items():
        target[name] = _upcycled_tensor(name, tensor, source, prefix, sparse, num_experts, std, generator)
    moe.load_state_dict(target, strict=True)
    moe.generation_config = copy.deepcopy(model.generation_config) if model.generation_config else None
    moe.train(model.training)
    logger.info("Upcycled %s to %s: %d of %d layers sparse, %d experts, top-%d.", type(model).__name__,
                type(moe).__name__, len(sparse), dense_text.num_hidden_layers, num_experts, top_k)
    return moe


def _upcycled_tensor(name: str, like: torch.Tensor, source: dict, prefix: str, sparse: set[int], num_experts: int,
                     std: float, generator: torch.Generator) -> torch.Tensor:
    """The value of the MoE model's parameter/buffer ``name`` (shape of ``like``) built from the dense state."""
    if name in source:
        value = source[name]
        if value.shape != like.shape:
            raise RuntimeError(f"{name}: dense shape {tuple(value.shape)} vs MoE shape {tuple(like.shape)}.")
        return value.detach().clone()
    if not name.startswith(prefix):
        raise RuntimeError(f"The MoE parameter {name} has no counterpart in the dense model.")
    layer = int(name[len(prefix):].split(".")[0])
    layer_prefix = f"{prefix}{layer}."
    local = name[len(layer_prefix):]
    if layer not in sparse:
        raise RuntimeError(f"{name}: a dense layer's parameter missing from the dense model.")
    dense_mlp = {key: source[layer_prefix + "mlp." + key] for key in ("gate_proj.weight", "up_proj.weight",
                                                                       "down_proj.weight")}
    if local == "mlp.experts.gate_up_proj":  # (E, 2I, d): [gate; up] per expert
        fused = torch.cat([dense_mlp["gate_proj.weight"], dense_mlp["up_proj.weight"]], dim=0)
        return fused.unsqueeze(0).expand(num_experts, *fused.shape).clone().to(like.dtype)
    if local == "mlp.experts.down_proj":  # (E, d, I)
        down = dense_mlp["down_proj.weight"]
        return down.unsqueeze(0).expand(num_experts, *down.shape).clone().to(like.dtype)
    if local == "mlp.gate.weight":  # the router (E, d)
        router = torch.randn(like.shape, generator=generator, dtype=torch.float32) * std
        return router.to(device=like.device, dtype=like.dtype)
    if local.startswith("mlp.shared_expert"):  # Qwen2-MoE's shared expert and its gate: all zero (adds 0)
        return torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    raise RuntimeError(f"The MoE parameter {name} has no counterpart in the dense model.")
