"""Generating completions for on-policy distillation (docs/ALGORITHMS.md section 5): turning a training batch's
prompts into generation inputs and generated tokens back into training rows (:mod:`.completions`), and sampling
with transformers ``generate`` (:mod:`.sampling`)."""

from .completions import completion_batch, left_padded_prompts
from .sampling import SamplingSettings, sample_completions

__all__ = ["SamplingSettings", "completion_batch", "left_padded_prompts", "sample_completions"]
