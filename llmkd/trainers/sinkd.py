"""SinKD: knowledge distillation with the batch-wise Sinkhorn distance (arXiv 2402.17110; docs/ALGORITHMS.md section 2).

Objective of a step (``a = kd_ratio``, ``b = sinkhorn_weight``):

    L = a * KD_T + (1 - a) * CE + b * L_sink

* ``KD_T``: the divergence (``fkl`` by default) between ``softmax(z_t / T)`` and ``softmax(z_s / T)``, without the
  ``T^2`` factor (the paper's soft-target cross-entropy, as the official code computes it; llmkd logs the KL,
  which has the same gradient and is 0 when the student matches);
* ``CE``: the hard-label cross-entropy;
* ``L_sink``: :func:`llmkd.losses.sinkhorn_loss` over the points of one optimal-transport problem:
  - sequence classifiers: the examples of the micro-batch (the paper's setting; with gradient accumulation or
    several processes each micro-batch on each process is its own problem);
  - causal LMs (llmkd's generalisation): ``sinkhorn_mode="batch"``, the micro-batch's valid tokens in blocks of at
    most ``sinkhorn_block``, or ``"sequence"``, each sequence's valid tokens (split into blocks of at most
    ``sinkhorn_block``);
  each problem's value enters weighted by its share of the step's points (so a single problem gives exactly the
  paper's term); the cost may be restricted to the teacher's top-k tokens (``sinkhorn_top_k``).

KD and CE are per-point means over the step's global point count, as in every llmkd trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import DistillConfig
from ..losses import SinkhornTerm, sinkhorn_blocks
from ..losses.sinkhorn import SINKHORN_MODES
from .shared import method_config
from .base import DistillTrainer, divergence_from_config


@dataclass
class SinKDConfig(DistillConfig):
    r"""Configuration for :class:`SinKDTrainer`. Defaults are the paper's GLUE settings.

    Parameters (besides :class:`~llmkd.DistillConfig`'s):
        kd_ratio: ``a``, the weight of KD_T (CE gets ``1 - a``); 0.9.
        temperature: ``T`` of KD_T; 2.0.
        sinkhorn_weight: ``b``, the weight of the Sinkhorn term; 0.8.
        sinkhorn_scale: the paper's multiplier of the transport cost; 1e-3.
        sinkhorn_temperature: ``tau``, the softening of the distributions the cost compares; 2.0.
        sinkhorn_epsilon / sinkhorn_iterations: entropic regularisation and iterations; 0.1 and 20. Confident
            predictions over few classes can need more iterations for the plan's marginals to reach 1.
        sinkhorn_detach_plan: treat the plan as a constant (default: the envelope gradient of the entropic OT cost)
            or differentiate through the iterations (the official code).
        sinkhorn_mode: for causal LMs, ``batch`` (blocks of the micro-batch's tokens) or ``sequence``.
        sinkhorn_block: the largest number of tokens in one problem (LMs; default 512): the n x n cost and the
            chunk's n x V logits stay bounded. It replaces ``loss_chunk_size`` as the chunk size.
        sinkhorn_top_k: 0 (default) compares full distributions; k > 0 restricts the cost to the k tokens with the
            largest teacher mass in the problem plus a tail bucket (LMs with large vocabularies).
    """

    kd_ratio: float = field(default=0.9, metadata={"help": "Weight a of KD_T; CE gets 1 - a."})
    temperature: float = field(default=2.0, metadata={"help": "Temperature T of KD_T (no T^2 factor)."})
    sinkhorn_weight: float = field(default=0.8, metadata={"help": "Weight b of the Sinkhorn term."})
    sinkhorn_scale: float = field(default=1e-3, metadata={"help": "Multiplier of the transport cost."})
    sinkhorn_temperature: float = field(default=2.0, metadata={"help": "Softening tau of the compared distributions."})
    sinkhorn_epsilon: float = field(default=0.1, metadata={"help": "Entropic regularisation of Sinkhorn."})
    sinkhorn_iterations: int = field(default=20, metadata={"help": "Sinkhorn iterations."})
    sinkhorn_detach_plan: bool = field(default=True, metadata={"help": "Detach the transport plan."})
    sinkhorn_mode: str = field(default="batch", metadata={"help": f"LM transport problems: {SINKHORN_MODES}."})
    sinkhorn_block: int = field(default=512, metadata={"help": "Largest number of tokens in one problem (LMs)."})
    sinkhorn_top_k: int = field(default=0, metadata={"help": "Restrict the cost to the teacher's top-k tokens."})

    def __post_init__(self):
        super().__post_init__()
        if self.sinkhorn_mode not in SINKHORN_MODES:
            raise ValueError(f"sinkhorn_mode={self.sinkhorn_mode!r} is not one of {SINKHORN_MODES}.")
        for name in ("sinkhorn_epsilon", "sinkhorn_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}.")
        for name in ("sinkhorn_iterations", "sinkhorn_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.sinkhorn_top_k < 0:
            raise ValueError(f"sinkhorn_top_k must be >= 0 (0 = full vocabulary), got {self.sinkhorn_top_k}.")
        if self.sinkhorn_weight < 0 or self.sinkhorn_scale < 0:
            raise ValueError("sinkhorn_weight and sinkhorn_scale must be >= 0.")


class SinKDTrainer(DistillTrainer):
    """Distil with ``a * KD_T + (1 - a) * CE + b * L_sink`` (see the module docstring), for sequence classifiers
    (encoders such as BERT, or decoder-based classifiers) and causal LMs. Takes the arguments of
    :class:`~llmkd.DistillTrainer`; logs ``sinkhorn_loss`` (the mean paper value of the step's problems) beside
    ``kd_loss``, ``ce_loss`` and ``teacher_ce_loss``."""

    _tag_names = ["llmkd", "distillation", "sinkd"]
    config_class = SinKDConfig
    #: the Sinkhorn term transports mass between token positions over one vocabulary
    cross_tokenizer_losses: tuple[str, ...] = ()
    block_loss_name = "sinkhorn_loss"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        method_config(self.args, SinKDConfig, "SinKDTrainer")
        config = self.args
        self.divergence = divergence_from_config(config, scale_by_t2=False)
        self.sinkhorn = SinkhornTerm(
            temperature=config.sinkhorn_temperature, epsilon=config.sinkhorn_epsilon,
            iterations=config.sinkhorn_iterations, scale=config.sinkhorn_scale,
            detach_plan=config.sinkhorn_detach_plan, top_k=config.sinkhorn_top_k or None,
        )

    def block_loss_fn(self):
        return self.sinkhorn, self.args.sinkhorn_weight

    def blocks(self, valid: torch.Tensor) -> list[tuple[int, int]]:
        return sinkhorn_blocks(valid, self.args.sinkhorn_mode, self.args.sinkhorn_block)
