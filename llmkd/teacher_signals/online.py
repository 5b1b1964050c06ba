"""A teacher model run at every step (:class:`OnlineTeacher`)."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor

from ..heads import intercept_head, logit_transform_for
from ..losses import DenseTargets, OutputHead, ProjectedTeacher
from ..teacher import gathered_head_parameters, prepare_teacher
from .base import TeacherSignal, ready


class OnlineTeacher(TeacherSignal):
    """A local teacher model in any placement (a device, ZeRO-3, FSDP, 4/8-bit): :func:`llmkd.teacher.prepare_teacher`
    freezes and places it, :func:`llmkd.teacher.aligned_vocab_size` aligned its vocabulary with the student's.

    Per batch it runs the teacher once: with its head replaced by the identity (the final hidden states at the
    valid positions, projected chunk by chunk by the engine through the teacher's own head, gathered when sharded)
    or, for the dense path, in full (its own logits).
    """

    def __init__(self, model, vocab_size: int | None):
        self.model = model
        self.vocab_size = vocab_size
        self.transform = None if model is None or vocab_size is None else logit_transform_for(model)

    def place(self, accelerator, *, is_deepspeed: bool, is_fsdp: bool) -> None:
        self.model = prepare_teacher(self.model, accelerator, is_deepspeed=is_deepspeed, is_fsdp=is_fsdp)

    def idle(self, *, dense: bool = False) -> contextlib.AbstractContextManager:
        if not any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in self.model.parameters()):
            return contextlib.nullcontext()  # not partitioned: no collective to keep in step with
        # a real micro-batch's forward (now) and head gathers (when entered), on one 2-token row: a forward alone
        # would leave the other processes waiting in the head gather of the projected path
        device = next(self.model.parameters()).device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return self.token_targets(inputs, torch.ones((1, 1), dtype=torch.bool, device=device), dense=dense)

    @torch.no_grad()
    def hidden_states(self, model_inputs: dict, valid: torch.Tensor) -> torch.Tensor:
        """``(N, H_t)``: the teacher's final hidden states at the valid positions (its head replaced by the
        identity for the forward)."""
        with intercept_head(self.model, lambda hidden_states: hidden_states):
            hidden = self.model(**model_inputs).logits  # (B, S, H_t): the head was replaced by identity
        return hidden[:, :-1][valid]

    def token_targets(self, model_inputs: dict, valid: torch.Tensor, *, dense: bool = False):
        if dense:
            with torch.no_grad():
                logits = self.model(**model_inputs).logits[:, :-1][valid][:, : self.vocab_size].float()  # (N, V)
            return ready(DenseTargets(logits))
        return self._projected(self.hidden_states(model_inputs, valid))

    @contextlib.contextmanager
    def _projected(self, hidden: torch.Tensor):
        with gathered_head_parameters(self.model) as (weight, bias):
            yield ProjectedTeacher(hidden, OutputHead(weight, bias, self.transform))

    @torch.no_grad()
    def example_logits(self, model_inputs: dict) -> torch.Tensor:
        return self.model(**model_inputs).logits.float()
