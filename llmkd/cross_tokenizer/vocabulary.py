"""The tokens two vocabularies share: token pairs whose decoded strings are the same (the hybrid loss's shared
sub-vocabulary, docs/ALGORITHMS.md section 6).

A token's string is what its tokenizer's decoder makes of it *inside* a text, so that the space markers of
byte-level BPE (``Ġ``) and of SentencePiece-style tokenizers (``▁``) both become the space they stand for: each
piece is decoded after a fixed anchor piece and the anchor's own text is cut off (decoding a piece alone would let a
SentencePiece decoder drop the leading space of the first token). Special tokens, and pieces that are not whole
characters (byte-level fragments of a multi-byte character, which decode to U+FFFD), are in no pair.
"""

from __future__ import annotations

import numpy as np

_REPLACEMENT = "\ufffd"


def token_strings(tokenizer) -> list[str | None]:
    """``len(tokenizer)`` entries: the text each token id stands for inside a text, None for special tokens and
    for pieces that are not whole characters."""
    backend = tokenizer.backend_tokenizer
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids) | {
        token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special}
    decoder = backend.decoder
    anchor = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    anchor_text = decoder.decode(anchor) if decoder is not None else "".join(anchor)
    strings: list[str | None] = []
    for token_id, piece in enumerate(pieces):
        if piece is None or token_id in special:
            strings.append(None)
            continue
        text = decoder.decode([*anchor, piece]) if decoder is not None else anchor_text + piece
        if not text.startswith(anchor_text) or _REPLACEMENT in text:
            strings.append(None)
            continue
        strings.append(text[len(anchor_text):])
    return strings


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """``(S,)`` int64 twice: the student and the teacher token ids of the pairs whose strings are the same, sorted
    by student id. A string can stand for one token per vocabulary at most; where a vocabulary has several
    tokens with one string (e.g. an added token equal to a learnt one), the lowest id is kept."""
    first_teacher: dict[str, int] = {}
    for token_id, text in enumerate(token_strings(teacher_tokenizer)):
        if text:
            first_teacher.setdefault(text, token_id)
    pairs, seen = [], set()
    for token_id, text in enumerate(token_strings(student_tokenizer)):
        if text and text in first_teacher and text not in seen:
            seen.add(text)
            pairs.append((token_id, first_teacher[text]))
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    student_ids, teacher_ids = np.asarray(pairs, dtype=np.int64).T
    return student_ids, teacher_ids
