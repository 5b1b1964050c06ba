"""Training from an offline teacher-logit cache (``teacher_cache=PATH``) instead of a live teacher
(:class:`CachedTeacher`).

The cache (:mod:`llmkd.cache`, written by ``llmkd cache-teacher``) holds, per valid token of every row of the
prepared training set, the teacher's top-k ids and log-probabilities and the log of the tail mass. The trainer
tags each training row with its index (:data:`CACHE_ROW`), the collator carries the indices into the batch, and
each step reads the rows' targets as a :class:`~llmkd.losses.SparseTeacher` for the losses (exact top-k +
tail-bucket forward KL; the other losses on a uniform-tail densification, see :mod:`llmkd.losses.sparse_teacher`).
"""

from __future__ import annotations

import torch

from ..heads import head_rows
from ..losses import SparseTeacher
from .base import TeacherSignal, ready

CACHE_ROW = "llmkd_cache_row"


def open_teacher_cache(args, teacher_model, task: str):
    """The :class:`~llmkd.cache.TeacherCache` named by ``args.teacher_cache`` (checked against the run's
    settings), or None when the run has a live teacher."""
    if not args.teacher_cache:
        return None
    if teacher_model is not None:
        raise ValueError("Both a teacher model and teacher_cache were given: train from one of them (a cache "
                         "replaces the live teacher).")
    if task != "causal_lm":
        raise ValueError("teacher_cache is for token-level distillation of causal LMs; sequence classifiers need "
                         "a live teacher (their teacher forward is cheap).")
    return open_cache(args.teacher_cache, args.temperature)


def open_cache(path: str, temperature: float):
    """The :class:`~llmkd.cache.TeacherCache` at ``path``, checked to hold log-probabilities at ``temperature``."""
    from ..cache import TeacherCache

    cache = TeacherCache(path)
    cached_temperature = cache.temperature
    if abs(cached_temperature - temperature) > 1e-12:
        raise ValueError(
            f"The cache at {path} holds log-probs at temperature {cached_temperature} but the run uses "
            f"temperature {temperature}: set temperature: {cached_temperature}, or write a cache at "
            f"{temperature} (llmkd cache-teacher --cache_temperature {temperature})."
        )
    return cache


def cache_vocab_size(cache, student, tokenizer) -> int:
    """The vocabulary of the cached distributions, checked to fit the student's head and cover the tokenizer."""
    vocab_size = cache.vocab_size
    rows = head_rows(student)
    if vocab_size > rows:
        raise ValueError(f"The cache's distributions cover {vocab_size} tokens but the student's head scores only "
                         f"{rows}: the cache was written for another tokenizer or model family.")
    if len(tokenizer) > vocab_size:
        raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the cache covers only {vocab_size}.")
    return vocab_size


def tag_cached_rows(cache, dataset, tokenizer, split: str, teacher_tokenizer=None):
    """Check the prepared dataset is the one the cache was written from (for a teacher with another tokenizer,
    ``teacher_tokenizer``: the aligned rows and both tokenizers), and add the row index column."""
    if dataset is None:
        return None
    if split != "train":
        raise ValueError(
            "teacher_cache covers the training rows only: evaluate with a live teacher (a run without "
            "teacher_cache), or drop the eval dataset / dataset_eval_split from this run."
        )
    cache.check_compatible(tokenizer, dataset, teacher_tokenizer=teacher_tokenizer)
    if CACHE_ROW in dataset.column_names:  # tagged already (another cached teacher of the same rows)
        return dataset
    return dataset.add_column(CACHE_ROW, list(range(len(dataset))))


def cached_targets(cache, rows: torch.Tensor, num_tokens: int, vocab_size: int, device) -> SparseTeacher:
    """The cached targets of a batch's rows, ``(N, k)`` in the trainer's valid-token order."""
    from ..cache import CacheMismatchError

    ids, log_probs, tail = cache.rows([int(r) for r in rows.tolist()])
    if ids.shape[0] != num_tokens:
        raise CacheMismatchError(
            f"The cache holds {ids.shape[0]} target tokens for rows {rows.tolist()[:8]}... but the batch has "
            f"{num_tokens} valid tokens: the data or its masking (max_length, completion_only_loss) differs from the "
            "cache's. Rewrite the cache with this recipe."
        )
    teacher = SparseTeacher(ids, log_probs, tail, vocab_size, cache.temperature)
    return teacher.to(device)


class CachedTeacher(TeacherSignal):
    """A teacher known from its cache (:mod:`llmkd.cache`): the training rows are tagged with their index
    (:data:`CACHE_ROW`, carried by the collator), and each batch's targets are the cached top-k + tail of its rows
    (a :class:`~llmkd.losses.SparseTeacher`, for the chunked and the dense path alike). ``vocab_size`` is the
    cache's, checked against the student's head and tokenizer."""

    def __init__(self, cache, student, tokenizer):
        self.cache = cache
        self.vocab_size = cache_vocab_size(cache, student, tokenizer)

    def prepare_dataset(self, dataset, tokenizer, split: str):
        return tag_cached_rows(self.cache, dataset, tokenizer, split)

    def token_targets(self, model_inputs: dict, valid: torch.Tensor, *, dense: bool = False):
        rows = model_inputs.pop(CACHE_ROW, None)
        if rows is None:
            raise ValueError(f"The batch has no {CACHE_ROW!r} column: keep remove_unused_columns=False when "
                             "training from teacher_cache.")
        return ready(cached_targets(self.cache, rows, int(valid.sum()), self.vocab_size, valid.device))
