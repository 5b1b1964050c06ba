"""A teacher with another tokenizer (:class:`CrossTokenizerTeacher`, docs/CROSS_TOKENIZER.md).

Each training row is aligned once, when the dataset is prepared (:class:`~llmkd.cross_tokenizer.RowAligner`; on-policy
samples when they are generated): the row gets the teacher's tokens of its text and the aligned span of every token
of both sides, as three padded columns the collator carries. Per batch the teacher runs on its own tokens; its final
hidden states at the rows of trained spans become the targets of a cross-tokenizer loss
(:class:`~llmkd.losses.AlignedTeacher`, read chunk by chunk by the engine, projected through the teacher's own
head); the configured token loss is replaced by that loss (:meth:`CrossTokenizerTeacher.objective`): ULD, the hybrid
(the configured divergence, or TAID's interpolation, on the shared vocabulary of 1:1 spans) or span likelihood.

From a teacher cache instead of a model (``cache=``, written by ``llmkd cache-teacher`` for the aligned rows), the
targets are the cached top-k of the teacher's tokens in trained spans, densified with a uniform tail. From a teacher
server (``server=``), they are the same top-k + tail, asked of the server for the teacher's tokens of each row
(:class:`~llmkd.teacher_signals.ServedTeacher` on the teacher's columns, prefetched a batch ahead).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch

from ..cross_tokenizer import RowAligner, shared_vocabulary
from ..cross_tokenizer.dataset import (
    ALIGNMENT_COLUMNS,
    STUDENT_SPANS,
    TEACHER_ATTENTION_MASK,
    TEACHER_INPUT_IDS,
    TEACHER_SPANS,
    align_dataset,
    alignment_columns,
)
from ..heads import head_rows, intercept_head, logit_transform_for
from ..loading import position_limit
from ..losses import (
    AlignedTeacher,
    DenseTargets,
    DistillationObjective,
    HybridLoss,
    OutputHead,
    ProjectedTeacher,
    SpanLikelihoodLoss,
    ULDLoss,
)
from ..teacher import gathered_head_parameters, prepare_teacher
from .base import TeacherSignal
from .cached import CACHE_ROW, cached_targets, tag_cached_rows
from .served import ServedTeacher

logger = logging.getLogger(__name__)

CROSS_TOKENIZER_LOSSES = ("uld", "hybrid", "span")


class CrossTokenizerTeacher(TeacherSignal):
    """A local teacher model whose tokenizer is not the student's.

    Args:
        model: the teacher (placed like :class:`~llmkd.teacher_signals.OnlineTeacher`'s).
        student / student_tokenizer / teacher_tokenizer: the student model (for its head size) and the two fast
            tokenizers.
        loss: ``"uld"``, ``"hybrid"`` or ``"span"`` (:mod:`llmkd.losses.cross_tokenizer`).
        top_k: ULD's truncation (the hybrid's too).
        temperature: the losses' softening temperature.
        shared_weight / rest_weight: the hybrid's weights (None: GOLD's defaults).

        cache: a :class:`~llmkd.cache.TeacherCache` written for these aligned rows and tokenizers (then ``model``
            is None).
        server / server_top_k: a :class:`~llmkd.teacher_server.TeacherServer` serving the teacher, and the
            log-probabilities per position asked of it (then ``model`` is None; temperature 1).
        num_proc: processes aligning the dataset's rows (``dataset_num_proc``).

    ``vocab_size`` is the student's (its tokenizer's length, within its head); the teacher's distributions are over
    its own tokenizer's ids (``teacher_vocab_size``).
    """

    def __init__(self, model, student, student_tokenizer, teacher_tokenizer, *, loss: str, top_k: int = 64,
                 temperature: float = 1.0, shared_weight: float | None = None, rest_weight: float | None = None,
                 cache=None, num_proc: int | None = None, server=None, server_top_k: int = 20):
        if loss not in CROSS_TOKENIZER_LOSSES:
            raise ValueError(f"cross_tokenizer_loss must be one of {CROSS_TOKENIZER_LOSSES}, got {loss!r}.")
        self.model, self.loss, self.cache, self.num_proc = model, loss, cache, num_proc
        self.top_k, self.temperature = int(top_k), float(temperature)
        self.shared_weight, self.rest_weight = shared_weight, rest_weight
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.aligner = RowAligner(student_tokenizer, teacher_tokenizer)
        self.vocab_size = min(len(student_tokenizer), head_rows(student))
        self.served = None
        if server is not None:  # the teacher's own rows to the server, its tokenizer checked against the server's
            self.served = ServedTeacher(server, None, teacher_tokenizer, top_k=server_top_k, temperature=temperature,
                                        columns=(TEACHER_INPUT_IDS, TEACHER_ATTENTION_MASK))
            self.teacher_vocab_size = self.served.vocab_size
        elif cache is not None:
            self.teacher_vocab_size = cache.vocab_size
            if cache.vocab_size != len(teacher_tokenizer):
                raise ValueError(f"The cache's distributions cover {cache.vocab_size} tokens but the teacher's "
                                 f"tokenizer has {len(teacher_tokenizer)}: it was written for another teacher.")
        else:
            self.teacher_vocab_size = min(len(teacher_tokenizer), head_rows(model))
        self.teacher_pad_id = _pad_id(teacher_tokenizer)
        self.transform = None if model is None else logit_transform_for(model)
        self.shared = None
        if loss == "hybrid":
            student_ids, teacher_ids = shared_vocabulary(student_tokenizer, teacher_tokenizer)
            taken_s, taken_t, specials = set(student_ids.tolist()), set(teacher_ids.tolist()), []
            for s, t in self.aligner.special_map.items():  # one pair per token on each side
                if s not in taken_s and t not in taken_t:
                    specials.append((s, t))
                    taken_s.add(s)
                    taken_t.add(t)
            if specials:  # special tokens paired by role (eos <-> eos) are shared tokens too
                student_ids = np.concatenate([student_ids, np.asarray([s for s, _ in specials], dtype=np.int64)])
                teacher_ids = np.concatenate([teacher_ids, np.asarray([t for _, t in specials], dtype=np.int64)])
            inside = (student_ids < self.vocab_size) & (teacher_ids < self.teacher_vocab_size)
            self.shared = (torch.as_tensor(student_ids[inside]), torch.as_tensor(teacher_ids[inside]))
            logger.info("Cross-tokenizer hybrid loss: %d tokens shared by the two vocabularies (%d student, %d "
                        "teacher tokens).", int(inside.sum()), self.vocab_size, self.teacher_vocab_size)
            if int(inside.sum()) == 0:
                raise ValueError("The two tokenizers share no token (no piece decodes to the same text in both): "
                                 "the hybrid loss has nothing to match; use cross_tokenizer_loss: uld or span.")
        self.alignment_stats: dict[str, dict[str, int]] = {}

    # ------------------------------------------------------------------------------------------------- data
    def align_columns(self, input_ids, labels) -> dict[str, list[int]]:
        """The alignment columns of one row (:data:`~llmkd.cross_tokenizer.dataset.ALIGNMENT_COLUMNS`)."""
        return {key: value for key, value in alignment_columns(self.aligner, input_ids, labels).items()
                if key in ALIGNMENT_COLUMNS}

    def prepare_dataset(self, dataset, tokenizer, split: str):
        if dataset is None:
            return None
        aligned, self.alignment_stats[split] = align_dataset(dataset, self.aligner, split, self.num_proc)
        limit = None if self.model is None else position_limit(self.model)
        longest = max((len(ids) for ids in aligned[TEACHER_INPUT_IDS]), default=0)
        if limit and longest > limit:
            raise ValueError(f"A {split} row is {longest} tokens long in the teacher's tokenization, more than the "
                             f"teacher's {limit} positions: lower max_length (the student's tokens per row) so that "
                             "the teacher's tokenization of each row fits.")
        if self.cache is not None:  # checked against the rows and both tokenizers, then tagged with the row index
            return tag_cached_rows(self.cache, aligned, tokenizer, split, teacher_tokenizer=self.teacher_tokenizer)
        if self.served is not None:  # the teacher's rows must fit the server's context
            return self.served.prepare_dataset(aligned, tokenizer, split)
        return aligned

    def prefetch(self, batch: dict) -> None:
        if self.served is not None:
            self.served.prefetch(batch)

    def completions_batch(self, batch: dict) -> dict:
        """Re-tokenize and re-align each row of a batch of generated completions (``input_ids`` / ``attention_mask``
        / ``labels`` ``(B, S)``, padded on either side): the alignment columns of the new rows, padded."""
        ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
        columns = [self.align_columns(ids[b][mask[b]].tolist(), labels[b][mask[b]].tolist())
                   for b in range(ids.shape[0])]
        student_spans = torch.full_like(ids, -1)
        for b, row in enumerate(columns):
            student_spans[b][mask[b]] = torch.tensor(row[STUDENT_SPANS], dtype=ids.dtype, device=ids.device)
        longest = max(len(row[TEACHER_INPUT_IDS]) for row in columns)
        out = dict(batch)
        out[STUDENT_SPANS] = student_spans
        for key, value in self.padded_columns().items():
            if key == STUDENT_SPANS:
                continue
            out[key] = torch.tensor([row[key] + [value] * (longest - len(row[key])) for row in columns],
                                    dtype=ids.dtype, device=ids.device)
        return out

    def padded_columns(self) -> dict[str, int]:
        """The collator's padding value of each alignment column."""
        return {TEACHER_INPUT_IDS: self.teacher_pad_id, TEACHER_ATTENTION_MASK: 0, STUDENT_SPANS: -1,
                TEACHER_SPANS: -1}

    # ------------------------------------------------------------------------------------------------- loss
    def objective(self, objective: DistillationObjective) -> DistillationObjective:
        """``objective`` with its token loss replaced by the cross-tokenizer loss (the hybrid keeps it for the
        shared vocabulary)."""
        if self.loss == "uld":
            token_loss = ULDLoss(self.top_k, self.temperature)
        elif self.loss == "span":
            token_loss = SpanLikelihoodLoss(self.temperature)
        else:
            token_loss = HybridLoss(objective.token_loss, self.top_k, self.temperature, self.shared_weight,
                                    self.rest_weight)
        return DistillationObjective(token_loss, objective.kd_weight, objective.ce_weight)

    def place(self, accelerator, *, is_deepspeed: bool, is_fsdp: bool) -> None:
        if self.model is not None:
            self.model = prepare_teacher(self.model, accelerator, is_deepspeed=is_deepspeed, is_fsdp=is_fsdp)
        if self.shared is not None:
            self.shared = tuple(ids.to(accelerator.device) for ids in self.shared)

    def token_targets(self, model_inputs: dict, valid: torch.Tensor, *, dense: bool = False):
        missing = [key for key in ALIGNMENT_COLUMNS if key not in model_inputs]  # checked before any is popped
        if missing:
            raise ValueError(f"The batch has no {missing} columns: a cross-tokenizer run needs the alignment columns "
                             "its dataset preparation adds, padded by llmkd's collator (keep "
                             "remove_unused_columns=False and the default data_collator).")
        teacher_ids, teacher_mask = model_inputs.pop(TEACHER_INPUT_IDS), model_inputs.pop(TEACHER_ATTENTION_MASK)
        student_spans, teacher_spans = model_inputs.pop(STUDENT_SPANS), model_inputs.pop(TEACHER_SPANS)
        # spans are numbered per row: offset them so that they are global and in row-major order
        per_row = student_spans.max(dim=1).values.clamp_min(-1) + 1  # (B,)
        offset = (torch.cumsum(per_row, 0) - per_row)[:, None]
        student_rows = student_spans[:, 1:]
        student_global = torch.where(student_rows >= 0, student_rows + offset, student_rows)[valid]  # (N,)
        teacher_valid = teacher_spans[:, 1:] >= 0  # (B, L_t - 1): teacher targets of trained spans
        teacher_global = (teacher_spans[:, 1:] + offset)[teacher_valid]  # (N_t,)
        teacher_labels = teacher_ids[:, 1:][teacher_valid]
        if self.cache is not None:  # the cached top-k + tail of the rows, densified with a uniform tail
            rows = model_inputs.pop(CACHE_ROW, None)
            if rows is None:
                raise ValueError(f"The batch has no {CACHE_ROW!r} column: keep remove_unused_columns=False when "
                                 "training from teacher_cache.")
            cached = cached_targets(self.cache, rows, teacher_labels.numel(), self.teacher_vocab_size,
                                    teacher_ids.device)
            return contextlib.nullcontext(AlignedTeacher(cached, student_global, teacher_global, teacher_labels,
                                                         self.teacher_vocab_size, self.shared))
        if self.served is not None:  # the server's top-k + tail at the teacher's tokens of trained spans
            served = self.served.sparse_targets(teacher_ids, teacher_mask, teacher_valid)
            return contextlib.nullcontext(AlignedTeacher(served, student_global, teacher_global, teacher_labels,
                                                         self.teacher_vocab_size, self.shared))
        inputs = {"input_ids": teacher_ids, "attention_mask": teacher_mask, "use_cache": False}
        if dense:
            with torch.no_grad():
                logits = self.model(**inputs).logits[:, :-1][teacher_valid][:, :self.teacher_vocab_size].float()
            targets = AlignedTeacher(DenseTargets(logits), student_global, teacher_global, teacher_labels,
                                     self.teacher_vocab_size, self.shared)
            return contextlib.nullcontext(targets)
        with torch.no_grad(), intercept_head(self.model, lambda hidden_states: hidden_states):
            hidden = self.model(**inputs).logits[:, :-1][teacher_valid]  # (N_t, H_t)
        return self._projected(hidden, student_global, teacher_global, teacher_labels)

    @contextlib.contextmanager
    def _projected(self, hidden, student_spans, teacher_spans, teacher_labels):
        with gathered_head_parameters(self.model) as (weight, bias):
            teacher = ProjectedTeacher(hidden, OutputHead(weight, bias, self.transform))
            yield AlignedTeacher(teacher, student_spans, teacher_spans, teacher_labels, self.teacher_vocab_size,
                                 self.shared)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad) if pad is not None else 0
