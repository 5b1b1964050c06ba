"""Several teachers at once (:class:`MultiTeacher`, docs/MULTI_TEACHER.md): each row routed to one teacher by a
dataset column (the domain-expert setting), or every teacher on every token, mixed with weights."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..losses import TargetGroup
from .base import TeacherSignal
from .cached import CACHE_ROW

#: the column holding each prepared row's teacher (its index in the teacher list), made from the routing column
TEACHER_INDEX = "llmkd_teacher"


@dataclass
class NamedTeacher:
    """One of the teachers: its ``name`` (the routing column's value for its rows, and its logs), its signal
    (:class:`~llmkd.teacher_signals.OnlineTeacher`, :class:`~llmkd.teacher_signals.CachedTeacher` or
    :class:`~llmkd.teacher_signals.ServedTeacher`) and its ``weight``."""

    name: str
    signal: TeacherSignal
    weight: float = 1.0


class MultiTeacher(TeacherSignal):
    """Teacher targets from several teachers, as :class:`~llmkd.losses.TargetGroup` s (see
    :mod:`llmkd.losses.groups`).

    Args:
        teachers: the teachers (names unique; every signal's ``vocab_size`` the same).
        routing_column: the dataset column naming each row's teacher (values: the teachers' names); None: mix.
            Routed, a teacher's loss is weighted by its ``weight`` (default 1) and runs only on its rows; a local
            teacher runs its forward on those rows only. Mixed, every teacher scores every token and the weights
            (normalised to sum 1) weigh their losses.
    """

    def __init__(self, teachers: list[NamedTeacher], routing_column: str | None = None):
        names = [teacher.name for teacher in teachers]
        if len(teachers) < 2:
            raise ValueError(f"Several teachers need at least two, got {names}: give one teacher the usual way.")
        if len(set(names)) != len(names):
            raise ValueError(f"The teachers' names must be unique, got {names}.")
        if any(teacher.weight < 0 for teacher in teachers) or sum(teacher.weight for teacher in teachers) <= 0:
            raise ValueError(f"Teacher weights must be >= 0 with a positive sum, got "
                             f"{[teacher.weight for teacher in teachers]}.")
        sizes = {teacher.name: teacher.signal.vocab_size for teacher in teachers}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"The teachers' vocabularies differ ({sizes}): several teachers must share the student's "
                             "tokenizer.")
        self.teachers, self.routing_column = list(teachers), routing_column
        self.vocab_size = next(iter(sizes.values()))
        self.names = names

    @property
    def model(self):
        return None  # several; each signal holds its own

    # ------------------------------------------------------------------------------------------------ data
    def prepare_dataset(self, dataset, tokenizer, split: str):
        if dataset is None:
            return None
        if self.routing_column is not None:
            dataset = self._route(dataset)
        for teacher in self.teachers:
            dataset = teacher.signal.prepare_dataset(dataset, tokenizer, split)
        return dataset

    def _route(self, dataset):
        if self.routing_column not in dataset.column_names:
            raise ValueError(f"teacher_routing_column={self.routing_column!r} is not a column of the dataset "
                             f"(columns: {dataset.column_names}): each row needs its teacher's name there.")
        values = dataset[self.routing_column]
        index = {name: i for i, name in enumerate(self.names)}
        unknown = sorted({str(v) for v in values if str(v) not in index})
        if unknown:
            raise ValueError(f"Rows name teachers {unknown[:5]} in column {self.routing_column!r}, but the teachers "
                             f"are {self.names}: fix the column, or add those teachers.")
        return dataset.remove_columns(self.routing_column).add_column(TEACHER_INDEX,
                                                                      [index[str(v)] for v in values])

    def padded_columns(self) -> dict[str, int]:
        columns = {}
        for teacher in self.teachers:
            columns.update(teacher.signal.padded_columns())
        return columns

    def place(self, accelerator, *, is_deepspeed: bool, is_fsdp: bool) -> None:
        for teacher in self.teachers:
            teacher.signal.place(accelerator, is_deepspeed=is_deepspeed, is_fsdp=is_fsdp)

    # ------------------------------------------------------------------------------------------------ batches
    def _rows(self, batch: dict, index: int) -> torch.Tensor | None:
        """The batch rows of teacher ``index`` (None: all of them, when mixing)."""
        if self.routing_column is None:
            return None
        route = batch.get(TEACHER_INDEX)
        if route is None:
            raise ValueError(f"The batch has no {TEACHER_INDEX!r} column (the rows' teachers): keep "
                             "remove_unused_columns=False, and give on-policy batches their rows' teacher.")
        return torch.nonzero(route == index).flatten()

    @staticmethod
    def _select(batch: dict, rows: torch.Tensor | None) -> dict:
        """The batch's ``rows`` (None: all), as a new dict (a signal may take its columns out of it)."""
        if rows is None:
            return dict(batch)
        size = batch["input_ids"].shape[0]
        return {key: value.index_select(0, rows.to(value.device))
                if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size else value
                for key, value in batch.items()}

    def prefetch(self, batch: dict) -> None:
        for i, teacher in enumerate(self.teachers):
            rows = self._rows(batch, i)
            if rows is None or len(rows):
                teacher.signal.prefetch(self._select(batch, rows))

    def completions_batch(self, batch: dict) -> dict:
        return batch  # the rows keep their teacher column; every signal here needs nothing recomputed

    def token_targets(self, model_inputs: dict, valid: torch.Tensor, *, dense: bool = False):
        """A context manager yielding the list of :class:`~llmkd.losses.TargetGroup` (one per teacher; a routed
        teacher without tokens in this batch has ``targets`` None). Each teacher runs here, on its rows; the
        columns meant for the teachers are taken out of ``model_inputs``."""
        route = model_inputs.pop(TEACHER_INDEX, None)
        inputs = {**model_inputs, **{key: model_inputs.pop(key) for key in TEACHER_COLUMNS if key in model_inputs}}
        if self.routing_column is not None and route is None:
            raise ValueError(f"The batch has no {TEACHER_INDEX!r} column (the rows' teachers): keep "
                             "remove_unused_columns=False.")
        token_rows = torch.nonzero(valid)[:, 0]  # (N,): the row of each valid token, row-major
        total = sum(teacher.weight for teacher in self.teachers)
        pending = []
        for i, teacher in enumerate(self.teachers):
            if self.routing_column is None:
                rows, tokens, share, kd_weight = None, None, teacher.weight / total, teacher.weight / total
            else:
                rows = torch.nonzero(route == i).flatten().to(valid.device)
                tokens = torch.nonzero(torch.isin(token_rows, rows)).flatten()
                share, kd_weight = 1.0, teacher.weight
                if len(tokens) == 0:  # no token of this teacher in the batch (a partitioned one still steps)
                    pending.append((teacher.name, teacher.signal.idle(dense=dense), tokens, kd_weight, share, False))
                    continue
            sub_valid = valid if rows is None else valid.index_select(0, rows)
            targets = teacher.signal.token_targets(self._select(inputs, rows), sub_valid, dense=dense)
            pending.append((teacher.name, targets, tokens, kd_weight, share, True))
        return _entered(pending)


#: batch columns a teacher signal consumes (taken out before the student's forward)
TEACHER_COLUMNS = (CACHE_ROW,)


@contextlib.contextmanager
def _entered(pending):
    """The groups of ``pending`` ``(name, context, tokens, kd_weight, share, has_tokens)``, every context entered
    in order (an idle teacher's too, for its collectives; its group's targets are None)."""
    with contextlib.ExitStack() as stack:
        groups = []
        for name, context, tokens, kd_weight, share, has_tokens in pending:
            targets = stack.enter_context(context)
            groups.append(TargetGroup(name, targets if has_tokens else None, tokens, kd_weight, share))
        yield groups
