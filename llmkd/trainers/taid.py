"""TAIDTrainer: distillation toward a target that moves from the student to the teacher (ALGORITHMS.md section 1).

The loss of each step is TAID's KL(p_t || q_theta) on the chunked engine (:class:`~llmkd.losses.TAIDTokenLoss`),
optionally mixed with CE by ``kd_ratio`` (default 1: no CE, as in the paper). ``t`` is updated once per optimizer
step, in training only, from the step's TAID loss averaged over its micro-batches and over the data-parallel ranks
(token-weighted), so every rank holds the same t. The schedule state (t, m, prev) is written to every checkpoint
(``taid_schedule.json``) and restored on resume, so a resumed run continues the same schedule. ``taid_t`` is
logged at every logging step.

Deliberate differences from the official code (SakanaAI/TAID), which updates t per micro-batch, also during
validation, per rank without synchronisation, and interpolates in bf16: see the module docstring of
:mod:`llmkd.losses.taid` and docs in TAIDConfig.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from ..config import DistillConfig
from ..losses.taid import TAIDSchedule, TAIDTokenLoss
from .base import DistillTrainer
from .guards import last_complete_checkpoint

SCHEDULE_FILE = "taid_schedule.json"


@dataclass
class TAIDConfig(DistillConfig):
    r"""Configuration for :class:`TAIDTrainer`. Every :class:`~llmkd.DistillConfig` field works; ``divergence``,
    ``temperature``, ``jsd_beta`` and ``skew_alpha`` are not used (the loss is TAID's).

    Parameters that control the interpolation schedule:
        t_start: t at the first step (0.4; the paper uses 0.2 for its larger capacity gaps).
        t_end: the largest t (1.0: the teacher itself).
        alpha: step size of the adaptive increase (5e-4).
        beta: momentum of the relative loss decrease (0.99).
        disable_adaptive: follow the linear floor ``t_start + (t_end - t_start) * step / max_steps`` alone.

    Default that differs from DistillConfig: ``kd_ratio=1.0`` (no CE term, as in the paper).
    """

    t_start: float = field(default=0.4, metadata={"help": "TAID: t at the first step."})
    t_end: float = field(default=1.0, metadata={"help": "TAID: the largest t."})
    alpha: float = field(default=5e-4, metadata={"help": "TAID: step size of the adaptive update."})
    beta: float = field(default=0.99, metadata={"help": "TAID: momentum of the relative loss decrease."})
    disable_adaptive: bool = field(default=False, metadata={"help": "TAID: linear schedule only."})
    kd_ratio: float = field(default=1.0, metadata={"help": "Weight of the TAID loss; CE gets 1 - kd_ratio."})

    def __post_init__(self):
        super().__post_init__()
        TAIDSchedule(t_start=self.t_start, t_end=self.t_end, alpha=self.alpha, beta=self.beta)  # validates


class _TAIDScheduleCallback(TrainerCallback):
    """Advances the schedule after each optimizer step and writes it into each checkpoint."""

    def __init__(self, trainer: "TAIDTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._advance_schedule(state.global_step, state.max_steps)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(folder):
                with open(os.path.join(folder, SCHEDULE_FILE), "w") as handle:
                    json.dump(self.trainer.schedule.state_dict(), handle, indent=2)


class TAIDTrainer(DistillTrainer):
    """Distil with TAID. Arguments as :class:`~llmkd.DistillTrainer`; ``args`` is a :class:`TAIDConfig`."""

    _tag_names = ["llmkd", "distillation", "taid"]
    config_class = TAIDConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, TAIDConfig):
            raise TypeError(f"TAIDTrainer needs a TAIDConfig, got {type(self.args).__name__}.")
        a = self.args
        self.schedule = TAIDSchedule(t_start=a.t_start, t_end=a.t_end, alpha=a.alpha, beta=a.beta,
                                     disable_adaptive=a.disable_adaptive)
        self._step_sums = torch.zeros(2, dtype=torch.float64)  # TAID loss sum, tokens of the current step
        self.add_callback(_TAIDScheduleCallback(self))

    def token_loss_fn(self):
        return TAIDTokenLoss(float(self.schedule.t))

    def _accumulate_metrics(self, record, training: bool) -> None:
        super()._accumulate_metrics(record, training)
        if training:
            self._step_sums += torch.tensor([float(record["kd"]), float(record["tokens"])], dtype=torch.float64)

    def _advance_schedule(self, global_step: int, max_steps: int) -> None:
        sums = self._step_sums.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        self._step_sums = torch.zeros(2, dtype=torch.float64)
        if sums[1].item() == 0:
            return  # a step without valid tokens carries no information about the loss
        self.schedule.update(sums[0].item() / sums[1].item(), global_step, max_steps)

    def log(self, logs, start_time=None):
        if "loss" in logs:  # the training logs of each logging step
            logs["taid_t"] = round(float(self.schedule.t), 6)
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = last_complete_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, str):
            path = os.path.join(checkpoint, SCHEDULE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{checkpoint} holds no {SCHEDULE_FILE}: it was not written by TAIDTrainer, so the TAID "
                    "schedule (t, m, prev) cannot be resumed. Start a new run, or resume from a TAID checkpoint."
                )
            with open(path) as handle:
                self.schedule.load_state_dict(json.load(handle))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, *args, **kwargs)
