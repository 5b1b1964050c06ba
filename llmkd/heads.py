"""Output heads of causal LMs: finding them, their logit post-processing, and running a loss in their place.

The chunked engine needs the final hidden states and the head's weight, not the logits. Rather than re-implement
each architecture's forward, llmkd runs the model's own forward (so DDP, DeepSpeed ZeRO-3 and FSDP hooks all fire)
with the output head's ``forward`` temporarily replaced (:func:`intercept_head`): for the student it runs the
chunked loss on the hidden states it receives, with the head's parameters gathered by ZeRO-3's hooks as in any
module forward; for the teacher it returns the hidden states themselves. Logit post-processing applied by the
model *after* the head (Gemma's final soft-capping, Cohere's logit scale, Granite's logit scaling) is switched
off for that call and applied by the engine instead (:func:`logit_transform_for`); anything else that alters the
head output is detected and refused, so the objective never changes silently.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from .losses.head import LogitTransform


class UnsupportedModelError(ValueError):
    """The model post-processes its logits in a way llmkd cannot reproduce exactly."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / accelerate wrappers and a peft wrapper, returning the transformers model."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and model.__class__.__name__.startswith("Peft"):
        model = get_base()
    return model


def output_head(model: nn.Module) -> nn.Module:
    """The module producing logits (``lm_head``), found through ``get_output_embeddings``."""
    base = unwrap_model(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise UnsupportedModelError(
            f"{type(base).__name__} has no output head reachable through get_output_embeddings(); llmkd's "
            "token-level distillation needs a causal LM (AutoModelForCausalLM) or a vision-language model with a "
            "language-model head."
        )
    return head


def head_rows(model: nn.Module) -> int:
    """The number of rows (scored tokens) of ``model``'s output head, also when ZeRO-3 partitions it."""
    weight = output_head(model).weight
    return int(weight.ds_shape[0] if hasattr(weight, "ds_id") else weight.shape[0])


def _text_config(model: nn.Module):
    config = unwrap_model(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# (config attribute, neutral value, how it enters the transform)
_CONFIG_POSTPROCESSING = (
    ("final_logit_softcapping", None, "softcap"),
    ("logits_scaling", 1.0, "divide"),
)
# (model attribute, neutral value): Cohere copies config.logit_scale onto the model at init.
_MODEL_POSTPROCESSING = (("logit_scale", 1.0),)


def logit_transform_for(model: nn.Module) -> LogitTransform:
    """The post-processing the model applies to its head's output, as a :class:`LogitTransform`."""
    config = _text_config(model)
    scale, softcap = 1.0, None
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        softcap = float(cap)
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None and float(divisor) != 1.0:
        scale /= float(divisor)
    for module in _modules_with_logit_scale(model):
        value = getattr(module, "logit_scale")
        if isinstance(value, (int, float)) and float(value) != 1.0:
            scale *= float(value)
    return LogitTransform(scale=scale, softcap=softcap)


def _modules_with_logit_scale(model: nn.Module):
    base = unwrap_model(model)
    return [m for m in base.modules() if isinstance(getattr(m, "logit_scale", None), (int, float))]


@contextlib.contextmanager
def neutral_postprocessing(model: nn.Module) -> Iterator[None]:
    """Switch off, for the duration, the logit post-processing that :func:`logit_transform_for` reproduces."""
    configs = []
    base = unwrap_model(model)
    for config in {id(c): c for c in (base.config, _text_config(model))}.values():
        configs.append(config)
    saved: list[tuple[object, str, object]] = []
    try:
        for config in configs:
            for name, neutral, _ in _CONFIG_POSTPROCESSING:
                if getattr(config, name, None) is not None:
                    saved.append((config, name, getattr(config, name)))
                    setattr(config, name, neutral)
        for module in _modules_with_logit_scale(model):
            saved.append((module, "logit_scale", module.logit_scale))
            module.logit_scale = 1.0
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


@contextlib.contextmanager
def intercept_head(model: nn.Module, replacement: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the output head's forward with ``replacement(hidden_states (B, S, H)) -> anything`` for one call.

    The head module is still *called* (so its hooks, e.g. ZeRO-3 parameter gathering, run); only its computation
    is replaced. Post-processing after the head is neutralised (see :func:`neutral_postprocessing`).
    """
    head = output_head(model)
    had_instance_forward = "forward" in head.__dict__
    previous = head.__dict__.get("forward")
    head.forward = replacement
    try:
        with neutral_postprocessing(model):
            yield
    finally:
        if had_instance_forward:
            head.forward = previous
        else:
            del head.forward


def head_parameters(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's (weight ``(V, H)``, bias ``(V,)`` or None)."""
    head = output_head(model)
    return head.weight, getattr(head, "bias", None)


@torch.no_grad()
def verify_head_reproduction(model: nn.Module, input_ids: torch.Tensor, **extra_inputs) -> None:
    """Check that ``transform(head(final_hidden))`` reproduces the model's logits on a small input, or raise.

    Run once before training on an unsharded model: this is what guarantees the chunked path optimises the very
    objective the model defines, whatever post-processing its architecture applies.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=input_ids, **extra_inputs).logits
        # the model post-processes in its own dtype (a soft-cap's divide, tanh and multiply each round), llmkd in
        # float32: in bfloat16 the two differ by a few units of its 8-bit mantissa, not by 1e-4
        tolerance = max(1e-4, 2 * torch.finfo(logits.dtype).eps)
        reference = logits.float()
        captured: list[torch.Tensor] = []

        def capture(hidden_states: torch.Tensor) -> torch.Tensor:
            captured.append(hidden_states)
            return hidden_states

        with intercept_head(model, capture):
            model(input_ids=input_ids, **extra_inputs)
        weight, bias = head_parameters(model)
        head_out = torch.nn.functional.linear(captured[0], weight, bias).float()
        reproduced = logit_transform_for(model)(head_out)
    finally:
        model.train(was_training)
    if reproduced.shape != reference.shape or not torch.allclose(reproduced, reference, rtol=tolerance,
                                                                 atol=tolerance):
        error = (reproduced - reference).abs().max().item() if reproduced.shape == reference.shape else "shape"
        raise UnsupportedModelError(
            f"{type(unwrap_model(model)).__name__} post-processes its logits in a way llmkd does not reproduce "
            f"(max difference {error}); distilling it on the chunked path would change the objective. Set "
            "use_chunked_loss=False to use the model's own logits, or open an issue naming the architecture."
        )
