"""What a multi-process launch needs on a machine without an accelerator, and the check that it happened.

``accelerate launch --num_processes N`` (or ``torchrun``) starts N processes and tells each one its place through
the environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). On a machine without a GPU (or another accelerator),
accelerate 1.x joins those processes into one world only when it is told how:

- DDP (``recipes/accelerate/ddp.yaml``): ``use_cpu=True`` makes it a gloo ``MULTI_CPU`` world; without it every
  process believes it is alone and trains a full copy of the run (exit code 0, nothing shared);
- DeepSpeed (``zero2.yaml``, ``zero3.yaml``): ``use_cpu=True`` would switch DeepSpeed off, so instead
  ``ddp_backend="gloo"`` lets accelerate start DeepSpeed's communication over gloo (DeepSpeed runs on its CPU
  accelerator);
- the accelerate configs ask for ``mixed_precision: bf16``, a GPU setting: on CPU the run stays in float32 (the
  launcher's choice is dropped, with a log line), unless the recipe itself sets ``bf16``;
- pinned host memory needs an accelerator: ``dataloader_pin_memory`` is turned off on CPU.

:func:`adapt_to_launcher` applies these settings to a config before ``TrainingArguments.__post_init__`` reads
them (every llmkd config calls it), so the documented commands of ACCELERATE.md work as written on CPU.
On a machine with an accelerator it only reconciles precision: when the launcher asks for bf16/fp16 and the
recipe sets neither, the config adopts the launcher's choice (otherwise DeepSpeed would be configured for bf16
while the Trainer believes it trains in float32, a mismatch transformers refuses).

:func:`check_launched_world` runs when training starts: a launch of N processes that formed a world of another
size stops with :class:`LaunchError` instead of running N independent copies.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_PRECISIONS = ("bf16", "fp16")


class LaunchError(RuntimeError):
    """The processes of a multi-process launch did not form one world, or a setting cannot work on this machine."""


def launched_world_size() -> int:
    """The number of processes the launcher started (1 when not launched by accelerate/torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def has_accelerator() -> bool:
    """A CUDA, ROCm, XPU, NPU, HPU or MLU device is visible (Apple's MPS runs one process, so it does not count)."""
    import torch

    if torch.cuda.is_available():
        return True
    for name in ("xpu", "npu", "hpu", "mlu", "musa"):
        backend = getattr(torch, name, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and available():
            return True
    return False


def adapt_to_launcher(config) -> None:
    """Set what the current launch needs on ``config`` (a ``TrainingArguments`` before its ``__post_init__``)."""
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    chosen = next((p for p in _PRECISIONS if getattr(config, p, False)), None)
    multi_process = launched_world_size() > 1
    if has_accelerator():
        if launcher_precision in _PRECISIONS and chosen is None:
            setattr(config, launcher_precision, True)
            _log_once(f"mixed precision {launcher_precision}: from the accelerate launch (its config's "
                      "mixed_precision); set mixed_precision: 'no' there, or pass --mixed_precision no, to train in "
                      "float32")
        return
    if getattr(config, "dataloader_pin_memory", False):
        config.dataloader_pin_memory = False  # pinned memory needs an accelerator (torch warns and ignores it)
    uses_deepspeed = _flag("ACCELERATE_USE_DEEPSPEED") or bool(getattr(config, "deepspeed", None))
    if launcher_precision in _PRECISIONS and chosen is None:
        # DeepSpeed's plugin and the Trainer both read the launcher's precision from here.
        os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
        if multi_process or uses_deepspeed:
            _log_once(f"no GPU: the accelerate launch's mixed_precision {launcher_precision} is a GPU setting; "
                      "training in float32")
    if not multi_process:
        return
    if _flag("ACCELERATE_USE_FSDP") or getattr(config, "fsdp", None):
        raise LaunchError(
            "FSDP needs a GPU per process: without one, accelerate runs the processes as plain DDP. On this machine "
            "use recipes/accelerate/ddp.yaml, zero2.yaml or zero3.yaml (ACCELERATE.md)."
        )
    if uses_deepspeed:
        if chosen is not None:
            raise LaunchError(
                f"{chosen} on a machine without a GPU under DeepSpeed: transformers accepts {chosen} without a GPU "
                f"only with use_cpu, which turns DeepSpeed off. Train in float32 here (--{chosen} False), or use "
                "recipes/accelerate/ddp.yaml."
            )
        if getattr(config, "ddp_backend", None) in (None, ""):
            config.ddp_backend = "gloo"
            _log_once(f"no GPU: the {launched_world_size()} processes run DeepSpeed over gloo (ddp_backend=gloo)")
    elif not getattr(config, "use_cpu", False):
        config.use_cpu = True
        _log_once(f"no GPU: the {launched_world_size()} processes train on the CPU over gloo (use_cpu=True)")


def check_launched_world(accelerator) -> None:
    """Stop a launch of N processes that did not become one world of N (e.g. every process training alone)."""
    expected = launched_world_size()
    if expected > 1 and accelerator.num_processes != expected:
        raise LaunchError(
            f"The launcher started {expected} processes, but this one joined a world of {accelerator.num_processes} "
            f"(distributed type {accelerator.distributed_type}): each process would train its own copy of the run. "
            "On a machine without a GPU pass --use_cpu True for DDP, or --ddp_backend gloo for DeepSpeed (llmkd's "
            "configs set them themselves; a config built outside llmkd does not)."
        )


_said: set[str] = set()


def _log_once(message: str) -> None:
    if message in _said:
        return
    _said.add(message)
    if os.environ.get("RANK", "0") in ("0", ""):
        logger.info(message)
