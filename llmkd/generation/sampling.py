"""Sampling completions with transformers ``generate`` (the default backend of on-policy distillation).

Sampling is seeded per call (the caller derives the seed from the run's seed and the position of the batch in the
run), inside a forked RNG: the global RNG the Trainer saves and restores is left as it was, and a resumed run
samples the same completions as the uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are sampled (TRL's field names).

    Attributes:
        max_completion_length: the most new tokens per completion.
        temperature: the sampling temperature (> 0).
        top_p: nucleus sampling (1.0: off).
        top_k: keep the k most likely tokens (0: off).
        min_p: drop tokens below ``min_p`` times the most likely token's probability (None: off).
        repetition_penalty: transformers' repetition penalty (1.0: off).
        generation_kwargs: any other ``GenerationConfig`` field; it overrides the ones above.
    """

    max_completion_length: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {self.max_completion_length}.")
        if self.temperature <= 0:
            raise ValueError(f"the sampling temperature must be > 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}.")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")

    def generate_kwargs(self) -> dict:
        """The keyword arguments of ``model.generate`` these settings give."""
        kwargs = {"do_sample": True, "max_new_tokens": self.max_completion_length, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "repetition_penalty": self.repetition_penalty}
        if self.min_p is not None:
            kwargs["min_p"] = self.min_p
        return {**kwargs, **self.generation_kwargs}


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, settings: SamplingSettings, *,
                       seed: int, eos_token_id: int | None, pad_token_id: int,
                       extra_inputs: dict | None = None) -> torch.Tensor:
    """``(B, L)`` long, ``L <= max_completion_length``: the tokens ``model`` samples after each left-padded prompt
    (``prompt_ids`` / ``prompt_mask`` ``(B, P)``), in eval mode (no dropout), seeded by ``seed``; rows that ended
    early are padded after their EOS. ``extra_inputs`` (e.g. a VLM's ``pixel_values``, one entry per row) go to
    ``generate`` as they are. The model's training mode and the global RNG are left as they were."""
    devices = [prompt_ids.device] if prompt_ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, eos_token_id=eos_token_id,
                                    pad_token_id=pad_token_id, **(extra_inputs or {}),
                                    **settings.generate_kwargs())
        finally:
            model.train(was_training)
    return output[:, prompt_ids.shape[1]:]
