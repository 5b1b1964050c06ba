"""Generating completions for on-policy distillation (docs/ALGORITHMS.md section 5): turning a training batch's
prompts into generation inputs, and generated tokens back into training rows (:mod:`.completions`)."""

from .completions import completion_batch, left_padded_prompts

__all__ = ["completion_batch", "left_padded_prompts"]
