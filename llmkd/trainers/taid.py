"""TAIDTrainer: distillation toward a target that moves from the student to the teacher (TAID, arXiv 2501.16937).

The loss of each step is TAID's KL(p_t || q_theta) on the chunked engine (:class:`~llmkd.losses.TAIDTokenLoss`),
optionally mixed with CE by ``kd_ratio`` (default 1: no CE, as in the paper). ``t`` is updated once per optimizer
step, in training only, from the step's loss named by ``schedule_loss`` (default: the cross-entropy
``-sum p_t log q``, as the official code) averaged over its micro-batches and over the data-parallel ranks
(token-weighted), so every rank holds the same t; the floor's step index is the official one (0 at the first
step). The schedule state (t, m, prev) is written to every checkpoint (``taid_schedule.json``) and restored on
resume, so a resumed run continues the same schedule. ``taid_t`` (the t of the next step) and ``taid_ce`` (the
cross-entropy of p_t against the student) are logged at every logging step.

Deliberate differences from the official code (SakanaAI/TAID), which updates t per micro-batch, also during
validation, per rank without synchronisation, in float32, and interpolates in bf16: see TAIDConfig and
docs/TAID.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainerCallback

from ..config import DistillConfig
from ..losses.taid import SCHEDULE_LOSSES, TAIDSchedule, TAIDTokenLoss
from .base import DistillTrainer
from .shared import method_config
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
        schedule_loss: the loss ``J`` whose relative decrease drives the adaptive update.
            ``"cross_entropy"`` (default): ``-sum_v p_t log q = KL(p_t || q) + H(p_t)``, what the official code
            feeds (its loss is this cross-entropy). ``"kl"``: ``KL(p_t || q)``, the logged ``kd_loss``. The two
            differ by the target's entropy, several nats against a KL well below one, so the KL's relative
            changes are several times larger and, with the same alpha and beta, t rises faster. The paper's
            results, and its alpha = 5e-4 and beta = 0.99, come from the official code, hence the default; "kl" is
            the choice of earlier llmkd versions and of the paper's notation if its J is read as the KL.

    The step index of the floor is the official one: the optimizer steps completed before the step whose loss
    is fed (0 at the first step). t for the loss of step n is the value after the update of step n - 1.

    Deliberate differences from the official code, kept because they make t a function of the optimizer steps
    alone: t is updated once per optimizer step from the token-weighted mean over its micro-batches and over
    the data-parallel ranks (the official code updates per micro-batch, on each rank separately, and also while
    validating); the interpolation is float32 (official: the model's bf16 logits) and the schedule float64
    (official: float32); ``(t, m, prev)`` is saved in every checkpoint. With one process and
    ``gradient_accumulation_steps=1`` the fed losses, and so the t sequence, are the official ones.

    Default that differs from DistillConfig: ``kd_ratio=1.0`` (no CE term, as in the paper).
    """

    t_start: float = field(default=0.4, metadata={"help": "TAID: t at the first step."})
    t_end: float = field(default=1.0, metadata={"help": "TAID: the largest t."})
    alpha: float = field(default=5e-4, metadata={"help": "TAID: step size of the adaptive update."})
    beta: float = field(default=0.99, metadata={"help": "TAID: momentum of the relative loss decrease."})
    disable_adaptive: bool = field(default=False, metadata={"help": "TAID: linear schedule only."})
    schedule_loss: str = field(default="cross_entropy", metadata={
        "help": f"TAID: the loss the adaptive update watches, one of {SCHEDULE_LOSSES} ('cross_entropy': the "
                "official code's)."})
    kd_ratio: float = field(default=1.0, metadata={"help": "Weight of the TAID loss; CE gets 1 - kd_ratio."})

    def __post_init__(self):
        super().__post_init__()
        TAIDSchedule(t_start=self.t_start, t_end=self.t_end, alpha=self.alpha, beta=self.beta,
                     schedule_loss=self.schedule_loss)  # validates


class _TAIDScheduleCallback(TrainerCallback):
    """Advances the schedule after each optimizer step and writes it into each checkpoint."""

    def __init__(self, trainer: "TAIDTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        # the Trainer has already counted this step: its 0-based index, the official global_step, is one less
        self.trainer._advance_schedule(state.global_step - 1, state.max_steps)

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
    supports_sampled_token_objective = False  # TAID's target is p_t, not the teacher
    #: TAID interpolates over one vocabulary: across tokenizers, on the hybrid loss's shared vocabulary
    cross_tokenizer_losses = ("hybrid",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        method_config(self.args, TAIDConfig, "TAIDTrainer")
        a = self.args
        self.schedule = TAIDSchedule(t_start=a.t_start, t_end=a.t_end, alpha=a.alpha, beta=a.beta,
                                     disable_adaptive=a.disable_adaptive, schedule_loss=a.schedule_loss)
        self._step_sums = None  # (KL sum, target entropy sum, tokens) of the current optimizer step, on device
        self._logged_sums = [0.0, 0.0]  # (cross-entropy sum, tokens) since the last log, summed over ranks
        self.add_callback(_TAIDScheduleCallback(self))

    def token_loss_fn(self):
        return TAIDTokenLoss(float(self.schedule.t))

    def _accumulate_metrics(self, record, training: bool) -> None:
        super()._accumulate_metrics(record, training)
        if not training:
            return
        entropy = record.get("target_entropy")
        if entropy is None:
            raise RuntimeError("The TAID loss did not report the entropy of its target (H(p_t)), which the schedule "
                               "needs; the token loss must be a TAIDTokenLoss.")
        device = entropy.device if isinstance(entropy, torch.Tensor) else None
        sums = torch.stack([torch.as_tensor(record[key], dtype=torch.float64, device=device).reshape(())
                            for key in ("kd", "target_entropy", "tokens")])  # no host sync per micro-batch
        self._step_sums = sums if self._step_sums is None else self._step_sums + sums.to(self._step_sums.device)

    def _advance_schedule(self, step: int, max_steps: int) -> None:
        """Feed the schedule the loss of optimizer step ``step`` (0-based), averaged over its tokens on all ranks."""
        sums = self._step_sums if self._step_sums is not None else torch.zeros(3, dtype=torch.float64)
        sums = sums.to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        self._step_sums = None
        kl_sum, entropy_sum, tokens = sums.tolist()
        if tokens == 0:
            return  # a step without valid tokens carries no information about the loss
        cross_entropy_sum = kl_sum + entropy_sum
        self._logged_sums[0] += cross_entropy_sum
        self._logged_sums[1] += tokens
        fed = cross_entropy_sum if self.schedule.schedule_loss == "cross_entropy" else kl_sum
        self.schedule.update(fed / tokens, step, max_steps)

    def log(self, logs, start_time=None):
        if "loss" in logs:  # the training logs of each logging step
            logs["taid_t"] = round(float(self.schedule.t), 6)
            if self._logged_sums[1] > 0:
                logs["taid_ce"] = round(self._logged_sums[0] / self._logged_sums[1], 6)
            self._logged_sums = [0.0, 0.0]
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
                state = json.load(handle)
            # a schedule saved before schedule_loss existed was driven by the KL
            state.setdefault("schedule_loss", "kl")
            self.schedule.load_state_dict(state)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, *args, **kwargs)
