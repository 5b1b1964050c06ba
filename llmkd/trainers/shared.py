"""What every llmkd trainer does the same way, written once: checking the config it was given, scaling a loss
divided by the step's global count for the gradient averaging of data parallelism, and the Trainer overrides they
share (:class:`LlmkdTrainerMixin`)."""

from __future__ import annotations

import torch

from ..heads import unwrap_model
from .checkpoint_weights import reload_converted_checkpoint


def method_config(args, config_class: type, trainer_name: str):
    """``args``, or ``config_class(output_dir="llmkd_output")`` when it is None; a ``TypeError`` naming both classes
    when it is a config of another class (the method's fields would silently be missing)."""
    if args is None:
        return config_class(output_dir="llmkd_output")
    if not isinstance(args, config_class):
        raise TypeError(f"{trainer_name} needs a {config_class.__name__}, got {type(args).__name__}.")
    return args


def scaled_for_data_parallel(loss: torch.Tensor, args, accelerator, num_items_in_batch) -> torch.Tensor:
    """``loss`` times the number of processes when it was divided by every rank's count (``num_items_in_batch``
    with ``average_tokens_across_devices``): DDP and DeepSpeed average the gradients over ranks, and the product
    makes that average the gradient of the global-count mean, as one large batch would give."""
    if args.average_tokens_across_devices and num_items_in_batch is not None:
        return loss * accelerator.num_processes
    return loss


class LlmkdTrainerMixin:
    """The ``transformers.Trainer`` overrides every llmkd trainer shares (DistillTrainer and the method trainers
    built on it, PreferenceDistillTrainer, DHOTrainer). Put it before the Trainer class in the bases:

    * resuming reloads a checkpoint whose saved weight layout is not the model's (an MoE student's fused experts,
      :func:`~llmkd.trainers.checkpoint_weights.reload_converted_checkpoint`);
    * ``create_model_card`` writes llmkd's card (:mod:`llmkd.hub`), so that ``push_to_hub()`` uploads the card
      ``llmkd publish`` writes;
    * the logs carry an MoE student's router statistics when the trainer has a ``router_monitor``.
    """

    router_monitor = None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled):  # an MoE student's experts (see the function)
            reload_converted_checkpoint(unwrap_model(model if model is not None else self.model),
                                        resume_from_checkpoint)

    def create_model_card(self, *args, **kwargs) -> None:
        """llmkd's model card (method, teacher, hyperparameters, evaluation; :mod:`llmkd.hub`) instead of the
        Trainer's draft."""
        from ..hub import create_trainer_model_card

        create_trainer_model_card(self)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.router_monitor is not None:
            self.router_monitor.log_into(logs, self.accelerator)
        super().log(logs, start_time)
