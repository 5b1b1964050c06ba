"""A prepared dataset aligned for a teacher with another tokenizer: the columns each row gains, and the teacher's
view of the rows (what a teacher pass, online or writing a cache, reads).

Each aligned row carries, beside the student's ``input_ids`` / ``attention_mask`` / ``labels``:

* :data:`TEACHER_INPUT_IDS` ``(L_t,)``: the teacher's tokens of the row's text, and :data:`TEACHER_ATTENTION_MASK`;
* :data:`STUDENT_SPANS` ``(L_s,)`` and :data:`TEACHER_SPANS` ``(L_t,)``: the trained span of each token (``-1``:
  none), numbered per row (:class:`~llmkd.cross_tokenizer.rows.RowAligner`).

The teacher's *targets* are its tokens in trained spans: the teacher's view of a row (:func:`teacher_view`) is its
teacher tokens with ``labels`` equal to them where a span holds them and ``-100`` elsewhere, so that anything that
runs a teacher over prepared rows (the teacher-cache writer) runs unchanged over it.
"""

from __future__ import annotations

import logging

from ..constants import IGNORE_INDEX

logger = logging.getLogger(__name__)

TEACHER_INPUT_IDS = "llmkd_teacher_input_ids"
TEACHER_ATTENTION_MASK = "llmkd_teacher_attention_mask"
STUDENT_SPANS = "llmkd_student_spans"
TEACHER_SPANS = "llmkd_teacher_spans"
ALIGNMENT_COLUMNS = (TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK, STUDENT_SPANS, TEACHER_SPANS)
_COUNTS = ("llmkd_spans", "llmkd_dropped_spans", "llmkd_one_sided_special")


def is_aligned(dataset) -> bool:
    """Whether ``dataset``'s rows carry the alignment columns."""
    return dataset is not None and all(name in dataset.column_names for name in ALIGNMENT_COLUMNS)


def alignment_columns(aligner, input_ids, labels) -> dict:
    """The alignment columns of one row (and its counts, under ``llmkd_*`` names that :func:`align_dataset`
    removes)."""
    row = aligner.align(input_ids, labels)
    return {TEACHER_INPUT_IDS: row.teacher_input_ids.tolist(), TEACHER_ATTENTION_MASK: [1] * len(row.teacher_input_ids),
            STUDENT_SPANS: row.student_spans.tolist(), TEACHER_SPANS: row.teacher_spans.tolist(),
            "llmkd_spans": row.num_spans, "llmkd_dropped_spans": row.dropped_spans,
            "llmkd_one_sided_special": row.one_sided_special}


def align_dataset(dataset, aligner, split: str, num_proc: int | None = None):
    """``(the aligned dataset, its counts)``: every row of a prepared ``dataset`` aligned by ``aligner`` (a
    :class:`~llmkd.cross_tokenizer.RowAligner`) in ``num_proc`` processes, the counts logged (a WARNING for dropped
    spans). Raises ``ValueError`` when no span of a non-empty split aligns."""
    aligned = dataset.map(lambda row: alignment_columns(aligner, row["input_ids"], row.get("labels")),
                          num_proc=num_proc, desc=f"Aligning the {split} rows with the teacher's tokenizer")
    stats = alignment_stats(aligned, split)
    return aligned.remove_columns(list(_COUNTS)), stats


def alignment_stats(aligned, split: str) -> dict[str, int]:
    """The counts of an aligned dataset (before :func:`align_dataset` removes them), logged."""
    stats = {"rows": len(aligned), "spans": sum(aligned["llmkd_spans"]),
             "dropped_spans": sum(aligned["llmkd_dropped_spans"]),
             "one_sided_special_tokens": sum(aligned["llmkd_one_sided_special"]),
             "student_tokens_in_spans": sum(sum(1 for s in spans if s >= 0) for spans in aligned[STUDENT_SPANS])}
    logger.info("Cross-tokenizer alignment of the %s rows: %s", split, stats)
    if stats["rows"] and stats["spans"] == 0:
        raise ValueError(f"No span of the {split} rows could be aligned between the two tokenizers "
                         f"({stats['dropped_spans']} dropped): they normalise the text differently everywhere "
                         "(e.g. one lowercases), so nothing can be distilled. Use tokenizers that keep the text.")
    if stats["dropped_spans"]:
        logger.warning("%d spans of the %s rows could not be aligned (the tokenizers normalise their text "
                       "differently, or one has an unknown token there): they are trained with the student's "
                       "cross-entropy only.", stats["dropped_spans"], split)
    return stats


def teacher_view(dataset):
    """The teacher's side of aligned rows: ``input_ids`` / ``attention_mask`` = the teacher's tokens, ``labels`` =
    them where a trained span holds them, ``-100`` elsewhere."""
    def view(row):
        labels = [token if span >= 0 else IGNORE_INDEX for token, span in zip(row[TEACHER_INPUT_IDS],
                                                                              row[TEACHER_SPANS])]
        return {"input_ids": row[TEACHER_INPUT_IDS], "attention_mask": row[TEACHER_ATTENTION_MASK], "labels": labels}

    return dataset.map(view, remove_columns=dataset.column_names, desc="The teacher's view of the aligned rows")
