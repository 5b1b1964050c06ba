"""The sampled-token objective of on-policy distillation (docs/ALGORITHMS.md section 5): a policy gradient on the
tokens the student sampled, with the per-token advantage ``A_i = -(log q(y_i) - log p(y_i))``.

Notation: ``y_i`` is the sampled token of position i, ``q = softmax(z_s / T)`` the student and
``p = softmax(z_t / T)`` the teacher at that position. ``A_i`` is detached (discount 0: each token is its own
reward) and the gradient of one token is

    grad_i = -A_i * grad log q(y_i) = (log q(y_i) - log p(y_i)) * grad log q(y_i),

the score-function estimate of the gradient of the reverse KL ``KL(q || p)`` from one sample (MiniLLM's reverse-KL
policy gradient without its baseline and length normalisation; the "on-policy distillation" of Thinking Machines,
2025). It needs only the teacher's log-probability of the sampled token, which is what a served teacher returning
sampled-token log-probabilities gives.

The value returned per token is ``log q(y_i) - log p(y_i)``, the one-sample estimate of ``KL(q || p)`` (logged as
the kd loss), while its gradient is the policy gradient above: the loss is written as
``k1 + (-A * log q) - stopgrad(-A * log q)``. The importance ratio is 1: the samples are assumed to come from the
student being trained (transformers ``generate`` with the current weights). ``temperature`` softens both sides as
for the divergences; the estimate is unbiased for the sampling distribution only when the completions were
sampled at that temperature.
"""

from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX


class SampledTokenLoss:
    """The sampled-token objective as a token loss of the chunked engine.

    Called as ``loss(student_logits (n, V), teacher_logits (n, V), labels (n,))`` it returns ``(n,)`` float32 (zero
    where ``labels == IGNORE_INDEX``); ``needs_labels`` tells the engine to pass the sampled tokens. No ``T^2``
    factor: this is a policy gradient, not a divergence of softened distributions.
    """

    needs_labels = True

    def __init__(self, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("The sampled-token objective needs the sampled tokens (labels): it scores y_i, not a "
                             "whole distribution.")
        valid = labels != IGNORE_INDEX
        index = labels.clamp_min(0).unsqueeze(-1)  # (n, 1)
        log_q = torch.log_softmax(student_logits.float() / self.temperature, dim=-1).gather(-1, index).squeeze(-1)
        with torch.no_grad():
            log_p = torch.log_softmax(teacher_logits.float() / self.temperature, dim=-1).gather(-1, index).squeeze(-1)
        advantage = (log_p - log_q).detach()  # A_i = -(log q - log p)
        surrogate = -advantage * log_q
        per_token = (log_q - log_p).detach() + surrogate - surrogate.detach()
        return torch.where(valid, per_token, torch.zeros_like(per_token))

    def __repr__(self) -> str:
        return f"SampledTokenLoss(temperature={self.temperature})"
