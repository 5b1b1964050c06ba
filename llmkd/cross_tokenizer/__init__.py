"""Cross-tokenizer distillation: a teacher whose tokenizer differs from the student's (docs/ALGORITHMS.md
section 6, docs/CROSS_TOKENIZER.md). :mod:`.alignment` aligns the two tokenizations of a text into spans,
:mod:`.vocabulary` finds the tokens both vocabularies share, :mod:`.rows` aligns a prepared training row."""

from .alignment import TokenAlignment, align_tokens
from .rows import AlignedRow, RowAligner, TokenizerWithoutOffsetsError
from .vocabulary import shared_vocabulary, token_strings

__all__ = ["AlignedRow", "RowAligner", "TokenAlignment", "TokenizerWithoutOffsetsError", "align_tokens",
           "shared_vocabulary", "token_strings"]
