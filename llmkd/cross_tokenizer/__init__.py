"""Cross-tokenizer distillation: a teacher whose tokenizer differs from the student's (docs/ALGORITHMS.md
section 6). :mod:`.alignment` aligns the two tokenizations of a text into spans."""

from .alignment import TokenAlignment, align_tokens

__all__ = ["TokenAlignment", "align_tokens"]
