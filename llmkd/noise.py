"""Known third-party messages that say nothing to an llmkd user, silenced by the command line only.

Each entry names the library, the message and why it is noise. The library's Python API leaves warnings and
logging alone (an application decides those); ``llmkd`` commands call :func:`quiet_known_noise` before the
libraries are imported. ``--debug`` / ``LLMKD_DEBUG=1`` keeps everything.
"""

from __future__ import annotations

import logging
import warnings

# (category, message regex, why)
KNOWN_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated",
     "DeepSpeed's collectives call torch.distributed functions that torch renamed; nothing for a user to change"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found",
     "torch's DataLoader on a CPU-only machine (llmkd turns pin_memory off there; a user config may not)"),
    (UserWarning, r"The `local_dir_use_symlinks` argument is deprecated",
     "lm-eval passes a huggingface_hub argument that no longer matters"),
)
# logger name -> (level, why)
KNOWN_LOGGERS = {
    "bitsandbytes.backends.cpu.ops": (logging.ERROR, "an optional CPU kernel package ('kernels') is not installed; "
                                                     "bitsandbytes falls back to its own CPU code"),
    "lm_eval": (logging.WARNING, "lm-eval logs every task's set-up at INFO; llmkd prints the results table"),
}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not any(fragment in message for fragment in self.fragments)


# logger name -> fragments of the messages dropped
KNOWN_MESSAGES = {
    # DeepSpeed's accelerator detection on a machine without a GPU; llmkd says what runs where itself
    "DeepSpeed": ("Setting accelerator to CPU",),
    # llmkd hands lm-eval the loaded model object on purpose (one process, llmkd's own placement)
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
    # transformers >= 5.25 brings the `kernels` package; bitsandbytes asks it for an optional CPU kernel, which
    # warns that it cannot verify the kernel's publisher offline (the kernel is then not used)
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    # lm-eval's advice about --metadata for its long-context tasks, printed for every task
    "lm_eval.api.task": ("Custom kwargs can be passed to `--metadata`",),
}


def quiet_known_noise() -> None:
    """Install the filters above (idempotent)."""
    for category, pattern, _ in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name, (level, _) in KNOWN_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name, fragments in KNOWN_MESSAGES.items():
        target = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in target.filters):
            target.addFilter(_DropMessages(fragments))
