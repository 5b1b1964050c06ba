"""The teacher as the chunked engine consumes it: per-token targets, read one chunk of tokens at a time.

A *teacher targets* object holds the teacher's side of the loss for the N valid tokens of a micro-batch and gives
the engine, for each chunk ``[start, end)``, a *chunk* with three things:

* ``logits(like)``: the teacher's float32 logits ``(n, V)`` for any token loss or block loss (a loss that softens
  with temperature ``T`` sees ``softmax(logits / T)``). ``like`` ``(n, V)`` is the student's (detached) logits at
  the loss's temperature: a teacher that does not know its whole distribution shapes the unknown part like it
  (the cached top-k teacher's tail);
* ``cross_entropy_sum(labels)``: the teacher's cross-entropy on the labels, summed (the ``teacher_ce`` metric);
* ``fused_kl_ce(...)``: the chunk's forward KL + CE in closed form (:mod:`.fused`), the engine's fast path.

Three kinds exist: :class:`ProjectedTeacher` (hidden states and the teacher's output head: a teacher model run
online, projected chunk by chunk so that its ``(N, V)`` logits never exist), :class:`DenseTargets` (logits the
caller already has) and :class:`~llmkd.losses.sparse_teacher.SparseTeacher` (a cached top-k teacher). The engine
and the losses see only this interface; a new kind of teacher (one scoring the student's own samples, one behind
an inference server, one with another tokenizer mapped onto the student's vocabulary, a mixture of several
teachers) is one more class with these methods: it owns its vocabulary (``vocab_size``), what it checks about the
batch (``check``), and how its targets are formed per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .fused import ChunkWorkspace, FusedKL, fused_kl_ce_chunk
from .head import OutputHead, project, project_into


class DenseTargets:
    """Teacher logits ``(N, V_t)`` given whole (the dense reference path, or a caller with logits at hand); a
    chunk is its rows, cut to the aligned vocabulary."""

    def __init__(self, logits: torch.Tensor):
        if logits.dim() != 2:
            raise ValueError(f"teacher logits must be (N, V), got {tuple(logits.shape)}.")
        self._logits = logits.detach()

    @property
    def num_tokens(self) -> int:
        return self._logits.shape[0]

    def default_vocab_size(self, student_rows: int) -> int:
        return min(student_rows, self._logits.shape[1])

    def check(self, num_tokens: int, student_rows: int, vocab_size: int) -> None:
        _check_same_tokens(num_tokens, self.num_tokens, "teacher")
        _check_fits(vocab_size, student_rows, self._logits.shape[1])

    def chunk(self, start: int, end: int, vocab_size: int, workspace: ChunkWorkspace | None = None) -> "LogitChunk":
        return LogitChunk(self._logits[start:end, :vocab_size].float())


class ProjectedTeacher:
    """A teacher model's final hidden states ``(N, H_t)`` at the valid positions and its :class:`OutputHead`
    (``weight`` ``(V_t, H_t)``, bias, logit transform); each chunk is projected on demand."""

    def __init__(self, hidden: torch.Tensor, head: OutputHead):
        if hidden.dim() != 2:
            raise ValueError("the chunked engine takes the hidden states of the valid tokens only, shaped "
                             f"(N, hidden): got teacher {tuple(hidden.shape)}.")
        self.hidden = hidden.detach()
        self.head = OutputHead(head.weight.detach(), None if head.bias is None else head.bias.detach(),
                               head.transform)

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0]

    def default_vocab_size(self, student_rows: int) -> int:
        return min(student_rows, self.head.rows)

    def check(self, num_tokens: int, student_rows: int, vocab_size: int) -> None:
        _check_same_tokens(num_tokens, self.num_tokens, "teacher")
        _check_fits(vocab_size, student_rows, self.head.rows)

    def chunk(self, start: int, end: int, vocab_size: int, workspace: ChunkWorkspace | None = None) -> "LogitChunk":
        """The chunk's logits ``(end - start, vocab_size)`` float32; written into ``workspace``'s teacher buffer when
        one is given (the fast path reuses it chunk after chunk)."""
        head, hidden = self.head, self.hidden[start:end]
        with torch.no_grad():
            if workspace is None:
                return LogitChunk(project(hidden, head.weight, head.bias, head.transform, vocab_size))
            logits = project_into(hidden, head.weight, head.bias, vocab_size, workspace.get("teacher_logits", end - start))
            return LogitChunk(head.transform(logits).float())


class LogitChunk:
    """The teacher's dense logits ``(n, V)`` of one chunk."""

    def __init__(self, logits: torch.Tensor):
        self._logits = logits

    def logits(self, like: torch.Tensor | None = None, temperature: float | None = None) -> torch.Tensor:
        """The chunk's logits ``(n, V)`` (``like`` and ``temperature`` concern teachers that are not dense)."""
        return self._logits

    def cross_entropy_sum(self, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            return self._logits.new_zeros((), dtype=torch.float32)
        return F.cross_entropy(self._logits, labels, reduction="sum", ignore_index=IGNORE_INDEX)

    def fused_kl_ce(self, student_logits: torch.Tensor, labels: torch.Tensor | None, kl: FusedKL, kd_weight: float,
                    ce_weight: float, workspace: ChunkWorkspace, densify: bool = False):
        """:func:`~llmkd.losses.fused.fused_kl_ce_chunk` on this chunk (``densify`` has no meaning for dense
        logits)."""
        return fused_kl_ce_chunk(student_logits, self._logits, labels, kl, kd_weight, ce_weight, workspace)


def _check_same_tokens(student_tokens: int, teacher_tokens: int, what: str) -> None:
    if student_tokens != teacher_tokens:
        raise ValueError(f"student has {student_tokens} tokens but {what} has {teacher_tokens}: both must be the same "
                         "valid positions of the same batch.")


def _check_fits(vocab_size: int, student_rows: int, teacher_rows: int) -> None:
    if vocab_size > min(student_rows, teacher_rows):
        raise ValueError(f"vocab_size={vocab_size} exceeds a head's output size (student {student_rows}, teacher "
                         f"{teacher_rows}).")
