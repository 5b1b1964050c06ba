"""Generating completions for on-policy distillation (docs/ALGORITHMS.md section 5): turning a training batch's
prompts into generation inputs and generated tokens back into training rows (:mod:`.completions`), and sampling
with transformers ``generate`` (:mod:`.sampling`) or vLLM (:mod:`.vllm_sampler`, imported only when used)."""

from .completions import completion_batch, left_padded_prompts
from .sampling import SamplingSettings, sample_completions
from .vllm_sampler import VLLMSampler, VLLMUnavailableError

__all__ = ["SamplingSettings", "VLLMSampler", "VLLMUnavailableError", "completion_batch", "left_padded_prompts",
           "sample_completions"]
