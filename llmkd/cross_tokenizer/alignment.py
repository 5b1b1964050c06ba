"""Aligning the tokens of one text under two tokenizers (cross-tokenizer distillation, docs/ALGORITHMS.md section 6).

The text splits into the shortest spans whose boundaries are token boundaries on both sides: a character position
``c`` is a boundary of a side when one of its tokens ends at ``c`` and no token of that side straddles ``c``. Each
token belongs to the span its last character falls in, so a span holds 1:1, 1:n, n:1 or n:m tokens. Computed with
numpy on the tokenizers' character offsets, once per row (no Python loop over tokens).

A token is left out of every span (span ``-1``) when it covers no character (special and chat-template tokens that
exist on one side only, whose offsets are ``(0, 0)``) or lies past the other side's text. A span is dropped (its
tokens get ``-1``) when it holds a side's unknown token, when one side has no token in it, or when the two sides'
tokens in it do not cover the same non-whitespace characters (a normalisation that changed or dropped characters
on one side). Whitespace is left out of that comparison, because tokenizers attribute it differently (byte-level
BPE with trimmed offsets leaves a token's leading space out of its offsets, SentencePiece-style tokenizers keep
it). Dropped spans are counted (:attr:`TokenAlignment.dropped_spans`), never aligned by guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TokenAlignment:
    """The aligned spans of one text.

    Attributes:
        student_spans: ``(N_s,)`` int64, the span of each student token, ``-1`` where the token is in no span.
        teacher_spans: ``(N_t,)`` int64, the same for the teacher's tokens.
        num_spans: the number of aligned spans (span ids are ``0 .. num_spans - 1``, in text order).
        dropped_spans: spans found but dropped (one side had no token or an unknown token in them, or the sides
            covered different characters).
    """

    student_spans: np.ndarray
    teacher_spans: np.ndarray
    num_spans: int
    dropped_spans: int

    def tokens_per_span(self) -> tuple[np.ndarray, np.ndarray]:
        """``(num_spans,)`` twice: how many student and teacher tokens each span holds."""
        return (np.bincount(self.student_spans[self.student_spans >= 0], minlength=self.num_spans),
                np.bincount(self.teacher_spans[self.teacher_spans >= 0], minlength=self.num_spans))

    def one_to_one(self) -> np.ndarray:
        """``(num_spans,)`` bool: the spans of exactly one token on each side."""
        student, teacher = self.tokens_per_span()
        return (student == 1) & (teacher == 1)


def _as_offsets(offsets, name: str) -> np.ndarray:
    array = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) if len(offsets) else np.zeros((0, 2), np.int64)
    if (array[:, 1] < array[:, 0]).any():
        raise ValueError(f"The {name} offsets have a token that ends before it starts: {array.tolist()[:8]}...")
    return array


def _boundaries(offsets: np.ndarray, covering: np.ndarray) -> np.ndarray:
    """The boundary positions of one side: ends of its covering tokens that no covering token straddles."""
    ends = offsets[covering, 1]
    starts = offsets[covering, 0]
    # a token straddles c when start < c < end; tokens are in text order, so only later tokens can start before an
    # earlier end (byte-level tokens splitting one character share its offsets)
    later_start = np.minimum.accumulate(starts[::-1])[::-1]  # the smallest start at or after each token
    next_start = np.append(later_start[1:], np.iinfo(np.int64).max)
    running_end = np.maximum.accumulate(ends)
    clean = (next_start >= ends) & (running_end <= ends)
    return np.unique(ends[clean])


def _spans_of(offsets: np.ndarray, covering: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """The span of each token (the first boundary at or after its end), ``-1`` where it covers nothing or ends past
    the last boundary."""
    spans = np.full(len(offsets), -1, dtype=np.int64)
    index = np.searchsorted(boundaries, offsets[:, 1], side="left")
    inside = covering & (index < len(boundaries))
    spans[inside] = index[inside]
    return spans


def _covered(offsets: np.ndarray, spans: np.ndarray, num_spans: int, solid: np.ndarray) -> np.ndarray:
    """``(num_spans,)``: the non-whitespace characters each span's tokens cover, overlapping tokens counted once
    (``solid``: ``(len(text) + 1,)``, the number of non-whitespace characters before each position)."""
    valid = spans >= 0
    starts, ends, ids = offsets[valid, 0], offsets[valid, 1], spans[valid]
    # a span's tokens are in text order: clip each token's start at the previous token's end, so that tokens
    # sharing a character (byte-level pieces of one character) count it once
    previous_end = np.concatenate([[0], np.maximum.accumulate(ends)[:-1]]) if len(ends) else ends
    clipped_start = np.minimum(np.maximum(starts, previous_end), ends)
    limit = len(solid) - 1
    counts = solid[np.minimum(ends, limit)] - solid[np.minimum(clipped_start, limit)]
    return np.bincount(ids, weights=counts, minlength=num_spans).astype(np.int64)


def align_tokens(text: str, student_offsets, teacher_offsets, *, student_ids=None, teacher_ids=None,
                 student_unk_id: int | None = None, teacher_unk_id: int | None = None) -> TokenAlignment:
    """Align one text's student tokens with its teacher tokens by their character offsets.

    Args:
        text: the text both sides tokenized.
        student_offsets: ``(N_s, 2)`` ``(start, end)`` character offsets of the student's tokens into the text
            (a fast tokenizer's ``return_offsets_mapping=True``), in token order.
        teacher_offsets: ``(N_t, 2)``, the same for the teacher's tokens of the same text.
        student_ids, teacher_ids: ``(N_s,)`` / ``(N_t,)`` token ids, to leave out each side's unknown token.
        student_unk_id, teacher_unk_id: the unknown token of each side (None: no unknown token).
    """
    student, teacher = _as_offsets(student_offsets, "student"), _as_offsets(teacher_offsets, "teacher")
    covering, unknown = {}, {}
    for side, offsets, ids, unk in (("student", student, student_ids, student_unk_id),
                                    ("teacher", teacher, teacher_ids, teacher_unk_id)):
        covering[side] = offsets[:, 1] > offsets[:, 0]
        unknown[side] = (np.asarray(ids).reshape(-1) == unk) if ids is not None and unk is not None else None
    common = np.intersect1d(_boundaries(student, covering["student"]), _boundaries(teacher, covering["teacher"]))
    student_spans = _spans_of(student, covering["student"], common)
    teacher_spans = _spans_of(teacher, covering["teacher"], common)
    found = len(common)
    student_count = np.bincount(student_spans[student_spans >= 0], minlength=found)
    teacher_count = np.bincount(teacher_spans[teacher_spans >= 0], minlength=found)
    keep = (student_count > 0) & (teacher_count > 0)
    characters = np.array(list(text)) if text else np.zeros(0, dtype="<U1")
    solid = np.concatenate([[0], np.cumsum(~np.char.isspace(characters))]).astype(np.int64)
    keep &= _covered(student, student_spans, found, solid) == _covered(teacher, teacher_spans, found, solid)
    for spans, side in ((student_spans, "student"), (teacher_spans, "teacher")):
        if unknown[side] is not None:  # an unknown token says nothing about the text it covers
            keep[spans[unknown[side] & (spans >= 0)]] = False
    renumber = np.where(keep, np.cumsum(keep) - 1, -1)
    seen = (student_count > 0) | (teacher_count > 0)
    return TokenAlignment(
        student_spans=np.where(student_spans >= 0, renumber[np.maximum(student_spans, 0)], -1),
        teacher_spans=np.where(teacher_spans >= 0, renumber[np.maximum(teacher_spans, 0)], -1),
        num_spans=int(keep.sum()), dropped_spans=int((seen & ~keep).sum()))
