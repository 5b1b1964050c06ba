"""An output head as the losses see it: its weight, its bias and the model's own post-processing of the logits.

``logits = transform(hidden @ weight[:V].T + bias[:V])`` in float32. The trainers read a model's head with
:func:`llmkd.heads.output_head` and its post-processing (:class:`LogitTransform`) with
:func:`llmkd.heads.logit_transform_for`; the chunked engine projects one chunk of tokens at a time with
:func:`project` / :func:`project_into`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LogitTransform:
    """A model's post-processing of its head output: ``z = cap * tanh(scale * x / cap)`` (no tanh if cap is None).

    ``scale`` covers Cohere's ``logit_scale`` (multiply) and Granite's ``logits_scaling`` (divide, scale = 1/s);
    ``softcap`` covers Gemma 2/3's ``final_logit_softcapping``.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


IDENTITY = LogitTransform()


@dataclass(frozen=True)
class OutputHead:
    """A model's output head as the engine takes it: ``weight`` ``(V_model, H)``, ``bias`` ``(V_model,)`` or None,
    and its :class:`LogitTransform`. Gradients flow into ``weight`` / ``bias`` where they require grad."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = IDENTITY

    @property
    def rows(self) -> int:
        """``V_model``: the token ids the head scores."""
        return self.weight.shape[0]


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform,
            vocab_size: int) -> torch.Tensor:
    """Logits of one chunk in float32: ``transform(hidden @ weight[:vocab_size].T + bias[:vocab_size])``.

    hidden ``(n, H)``, weight ``(V_model, H)`` -> ``(n, vocab_size)``.
    """
    logits = F.linear(hidden, weight[:vocab_size], None if bias is None else bias[:vocab_size])
    return transform(logits.float())


def project_into(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, vocab_size: int,
                 out: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight[:vocab_size].T (+ bias)`` in float32 (no transform), written into ``out`` when the head is
    float32 (no allocation), else computed in the head's dtype and cast."""
    weight = weight[:vocab_size]
    bias = None if bias is None else bias[:vocab_size]
    if weight.dtype == torch.float32 and hidden.dtype == torch.float32:
        if bias is None:
            return torch.matmul(hidden, weight.t(), out=out)
        return torch.addmm(bias, hidden, weight.t(), out=out)
    return F.linear(hidden, weight, bias).float()
