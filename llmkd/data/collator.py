"""Batching tokenized rows (from :func:`llmkd.data.prepare_dataset`) into padded tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Number

import numpy as np
import torch
from trl.trainer.utils import pad

from ..constants import IGNORE_INDEX

PADDING_SIDES = ("right", "left")
#: Batch fields that describe images and must reach student and teacher unchanged (kept through tokenization,
#: stacked by the collator, hashed into a teacher cache's row fingerprints).
IMAGE_FIELDS = ("pixel_values", "image_sizes", "image_grid_thw", "pixel_attention_mask", "image_attention_mask")


@dataclass
class DistillDataCollator:
    """Pad rows of ``input_ids`` / ``attention_mask`` / ``labels`` into a batch, and stack any other numeric field.

    Args:
        pad_token_id: the id written into padded ``input_ids`` positions (the tokenizer's ``pad_token_id``).
        label_pad_token_id: the label of padded positions (ignored by the loss).
        pad_to_multiple_of: round the padded length ``T`` up to a multiple of this (e.g. 8 for tensor cores).
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        padded_columns: ``{column: padding value}`` of further columns holding one sequence of ints per row, of
            any length, padded on ``padding_side`` to the longest in the batch (a cross-tokenizer run's teacher
            tokens and spans).
        on_batch: called with each finished batch, as it is built (a served teacher requests the batch's scores
            here, ahead of the step that trains on it); None: nothing.

    Each feature is a dict with ``input_ids`` (``T_i`` ints) and optionally ``attention_mask`` (``T_i``, default all
    ones) and ``labels`` (``T_i``, unshifted; default ``input_ids`` with ``-100`` where ``attention_mask`` is 0).
    Any other key whose values are all numeric (tensors, arrays, numbers or nested lists of numbers) of one shape
    ``S`` is stacked into ``(B, *S)`` unchanged, e.g. ``pixel_values`` ``(3, H, W)`` -> ``(B, 3, H, W)``; keys with
    non-numeric values (strings, ``None``, dicts) are dropped.

    Returns:
        ``{"input_ids": (B, T) long, "attention_mask": (B, T) long, "labels": (B, T) long, **stacked}``.
    """

    pad_token_id: int
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"
    padded_columns: dict[str, int] | None = None
    on_batch: Callable[[dict], None] | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError(
                "pad_token_id is None: the tokenizer has no pad token. Set one, e.g. tokenizer.pad_token = "
                "tokenizer.eos_token, and pass tokenizer.pad_token_id."
            )
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of <= 0:
            raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {self.pad_to_multiple_of}.")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("DistillDataCollator got an empty list of features: a batch needs at least one row.")
        for i, feature in enumerate(features):
            if "input_ids" not in feature:
                raise ValueError(
                    f"Feature {i} has no 'input_ids' (keys: {sorted(feature)}). Tokenize the dataset first with "
                    "llmkd.data.prepare_dataset."
                )
        input_ids = [_as_long(f["input_ids"], "input_ids") for f in features]
        attention_mask = [
            torch.ones_like(ids) if f.get("attention_mask") is None else _as_long(f["attention_mask"], "attention_mask")
            for f, ids in zip(features, input_ids)
        ]
        labels = []
        for f, ids, mask in zip(features, input_ids, attention_mask):
            if f.get("labels") is not None:
                labels.append(_as_long(f["labels"], "labels"))
            else:
                labels.append(ids.masked_fill(mask == 0, self.label_pad_token_id))
        for name, column in (("attention_mask", attention_mask), ("labels", labels)):
            for i, (values, ids) in enumerate(zip(column, input_ids)):
                if values.shape != ids.shape:
                    raise ValueError(
                        f"Feature {i}: '{name}' has shape {tuple(values.shape)} but 'input_ids' has "
                        f"{tuple(ids.shape)}; they must align token for token."
                    )

        kwargs = {"padding_side": self.padding_side, "pad_to_multiple_of": self.pad_to_multiple_of}
        batch = {
            "input_ids": pad(input_ids, padding_value=self.pad_token_id, **kwargs),
            "attention_mask": pad(attention_mask, padding_value=0, **kwargs),
            "labels": pad(labels, padding_value=self.label_pad_token_id, **kwargs),
        }
        for key, value in (self.padded_columns or {}).items():
            if key in features[0]:
                batch[key] = pad([_as_long(f[key], key) for f in features], padding_value=value, **kwargs)
        for key in features[0]:
            if key in batch:
                continue
            values = [f.get(key) for f in features]
            tensors = [_as_numeric_tensor(v, key) for v in values]
            if any(t is None for t in tensors):
                continue  # strings, None, dicts: nothing a model takes as a tensor
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) > 1:
                raise ValueError(
                    f"Cannot stack '{key}': its values have different shapes {sorted(shapes)}. Bring them to one "
                    "shape in the dataset (resize or pad), drop the column, or use a collator that knows how to "
                    "combine them."
                )
            dtype = tensors[0].dtype
            for t in tensors[1:]:
                dtype = torch.promote_types(dtype, t.dtype)
            batch[key] = torch.stack([t.to(dtype) for t in tensors])
        if self.on_batch is not None:
            self.on_batch(batch)
        return batch


def _as_long(values, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.ndim != 1:
        raise ValueError(f"'{name}' must be one sequence of ints per row, got shape {tuple(tensor.shape)}.")
    return tensor.long()


def _as_numeric_tensor(value, key: str) -> torch.Tensor | None:
    """``value`` as a tensor when it is numeric (a tensor, a numeric array, a number, nested lists of numbers);
    ``None`` otherwise."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value) if value.dtype.kind in "biuf" else None
    if isinstance(value, (bool, Number)) and not isinstance(value, complex):
        return torch.tensor(value)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if value and all(isinstance(v, torch.Tensor) for v in value):
            if len({v.shape for v in value}) > 1:
                raise ValueError(
                    f"Cannot stack '{key}': one row holds tensors of shapes {sorted({tuple(v.shape) for v in value})}."
                    " Bring them to one shape in the dataset, or drop the column."
                )
            return torch.stack(list(value))
        try:
            return torch.tensor(value)
        except (TypeError, ValueError, RuntimeError):
            return None
    return None
