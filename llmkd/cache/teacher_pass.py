"""Running the teacher over rows of a prepared dataset and encoding the cached quantities of each row."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..constants import IGNORE_INDEX
from ..data import DistillDataCollator
from .encoding import EncodedTokens, TokenEncoding
from .topk import teacher_topk


class TeacherPass:
    """The teacher, its inputs' collation and the encoding of its top-k outputs.

    Args:
        teacher: a causal LM (or a DeepSpeed/FSDP-wrapped one) whose forward returns ``.logits`` ``(B, S, V_head)``,
            already placed on its device.
        dataset: the prepared dataset (``input_ids``, ``attention_mask``, ``labels`` and any image field).
        columns: the dataset columns given to the collator.
        encoding: the cache's token encoding; ``temperature``: the softmax temperature.
        batch_size: rows per forward; ``pad_token_id``: the collator's padding id.
    """

    def __init__(self, teacher: nn.Module, dataset, columns: list[str], encoding: TokenEncoding, temperature: float,
                 batch_size: int, pad_token_id: int, device: torch.device):
        self.teacher = teacher
        self.dataset = dataset.select_columns(columns)
        self.encoding = encoding
        self.temperature = float(temperature)
        self.batch_size = int(batch_size)
        self.collator = DistillDataCollator(pad_token_id=pad_token_id, padding_side="right")
        self.pad_token_id = pad_token_id
        self.device = device
        self.forward_calls = 0

    def batches(self, start: int, stop: int, lengths: np.ndarray) -> list[list[int]]:
        """Rows ``[start, stop)`` grouped into batches of similar length (longest first, ties by row), so that
        little padding is computed; the grouping depends on the rows only, never on what ran before."""
        order = start + np.argsort(-lengths, kind="stable")
        return [order[i:i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def run_batch(self, rows: list[int]) -> tuple[list[int], EncodedTokens, int]:
        """Teacher forward on ``rows``; returns (cached tokens per row, their encoded tokens row after row, the
        number of input tokens the teacher read)."""
        columns = self.dataset[rows]
        features = [{name: columns[name][i] for name in columns} for i in range(len(rows))]
        batch = self.collator(features)
        labels = batch.pop("labels")
        inputs = {name: value.to(self.device) for name, value in batch.items()}
        logits = self.forward(inputs)  # (B, S, V_head)
        valid = labels[:, 1:] != IGNORE_INDEX  # (B, S - 1): logits[:, j] predicts labels[:, j + 1]
        batch_index, position = valid.nonzero(as_tuple=True)  # row-major: each row's tokens in order
        batch_index, position = batch_index.to(logits.device), position.to(logits.device)
        parts = []
        for begin in range(0, batch_index.numel(), 2048):
            chunk = logits[batch_index[begin:begin + 2048], position[begin:begin + 2048]]  # (n, V_head)
            ids, logprobs, tail = teacher_topk(chunk, self.encoding.k, temperature=self.temperature,
                                               vocab_size=self.encoding.vocab_size)
            parts.append(self.encoding.encode(ids, logprobs, tail))
        del logits
        counts = valid.sum(dim=1).tolist()
        return counts, EncodedTokens.concatenate(parts, self.encoding), int(batch["attention_mask"].sum())

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.forward_calls += 1
        return self.teacher(**inputs, use_cache=False).logits

    @torch.no_grad()
    def idle_forward(self) -> None:
        """A one-token forward whose output is discarded: keeps this process in step with the others when the
        teacher is partitioned (ZeRO-3/FSDP: every forward gathers parameters collectively)."""
        ids = torch.full((1, 1), self.pad_token_id, dtype=torch.long, device=self.device)
        self.forward({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
