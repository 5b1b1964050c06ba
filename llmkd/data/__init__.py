"""Dataset formatting (TRL layouts -> input_ids / attention_mask / labels) and the distillation collator."""

from .collator import IMAGE_FIELDS, DistillDataCollator
from .formatting import DATA_FORMATS, PROMPT_LENGTH, detect_format, prepare_dataset, prompt_length, tokenize_example

__all__ = ["DATA_FORMATS", "DistillDataCollator", "IMAGE_FIELDS", "PROMPT_LENGTH", "detect_format", "prepare_dataset",
           "prompt_length", "tokenize_example"]
