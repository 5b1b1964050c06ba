"""A teacher behind an inference server (:class:`ServedTeacher`, docs/SERVED_TEACHERS.md)."""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch

from ..heads import head_rows
from ..losses import SparseTeacher
from .base import TeacherSignal, ready

logger = logging.getLogger(__name__)


def open_teacher_server(args, teacher_model, teacher_cache, task: str):
    """The :class:`~llmkd.teacher_server.TeacherServer` named by ``args.teacher_server`` (checked against the run's
    other teacher settings), or None when the run has none."""
    if not args.teacher_server:
        return None
    if teacher_model is not None or teacher_cache is not None:
        raise ValueError("teacher_server was given with a teacher model or teacher_cache: train from one of them (the "
                         "server replaces the local teacher).")
    if task != "causal_lm":
        raise ValueError("teacher_server serves token distributions of causal LMs; sequence classifiers need a live "
                         "teacher.")
    if args.seq_kd:
        raise ValueError("seq_kd samples completions from the teacher, which a served teacher does not do in this "
                         "run: use lmbda (student samples, scored by the server) or the dataset's completions.")
    from ..teacher_server import TeacherServer

    return TeacherServer.from_config(args)


class ServedTeacher(TeacherSignal):
    """The teacher's top-k log-probabilities of each batch, from a :class:`~llmkd.teacher_server.TeacherServer`,
    as a :class:`~llmkd.losses.SparseTeacher` (top-k + tail: the same targets a cache of the same k gives).

    Prefetch: the collator hands every batch to :meth:`prefetch` as it is built, which happens one batch ahead of
    training (accelerate's data loader reads the next batch before yielding the current one), so that the requests
    for the next batch run while the student trains on this one. A row is requested once: :meth:`token_targets`
    takes its answer from the prefetched requests by the row's tokens, or requests it then (a batch the collator
    did not see, e.g. one whose completions the student just sampled).

    Args:
        server: the :class:`~llmkd.teacher_server.TeacherServer` (its tokenizer is checked against ``tokenizer``).
        student / tokenizer: the student (its head must cover the vocabulary; None: not checked, for a teacher
            with another tokenizer) and the tokenizer of the rows sent (the run's, or the teacher's own).
        top_k: log-probabilities per position (``0``: only the sampled token's, with ``sampled_token``).
        temperature: the run's; it must be 1 (a server applies no temperature to the tokens it scores).
        sampled_token: make every row's own next token one of the k (:meth:`RowScores.targets`), for the
            sampled-token objective of on-policy batches.
        max_pending: prefetched rows kept at most (the oldest are dropped first).
        columns: the batch columns of the rows sent, ``(token ids, attention mask)`` (a teacher with another
            tokenizer: its own tokens, :class:`~llmkd.teacher_signals.CrossTokenizerTeacher`).
    """

    def __init__(self, server, student, tokenizer, *, top_k: int, temperature: float = 1.0,
                 sampled_token: bool = False, max_pending: int = 4096,
                 columns: tuple[str, str] = ("input_ids", "attention_mask")):
        if temperature != 1.0:
            raise ValueError(f"temperature={temperature} with teacher_server: a server returns the log-probabilities "
                             "of the tokens it scores at temperature 1 (vLLM and SGLang apply no temperature to "
                             "prompt tokens), and another temperature's top-k needs the whole distribution. Set "
                             "temperature: 1.0, or run the teacher locally.")
        if top_k == 0 and not sampled_token:
            raise ValueError("teacher_server_top_k=0 asks for the sampled tokens' log-probabilities only, which only "
                             "the sampled-token objective uses: set lmbda: 1.0 and on_policy_objective: sampled_token, "
                             "or teacher_server_top_k >= 1.")
        server.check_tokenizer(tokenizer)
        self.server = server
        self.vocab_size = len(tokenizer)
        if student is not None and self.vocab_size > head_rows(student):
            raise ValueError(f"The tokenizer has {self.vocab_size} tokens but the student's head scores only "
                             f"{head_rows(student)}: the student does not fit this tokenizer.")
        self.top_k = min(int(top_k), self.vocab_size)
        self.sampled_token = bool(sampled_token)
        self.max_pending = int(max_pending)
        #: row tokens -> [the request's future, the batches built but not trained on yet that hold the row]
        self._pending: OrderedDict[bytes, list] = OrderedDict()
        self.rows_requested = 0
        self.rows_prefetched = 0
        self.columns = columns

    def prepare_dataset(self, dataset, tokenizer, split: str):
        if dataset is not None and len(dataset):
            import pyarrow.compute as pc

            column = dataset.data.column(self.columns[0])
            self.server.check_lengths([pc.max(pc.list_value_length(column)).as_py()])
        return dataset

    # ------------------------------------------------------------------------------------------------ requests
    def _submit(self, ids: np.ndarray):
        self.rows_requested += 1
        return self.server.submit(ids.tolist(), self.top_k)

    def prefetch(self, batch: dict) -> None:
        """Request the scores of ``batch``'s rows now (called by the collator; CPU tensors)."""
        ids_column, mask_column = self.columns
        for key, ids in {ids.tobytes(): ids for ids in _rows(batch[ids_column], batch.get(mask_column))}.items():
            if key in self._pending:  # the same row in a batch not trained on yet: one request, used twice
                self._pending[key][1] += 1
            else:
                self._pending[key] = [self._submit(ids), 1]
                self.rows_prefetched += 1
        while len(self._pending) > self.max_pending:
            _, (future, _) = self._pending.popitem(last=False)
            future.cancel()

    def _take(self, key: bytes, ids: np.ndarray):
        entry = self._pending.get(key)
        if entry is None:
            return self._submit(ids)
        entry[1] -= 1
        if entry[1] == 0:
            del self._pending[key]
        return entry[0]

    def _answers(self, rows: list[np.ndarray]) -> list:
        futures = {}
        for ids in rows:  # a row repeated in the batch is requested once
            key = ids.tobytes()
            if key not in futures:
                futures[key] = self._take(key, ids)
        return [futures[ids.tobytes()].result() for ids in rows]

    # ------------------------------------------------------------------------------------------------ targets
    def token_targets(self, model_inputs: dict, valid: torch.Tensor, *, dense: bool = False):
        return ready(self.sparse_targets(model_inputs["input_ids"], model_inputs.get("attention_mask"), valid))

    def sparse_targets(self, input_ids: torch.Tensor, mask: torch.Tensor | None, valid: torch.Tensor):
        """The :class:`~llmkd.losses.SparseTeacher` of rows ``input_ids`` ``(B, S)`` (padded on either side, as
        ``mask`` says) at the positions ``valid`` ``(B, S-1)``, row-major: what the server gives for them."""
        rows = list(_rows(input_ids, mask))
        answers = self._answers(rows)
        mask = torch.ones_like(input_ids) if mask is None else mask
        # the position of each padded column in its unpadded row (padding on either side)
        unpadded = (mask.long().cumsum(dim=1) - 1)[:, :-1].cpu().numpy()
        valid_cpu = valid.cpu().numpy()
        parts = [answer.targets(unpadded[b][valid_cpu[b]], self.vocab_size, self.sampled_token)
                 for b, answer in enumerate(answers)]
        ids, log_probs, tail = (torch.from_numpy(np.concatenate([part[i] for part in parts])) for i in range(3))
        return SparseTeacher(ids, log_probs, tail, self.vocab_size, 1.0).to(valid.device)

def _rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """Each row's real tokens ``(L_b,)`` int64 numpy, padding removed."""
    ids = input_ids.cpu().numpy()
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else attention_mask.cpu().numpy().astype(bool)
    for row, keep in zip(ids, mask):
        yield row[keep].astype(np.int64)
