"""The distillation objective the engine computes, named: what the loss of N tokens is made of.

    loss = (kd_weight * sum_n token_loss(z_s[n], z_t[n]) + ce_weight * sum_n CE(z_s[n], y[n])
            + block_weight * sum_blocks block_loss(z_s[block], z_t[block])) / normalizer
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

#: ``(student_logits (n, V), teacher_logits (n, V)) -> (n,)`` float32 per-token losses (already scaled, e.g. T^2)
TokenLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``(student_logits (n, V), teacher_logits (n, V)) -> ()`` a loss coupling the n tokens of one block
BlockLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DistillationObjective:
    """The terms of the loss and their weights.

    Attributes:
        token_loss: the per-token loss, e.g. a :class:`~llmkd.losses.Divergence` or
            :class:`~llmkd.losses.TAIDTokenLoss`. One with a ``fused_kl()`` method takes the engine's closed-form
            path; one with ``with_target_entropy`` also reports the entropy of its target; one that softens both
            sides by a temperature exposes it as ``temperature`` (as a ``Divergence`` does), so that a cached
            teacher's tail is shaped like the student at that temperature (and the cache's is checked against it).
        kd_weight: weight of the token loss.
        ce_weight: weight of the student's cross-entropy on the labels.
        block_loss: a loss over the tokens of one block (SinKD's :class:`~llmkd.losses.SinkhornTerm`), or None.
        block_weight: its weight.
    """

    token_loss: TokenLoss
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    block_loss: BlockLoss | None = None
    block_weight: float = 0.0

    def __post_init__(self):
        for name in ("kd_weight", "ce_weight", "block_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def temperature(self) -> float:
        """The token loss's softening temperature (1 for a token loss without one): the temperature a cached
        teacher's tail is shaped at (:meth:`~llmkd.losses.SparseTeacher.dense_logits`)."""
        return float(getattr(self.token_loss, "temperature", 1.0))

    @property
    def reports_target_entropy(self) -> bool:
        """Whether the token loss is a KL to a target whose entropy it returns (a ``with_target_entropy`` method)."""
        return callable(getattr(self.token_loss, "with_target_entropy", None))
