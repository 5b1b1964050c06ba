"""Loading a Trainer checkpoint's weights back into a model whose saved layout differs from its own."""

from __future__ import annotations

import json
import logging
import os

from torch import nn
from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def _saved_weight_names(folder: str) -> set[str] | None:
    """The tensor names of a checkpoint's safetensors weights (None: no safetensors weights there)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as handle:
            return set(json.load(handle)["weight_map"])
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        return None
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return set(handle.keys())


def reload_converted_checkpoint(model: nn.Module, folder: str) -> bool:
    """Load a Trainer checkpoint's weights into ``model`` through ``from_pretrained`` when the checkpoint's tensor
    names are not the model's; returns whether it did.

    transformers saves fused MoE experts (``experts.gate_up_proj`` (E, 2I, d), ``experts.down_proj``) in the
    per-expert layout of the original checkpoints (``experts.{e}.gate_proj.weight``, ...), which
    ``from_pretrained`` converts back, but ``Trainer._load_from_checkpoint`` loads the file as it is: on resume the
    experts silently kept their initial weights (a warning only) and the run diverged from the uninterrupted one.
    """
    saved = _saved_weight_names(folder)
    if saved is None or not isinstance(model, PreTrainedModel) or saved <= set(model.state_dict()):
        return False
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(folder, dtype=dtype)
    model.load_state_dict(loaded.state_dict(), strict=True)
    logger.info("Loaded %s through from_pretrained (its weights are saved in another layout, e.g. per-expert MoE "
                "experts).", folder)
    return True
