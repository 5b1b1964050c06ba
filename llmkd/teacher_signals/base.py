"""The interface of a teacher signal (see the package docstring)."""

from __future__ import annotations

import contextlib

import torch


class TeacherSignal:
    """What a trainer needs from a teacher, whatever the teacher is.

    Attributes:
        vocab_size: the vocabulary the distillation is over, aligned with the student's head (the student's
            logits are cut to it); None for a sequence classifier (its label space is checked instead).
        model: the teacher model when there is one to run or evaluate (None for a cache).

    A signal:

    * prepares the datasets (:meth:`prepare_dataset`): what it needs carried into every batch (a cache's row
      tags), checked against what it was built from;
    * is placed once the accelerator exists (:meth:`place`: a model is frozen, moved or sharded);
    * gives the teacher targets of a batch's N valid tokens (:meth:`token_targets`), in a form the chunked engine
      and its dense reference consume (:mod:`llmkd.losses.targets`: a teacher's hidden states and output head, full
      logits, or a cached top-k with its tail), the teacher's cross-entropy included. ``dense=True`` asks for
      targets the dense path can use; a signal runs its teacher once either way. The result is a context manager:
      the targets are valid inside it (a sharded head stays gathered for as long as the loss runs);
    * gives a classifier's per-example teacher logits (:meth:`example_logits`).

    The kinds: a local teacher model (:class:`~llmkd.teacher_signals.OnlineTeacher`), a cache
    (:class:`~llmkd.teacher_signals.CachedTeacher`), a server (:class:`~llmkd.teacher_signals.ServedTeacher`:
    top-k log-probabilities, prefetched by :meth:`prefetch`), a teacher with another tokenizer
    (:class:`~llmkd.teacher_signals.CrossTokenizerTeacher`: its own loss through :meth:`objective`) and several
    teachers (:class:`~llmkd.teacher_signals.MultiTeacher`: targets per group of tokens). None of them changes a
    loss.
    """

    vocab_size: int | None = None
    model = None

    def prepare_dataset(self, dataset, tokenizer, split: str):
        """The prepared ``dataset`` (rows of input_ids / attention_mask / labels) with what this signal needs added;
        ``split`` is ``"train"`` or ``"eval"``. Default: unchanged."""
        return dataset

    def padded_columns(self) -> dict[str, int]:
        """``{column: padding value}``: the variable-length columns :meth:`prepare_dataset` adds, for the collator
        to pad. Default: none."""
        return {}

    def objective(self, objective):
        """The :class:`~llmkd.losses.DistillationObjective` the losses compute with this signal's targets, from the
        trainer's. Default: unchanged (a teacher with another tokenizer replaces the token loss)."""
        return objective

    def prefetch(self, batch: dict) -> None:
        """Called by the collator with each batch as it is built, ahead of the step that trains on it (a served
        teacher sends the batch's requests here). Default: nothing."""

    def completions_batch(self, batch: dict) -> dict:
        """A batch whose completions were just generated (on-policy), with what this signal needs recomputed for
        them (a teacher with another tokenizer re-tokenizes and re-aligns each row). Default: unchanged."""
        return batch

    def place(self, accelerator, *, is_deepspeed: bool, is_fsdp: bool) -> None:
        """Put the teacher where the run needs it, once the trainer's accelerator exists. Default: nothing."""

    def token_targets(self, model_inputs: dict, valid: torch.Tensor, *, dense: bool = False):
        """A context manager yielding the teacher targets of the batch's N valid tokens.

        Args:
            model_inputs: the batch without ``labels`` (the signal may take out columns meant for it).
            valid: ``(B, S-1)`` bool, the positions whose next token is trained on (row-major order = the targets'
                token order).
            dense: the caller will compute the loss from full logits (the dense reference path).
        """
        raise NotImplementedError

    def idle(self, *, dense: bool = False) -> contextlib.AbstractContextManager:
        """Called instead of :meth:`token_targets` for a micro-batch with none of this teacher's tokens (several
        routed teachers), and entered where its context would be: a partitioned teacher (ZeRO-3/FSDP) makes the
        collectives :meth:`token_targets` would (``dense`` as there), in the same order, on a throwaway input, to
        stay in step with the processes that have its tokens. What it yields is thrown away. Default: nothing."""
        return contextlib.nullcontext()

    def example_logits(self, model_inputs: dict) -> torch.Tensor:
        """``(B, C)`` float32: the teacher's logits of a classifier's micro-batch."""
        raise ValueError(f"{type(self).__name__} has no per-example logits: sequence classifiers need a live teacher.")


def ready(targets) -> contextlib.AbstractContextManager:
    """Targets that need nothing held open, as the context manager :meth:`TeacherSignal.token_targets` returns."""
    return contextlib.nullcontext(targets)
