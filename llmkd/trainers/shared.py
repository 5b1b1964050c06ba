"""What every llmkd trainer does the same way, written once: checking the config it was given, and scaling a loss
divided by the step's global count for the gradient averaging of data parallelism."""

from __future__ import annotations

import torch


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
