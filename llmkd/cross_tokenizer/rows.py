"""One training row, tokenized for a teacher with another tokenizer and aligned with the student's tokens
(cross-tokenizer distillation, docs/CROSS_TOKENIZER.md).

A prepared row is the student's token ids (and labels). :class:`RowAligner` turns it into what the teacher and the
losses need, once per row (in dataset preparation, and for each on-policy sample when it is generated):

1. The row splits into runs of ordinary tokens and single special tokens. Each run is decoded to its text and the
   teacher tokenizes that text (no special tokens added). The student's own tokens keep their ids: their
   character offsets come from re-encoding the run's text when that reproduces the ids (the usual case), and from
   decoding growing prefixes of the run when it does not (a non-canonical tokenization, e.g. a sampled completion).
2. A special token becomes the teacher's special token of the same role (``bos``, ``eos``, ``pad``, ...) or of the
   same text (chat-template tokens such as ``<|im_start|>`` that both vocabularies have); the pair stands for one
   placeholder character of the alignment text, so it forms a 1:1 span. A special token the teacher has no
   counterpart for is left out of every span (it is trained with the student's cross-entropy only) and counted
   (:attr:`AlignedRow.one_sided_special`). The teacher's own leading special tokens (its ``bos``) are put in front
   when the student's row has none the teacher would recognise.
3. :func:`~llmkd.cross_tokenizer.alignment.align_tokens` splits the text into spans. A span whose teacher tokens
   decode to other characters than the text they cover (whitespace aside: a teacher that lowercases or otherwise
   normalises its input) is dropped and counted with the spans that could not be aligned. A span is *trained* when every
   student token in it is a trained target (its label is not ``-100``) and no token of either side in it is the
   first of its sequence (nothing predicts a sequence's first token). Spans are renumbered ``0..num_spans-1`` in
   text order; tokens outside trained spans get ``-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..constants import IGNORE_INDEX
from .alignment import align_tokens

#: the character that stands for a special token in the alignment text (Unicode private use area)
SPECIAL_CHARACTER = "\ue000"
_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerWithoutOffsetsError(ValueError):
    """A tokenizer that cannot give character offsets (a slow, pure-Python tokenizer)."""


@dataclass(frozen=True)
class AlignedRow:
    """A row's teacher tokens and the spans both sides' tokens belong to.

    Attributes:
        teacher_input_ids: ``(L_t,)`` the teacher's tokens of the row's text.
        student_spans: ``(L_s,)`` int64, the trained span of each student token (``-1``: in none).
        teacher_spans: ``(L_t,)`` int64, the same for the teacher's tokens.
        num_spans: the number of trained spans.
        dropped_spans: spans :func:`~llmkd.cross_tokenizer.alignment.align_tokens` could not align (different
            normalisation, an unknown token, one side empty).
        one_sided_special: special tokens of either side with no counterpart on the other (in no span).
    """

    teacher_input_ids: np.ndarray
    student_spans: np.ndarray
    teacher_spans: np.ndarray
    num_spans: int
    dropped_spans: int
    one_sided_special: int


def check_offsets_support(tokenizer, role: str) -> None:
    """Refuse a tokenizer without offset mappings (a slow tokenizer), naming the fix."""
    if not getattr(tokenizer, "is_fast", False):
        raise TokenizerWithoutOffsetsError(
            f"The {role}'s tokenizer ({type(tokenizer).__name__}) is a slow tokenizer: it gives no character "
            "offsets, and cross-tokenizer distillation aligns the two tokenizations by them. Load the fast one "
            "(AutoTokenizer.from_pretrained(name, use_fast=True); a SentencePiece model converts with the "
            "'sentencepiece' and 'protobuf' packages installed).")


def special_token_ids(tokenizer) -> set[int]:
    """The ids of a tokenizer's special tokens (named roles and added special tokens)."""
    return set(tokenizer.all_special_ids) | {
        token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special}


def special_token_map(student_tokenizer, teacher_tokenizer) -> dict[int, int]:
    """Student special-token id -> the teacher's id for the same role, else for the same text (chat-template
    tokens); student special tokens with neither are not in the map."""
    teacher_special = special_token_ids(teacher_tokenizer)
    teacher_by_text = {teacher_tokenizer.convert_ids_to_tokens(i): i for i in teacher_special}
    mapping: dict[int, int] = {}
    for role in _ROLES:
        student_id = getattr(student_tokenizer, f"{role}_id", None)
        teacher_id = getattr(teacher_tokenizer, f"{role}_id", None)
        if student_id is not None and teacher_id is not None:
            mapping.setdefault(int(student_id), int(teacher_id))
    for student_id in special_token_ids(student_tokenizer):
        text = student_tokenizer.convert_ids_to_tokens(student_id)
        if student_id not in mapping and text in teacher_by_text:
            mapping[student_id] = teacher_by_text[text]
    return mapping


def leading_special_ids(tokenizer) -> list[int]:
    """The special tokens a tokenizer puts in front of a text by default (e.g. its ``bos``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


class RowAligner:
    """Aligns prepared student rows with the teacher's tokenization of the same text (see the module docstring).

    Args:
        student_tokenizer / teacher_tokenizer: fast tokenizers (offsets are required).
    """

    def __init__(self, student_tokenizer, teacher_tokenizer):
        check_offsets_support(student_tokenizer, "student")
        check_offsets_support(teacher_tokenizer, "teacher")
        self.student, self.teacher = student_tokenizer, teacher_tokenizer
        self.student_special = np.asarray(sorted(special_token_ids(student_tokenizer)), dtype=np.int64)
        self.special_map = special_token_map(student_tokenizer, teacher_tokenizer)
        self.teacher_leading = leading_special_ids(teacher_tokenizer)

    def align(self, input_ids, labels=None) -> AlignedRow:
        """Align one row: ``input_ids`` ``(L_s,)`` the student's tokens, ``labels`` ``(L_s,)`` (unshifted, ``-100``
        where not trained; default: every token is trained)."""
        ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
        labels = ids if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if labels.shape != ids.shape:
            raise ValueError(f"labels has {labels.shape[0]} entries but input_ids has {ids.shape[0]}.")
        pieces: list[str] = []  # the alignment text, segment by segment
        student_offsets = np.zeros((len(ids), 2), dtype=np.int64)
        teacher_ids: list[int] = []
        teacher_offsets: list[tuple[int, int]] = []
        one_sided = 0
        position = 0
        is_special = np.isin(ids, self.student_special)
        if self.teacher_leading and not (len(ids) and is_special[0]
                                         and self.special_map.get(int(ids[0])) in self.teacher_leading):
            teacher_ids.extend(self.teacher_leading)
            teacher_offsets.extend([(0, 0)] * len(self.teacher_leading))
        for start, end in _segments(is_special):
            if is_special[start]:
                teacher_id = self.special_map.get(int(ids[start]))
                if teacher_id is None:  # one side only: zero width, in no span
                    student_offsets[start] = (position, position)
                    one_sided += 1
                    continue
                student_offsets[start] = (position, position + 1)
                teacher_ids.append(teacher_id)
                teacher_offsets.append((position, position + 1))
                pieces.append(SPECIAL_CHARACTER)
                position += 1
                continue
            run = ids[start:end]
            text = self.student.decode(run.tolist(), clean_up_tokenization_spaces=False)
            student_offsets[start:end] = _student_offsets(self.student, run, text) + position
            encoded = self.teacher(text, add_special_tokens=False, return_offsets_mapping=True)
            teacher_ids.extend(encoded["input_ids"])
            teacher_offsets.extend((s + position, e + position) for s, e in encoded["offset_mapping"])
            pieces.append(text)
            position += len(text)
        teacher_array = np.asarray(teacher_ids, dtype=np.int64)
        alignment = align_tokens("".join(pieces), student_offsets, teacher_offsets, student_ids=ids,
                                 teacher_ids=teacher_array, student_unk_id=self.student.unk_token_id,
                                 teacher_unk_id=self.teacher.unk_token_id)
        text = "".join(pieces)
        changed = self._changed_spans(text, alignment, student_offsets, teacher_array)
        student_spans, teacher_spans, num_spans = _trained_spans(alignment.student_spans, alignment.teacher_spans,
                                                                 alignment.num_spans, labels != IGNORE_INDEX, changed)
        return AlignedRow(teacher_array, student_spans, teacher_spans, num_spans,
                          alignment.dropped_spans + int(changed.sum()), one_sided)

    def _changed_spans(self, text: str, alignment, student_offsets: np.ndarray,
                       teacher_ids: np.ndarray) -> np.ndarray:
        """``(num_spans,)`` bool: the spans whose teacher tokens decode to other characters than the text they are
        aligned with (whitespace aside), e.g. a teacher that lowercases: its offsets still point into the text,
        but its tokens stand for another text. Spans of a special token are not compared."""
        spans = alignment.student_spans
        if alignment.num_spans == 0:
            return np.zeros(0, dtype=bool)
        inside = spans >= 0
        starts = np.full(alignment.num_spans, len(text), dtype=np.int64)
        ends = np.zeros(alignment.num_spans, dtype=np.int64)
        np.minimum.at(starts, spans[inside], student_offsets[inside, 0])
        np.maximum.at(ends, spans[inside], student_offsets[inside, 1])
        order = np.argsort(alignment.teacher_spans, kind="stable")
        order = order[alignment.teacher_spans[order] >= 0]
        groups = np.split(teacher_ids[order], np.flatnonzero(np.diff(alignment.teacher_spans[order])) + 1)
        decoded = self.teacher.batch_decode([g.tolist() for g in groups], clean_up_tokenization_spaces=False)
        changed = np.zeros(alignment.num_spans, dtype=bool)
        for span, (start, end, teacher_text) in enumerate(zip(starts, ends, decoded)):
            source = text[start:end]
            if SPECIAL_CHARACTER not in source:
                changed[span] = "".join(source.split()) != "".join(teacher_text.split())
        return changed


def _segments(is_special: np.ndarray) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: each special token alone, and each run of ordinary tokens."""
    if len(is_special) == 0:
        return []
    change = np.flatnonzero((is_special[1:] != is_special[:-1]) | is_special[1:] | is_special[:-1]) + 1
    bounds = np.concatenate([[0], change, [len(is_special)]])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _student_offsets(tokenizer, run: np.ndarray, text: str) -> np.ndarray:
    """``(len(run), 2)``: the run's character offsets into ``text`` (its decoding). Re-encoding gives them when it
    reproduces the run's ids; otherwise each token ends where the decoding of the run up to it ends (a token whose
    prefix does not decode to a prefix of the text gets zero width and is in no span)."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) == run.tolist():
        return np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    offsets = np.zeros((len(run), 2), dtype=np.int64)
    end = 0
    for i in range(len(run)):  # a non-canonical tokenization only: O(L^2) decoding
        prefix = tokenizer.decode(run[:i + 1].tolist(), clean_up_tokenization_spaces=False)
        if text.startswith(prefix) and len(prefix) >= end:
            offsets[i] = (end, len(prefix))
            end = len(prefix)
        else:
            offsets[i] = (end, end)
    return offsets


def _trained_spans(student_spans: np.ndarray, teacher_spans: np.ndarray, num_spans: int,
                   trained: np.ndarray, changed: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep the spans whose student tokens are all trained targets, that hold no sequence's first token and whose
    text the teacher did not change, renumbered in order."""
    if num_spans == 0:
        return np.full_like(student_spans, -1), np.full_like(teacher_spans, -1), 0
    bad = changed.copy()
    student_in = student_spans >= 0
    bad[student_spans[student_in & ~trained]] = True
    for spans in (student_spans, teacher_spans):
        if len(spans) and spans[0] >= 0:
            bad[spans[0]] = True
    keep = ~bad
    renumber = np.where(keep, np.cumsum(keep) - 1, -1)
    return (np.where(student_in, renumber[np.maximum(student_spans, 0)], -1),
            np.where(teacher_spans >= 0, renumber[np.maximum(teacher_spans, 0)], -1), int(keep.sum()))
