"""Guards shared by every llmkd trainer (RELIABILITY.md): non-finite losses and failed checkpoint writes.

Non-finite losses (``nonfinite_loss`` in every llmkd config):

- ``"stop"`` (default): raise :class:`NonFiniteLossError` naming the optimizer step, before the optimizer uses the
  gradients of that loss, so the weights (and the last checkpoint) are untouched by it.
- ``"skip"``: drop the gradients of the optimizer step (set to None, so the optimizer leaves every parameter and
  its state alone; with gradient accumulation the micro-batches already accumulated in that step are dropped too),
  count it, and go on. The count is logged as ``nonfinite_steps`` (cumulative over this process's run).

In a multi-process run the decision is taken on the loss of every process (one all-reduced flag), so all
processes skip or stop together. With DeepSpeed the gradients live in the engine: ``skip`` is refused there.

Checkpoints: the Trainer writes ``trainer_state.json`` last into ``checkpoint-N``, so a folder without it is
incomplete. A write that fails (a full disk: ``OSError``) removes its partial folder and raises
:class:`CheckpointWriteError`; :func:`last_complete_checkpoint` (what ``resume_from_checkpoint=True`` and
``llmkd train --resume_from_checkpoint latest`` resolve to) skips incomplete folders, e.g. of a killed run.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..launch import check_launched_world

logger = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.json"  # written last by Trainer._save_checkpoint
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite and ``nonfinite_loss="stop"``."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); its partial folder was removed."""


def last_complete_checkpoint(folder: str) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` that holds ``trainer_state.json`` (None if there is none);
    incomplete ones are named in a warning."""
    if not os.path.isdir(folder):
        return None
    found = sorted(((int(m.group(1)), name) for name in os.listdir(folder) if (m := _CHECKPOINT.match(name))
                    and os.path.isdir(os.path.join(folder, name))), reverse=True)
    for _, name in found:
        path = os.path.join(folder, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
            return path
        logger.warning("Skipping %s: it has no %s, so its write did not finish.", path, TRAINER_STATE_FILE)
    return None


class TrainingGuardsMixin:
    """Put first in a ``transformers.Trainer`` subclass's bases: ``class X(TrainingGuardsMixin, Trainer)``."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = (~torch.isfinite(loss.detach())).any().float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bad.item():
            return loss
        step = self.state.global_step + 1
        policy = getattr(self.args, "nonfinite_loss", "stop")
        if policy == "skip" and not self.is_deepspeed_enabled:
            model.zero_grad(set_to_none=True)
            self._nonfinite_steps = getattr(self, "_nonfinite_steps", 0) + 1
            return loss
        raise NonFiniteLossError(
            f"The training loss is {loss.item()} (not finite) at optimizer step {step} of {self.state.max_steps}, "
            f"in epoch {self.state.epoch or 0:.2f}; the optimizer has not used it. Lower the learning rate, use a "
            "float32 or bfloat16 teacher/student instead of float16, check the data of this step, or set "
            "nonfinite_loss='skip' to drop such steps and count them (nonfinite_steps in the logs)"
            + (" (not available with DeepSpeed)." if self.is_deepspeed_enabled else ".")
        )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and getattr(self.args, "nonfinite_loss", "stop") == "skip":
            logs["nonfinite_steps"] = getattr(self, "_nonfinite_steps", 0)
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        existed = os.path.isdir(folder)
        try:
            super()._save_checkpoint(model, trial)
        except OSError as error:
            if not existed and self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)
            previous = last_complete_checkpoint(os.path.dirname(folder))
            raise CheckpointWriteError(
                error.errno, f"Could not write the checkpoint {folder} ({error}); its partial folder was removed. "
                f"The previous checkpoint, {previous or 'none'}, is intact and is what resuming uses. Free disk "
                "space (save_total_limit keeps fewer checkpoints) and resume with resume_from_checkpoint=True "
                "(llmkd train --resume_from_checkpoint latest)."
            ) from error

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        check_launched_world(self.accelerator)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint in output_dir {self.args.output_dir!r} to resume from.")
        if isinstance(resume_from_checkpoint, str):
            if not os.path.isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE_FILE)):
                raise FileNotFoundError(
                    f"resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint (no "
                    f"{TRAINER_STATE_FILE} in it). Give a checkpoint-N folder of a run, or True for the newest one.")
            logger.info("Resuming from %s", resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        warmup = self.args.get_warmup_steps(num_training_steps)
        if warmup >= num_training_steps > 0:
            logger.warning(
                "The warmup (%d steps) is as long as the whole run (%d steps): the learning rate never reaches "
                "learning_rate %g (at most %.3g of it). Lower warmup_steps, or give it as a fraction of the run "
                "(warmup_steps: 0.05).", warmup, num_training_steps, self.args.learning_rate,
                num_training_steps / max(warmup, 1))
        return super().create_scheduler(num_training_steps, optimizer)
