"""Losses between a student and a teacher with different tokenizers, on aligned spans (docs/ALGORITHMS.md
section 6, docs/CROSS_TOKENIZER.md).

The text of a row splits into *spans* whose boundaries are token boundaries of both tokenizers
(:mod:`llmkd.cross_tokenizer`); span ``j`` holds student target tokens ``y_1..y_a`` and teacher target tokens
``u_1..u_b``. Both models predict the span's first token from the same text prefix, so the distributions at the
span's first row on each side are comparable without a vocabulary map; the later tokens of a span enter through
the probability each model gives them (GOLD's "observed" merge): the span's student distribution is

    q_j(v) = softmax(z_s[first] / T)(v) * prod_{i > 1} softmax(z_s[i] / T)(y_i)      (an unnormalised (V_s,) vector)

and ``p_j`` the same for the teacher. The losses (each a sum over spans, with gradient to the student's logits):

* :class:`ULDLoss` (Boizard et al. 2024): ``sum_r |sort(q_j)[r] - sort(p_j)[r]|`` over the ``top_k`` largest
  entries of each side (sorted decreasingly; the shorter side padded with zeros): the Wasserstein-1 distance of
  ULD, truncated to the top-k so that no sort over a whole vocabulary is needed.
* :class:`HybridLoss` (TRL's GOLD): on 1:1 spans, ``w_shared * D(z_s[shared_s], z_t[shared_t])`` (any token loss
  ``D``, e.g. an llmkd :class:`~llmkd.losses.Divergence`, on the logits restricted to the tokens both vocabularies
  share, i.e. the shared part renormalised) plus ``w_rest * ULD`` of the probabilities of the tokens outside the
  shared vocabulary; on the other spans, ULD. Default weights as GOLD's: ``w_shared = |shared| / V_t``,
  ``w_rest = 1 - w_shared``.
* :class:`SpanLikelihoodLoss` (ALM, Minixhofer et al. 2025): the log-probability of the span's tokens on each side,
  ``log P_s(j) = sum_i log softmax(z_s[i] / T)(y_i)`` and ``log P_t(j)``, compared by the binary KL between
  Bernoulli(``P_t(j)``) and Bernoulli(``P_s(j)``). It needs no vocabulary at all.

The engine (:func:`~llmkd.losses.chunked_loss`) runs them chunk by chunk like any token loss: the targets object
:class:`AlignedTeacher` cuts the N student rows into chunks that never split a span and gives each chunk its
teacher rows (:class:`AlignedChunk`); the loss of a chunk is computed from the chunk's ``(n_s, V_s)`` student logits
and ``(n_t, V_t)`` teacher logits, and the engine's normaliser (the step's student token count) divides the sum.
Student tokens outside every span get the cross-entropy only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .fused import ChunkWorkspace, fused_kl_ce_chunk
from .targets import _check_same_tokens

#: binary KL clamps span probabilities to [0, 1 - SPAN_EPSILON] on the student's side (log(1 - P) stays finite)
SPAN_EPSILON = 1e-6


class AlignedTeacher:
    """The teacher targets of a cross-tokenizer batch, for the chunked engine and its dense reference.

    Args:
        teacher: the teacher's targets of its own ``N_t`` rows in its own vocabulary (a
            :class:`~llmkd.losses.ProjectedTeacher` or :class:`~llmkd.losses.DenseTargets`).
        student_spans: ``(N,)`` long, the global span of each of the student's N valid tokens (``-1``: in no span);
            non-negative entries non-decreasing (spans numbered in row-major text order).
        teacher_spans: ``(N_t,)`` long, the span of each teacher row (all ``>= 0``, non-decreasing).
        teacher_labels: ``(N_t,)`` long, the teacher's target token at each of its rows.
        teacher_vocab_size: the teacher's vocabulary (its head is cut to it).
        shared: ``(student_ids (S,), teacher_ids (S,))`` long, the tokens both vocabularies share (the hybrid loss),
            or None.
    """

    def __init__(self, teacher, student_spans: torch.Tensor, teacher_spans: torch.Tensor,
                 teacher_labels: torch.Tensor, teacher_vocab_size: int, shared=None):
        self.teacher = teacher
        self.student_spans = student_spans.long()
        self.teacher_spans = teacher_spans.long()
        self.teacher_labels = teacher_labels.long()
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.shared = shared
        _check_same_tokens(self.teacher_spans.shape[0], teacher.num_tokens, "the teacher's span list")
        if self.teacher_labels.shape != self.teacher_spans.shape:
            raise ValueError(f"teacher_labels {tuple(self.teacher_labels.shape)} and teacher_spans "
                             f"{tuple(self.teacher_spans.shape)} must both be (N_t,).")
        if (self.teacher_spans < 0).any() or (self.teacher_spans.diff() < 0).any():
            raise ValueError("teacher_spans must be non-negative and non-decreasing (the teacher rows of trained "
                             "spans, in text order).")
        inside = self.student_spans[self.student_spans >= 0]
        if (inside.diff() < 0).any():
            raise ValueError("student_spans must be non-decreasing where non-negative (spans in text order).")

    @property
    def num_tokens(self) -> int:
        return self.student_spans.shape[0]

    def default_vocab_size(self, student_rows: int) -> int:
        return student_rows

    def check(self, num_tokens: int, student_rows: int, vocab_size: int) -> None:
        _check_same_tokens(num_tokens, self.num_tokens, "the span list")
        if vocab_size > student_rows:
            raise ValueError(f"vocab_size={vocab_size} exceeds the student head's {student_rows} rows.")

    def chunk_bounds(self, chunk_size: int) -> list[tuple[int, int]]:
        """Chunks of about ``chunk_size`` student rows, each cut where no span continues across the cut (a span
        longer than ``chunk_size`` is one chunk)."""
        n = self.num_tokens
        if n == 0:
            return []
        spans = self.student_spans
        # a cut before row i is allowed unless rows i-1 and i are in the same span
        same = (spans[1:] == spans[:-1]) & (spans[1:] >= 0)
        allowed = torch.cat([torch.nonzero(~same).flatten() + 1, torch.tensor([n], device=spans.device)]).tolist()
        bounds, start, index = [], 0, 0
        while start < n:
            target = start + max(int(chunk_size), 1)
            while index + 1 < len(allowed) and allowed[index + 1] <= target:
                index += 1
            end = allowed[index] if allowed[index] > start else allowed[index + 1]
            while allowed[index] < end:
                index += 1
            bounds.append((start, end))
            start = end
        return bounds

    def chunk(self, start: int, end: int, vocab_size: int, workspace=None) -> "AlignedChunk":
        spans = self.student_spans[start:end]
        inside = spans[spans >= 0]
        if len(inside) == 0:
            first = last = 0
            teacher_start = teacher_end = 0
        else:
            first, last = int(inside[0]), int(inside[-1])
            teacher_start = int(torch.searchsorted(self.teacher_spans, first, right=False))
            teacher_end = int(torch.searchsorted(self.teacher_spans, last, right=True))
        if teacher_end > teacher_start:
            with torch.no_grad():
                logits = self.teacher.chunk(teacher_start, teacher_end, self.teacher_vocab_size).logits().float()
        else:
            logits = torch.zeros(0, self.teacher_vocab_size, device=spans.device)
        return AlignedChunk(
            student_spans=torch.where(spans >= 0, spans - first, spans),
            teacher_spans=self.teacher_spans[teacher_start:teacher_end] - first,
            num_spans=last - first + 1 if len(inside) else 0,
            teacher_logits=logits, teacher_labels=self.teacher_labels[teacher_start:teacher_end], shared=self.shared)


class AlignedChunk:
    """One chunk: the student rows' span ids ``(n_s,)`` and the teacher's ``(n_t, V_t)`` logits of the same spans
    (span ids ``0..num_spans-1`` local to the chunk)."""

    def __init__(self, student_spans, teacher_spans, num_spans, teacher_logits, teacher_labels, shared):
        self.student_spans, self.teacher_spans, self.num_spans = student_spans, teacher_spans, int(num_spans)
        self.teacher_logits, self.teacher_labels, self.shared = teacher_logits, teacher_labels, shared
        self._readers: dict[float, Reader] = {}

    def logits(self, like=None, temperature=None) -> torch.Tensor:
        raise TypeError("A cross-tokenizer teacher's logits are over another vocabulary: only the cross-tokenizer "
                        "losses (ULDLoss, HybridLoss, SpanLikelihoodLoss) take them.")

    def reader(self, temperature: float) -> "Reader":
        """The teacher's log-probabilities at ``temperature`` (a :class:`Reader`, made once per temperature)."""
        if temperature not in self._readers:
            self._readers[temperature] = Reader(self.teacher_logits, temperature)
        return self._readers[temperature]

    def unshared(self, student_vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's and the teacher's token ids outside the shared vocabulary (the hybrid's rest)."""
        shared_student, shared_teacher = self.shared
        keep_s = torch.ones(student_vocab_size, dtype=torch.bool, device=shared_student.device)
        keep_t = torch.ones(self.teacher_logits.shape[1], dtype=torch.bool, device=shared_teacher.device)
        keep_s[shared_student], keep_t[shared_teacher] = False, False
        return torch.nonzero(keep_s).flatten(), torch.nonzero(keep_t).flatten()

    def cross_entropy_sum(self, labels=None) -> torch.Tensor:
        """The teacher's cross-entropy on its own target tokens in the chunk's spans, summed."""
        if self.teacher_logits.shape[0] == 0:
            return self.teacher_logits.new_zeros(())
        rows = torch.arange(self.teacher_logits.shape[0], device=self.teacher_logits.device)
        return -self.reader(1.0).at(rows, self.teacher_labels).sum()


def span_structure(spans: torch.Tensor, num_spans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first_row (m,), tokens (m,))``: the first row of each span and its number of rows (``spans`` ``(n,)``,
    ``-1`` = no span)."""
    inside = spans >= 0
    rows = torch.arange(spans.shape[0], device=spans.device)
    first = torch.full((num_spans,), spans.shape[0], dtype=torch.long, device=spans.device)
    first.scatter_reduce_(0, spans[inside], rows[inside], reduce="amin")
    return first, torch.bincount(spans[inside], minlength=num_spans)


def covers(index: torch.Tensor, size: int) -> bool:
    """Whether the 1-D ``index`` is exactly ``0..size-1`` (selecting by it is the identity; an ``O(size)`` check
    that saves an ``O(rows x size)`` copy)."""
    return index.shape[0] == size and (size == 0 or bool(torch.equal(index, torch.arange(size, device=index.device))))


def block(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``values[rows][:, cols]`` ``(len(rows), len(cols))`` for 1-D ``rows`` and ``cols`` (two ``index_select``: on a
    CPU several times faster than broadcast advanced indexing). A selection that is the identity is skipped, so the
    result may be ``values`` itself: a caller that writes into it copies it first."""
    if not covers(rows, values.shape[0]):
        values = values.index_select(0, rows)
    if not covers(cols, values.shape[1]):
        values = values.index_select(1, cols)
    return values


def add_block_(values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, block_values: torch.Tensor,
               alpha: float = 1.0) -> None:
    """``values[rows[:, None], cols[None, :]] += alpha * block_values`` in place for unique ``rows`` and ``cols``
    (one flat ``index_add_``; a row-wise ``index_add_`` or a plain ``add_`` when ``cols`` or both are complete)."""
    if covers(cols, values.shape[1]):
        if covers(rows, values.shape[0]):
            values.add_(block_values, alpha=alpha)
        else:
            values.index_add_(0, rows, block_values, alpha=alpha)
        return
    flat = (rows[:, None] * values.shape[1] + cols[None, :]).reshape(-1)
    values.view(-1).index_add_(0, flat, block_values.reshape(-1), alpha=alpha)


class Reader:
    """One side's log-probabilities at a temperature, ``log softmax(z / T)`` for logits ``z`` ``(n, V)``, read
    where the losses need them: at a few entries per row (:meth:`at`) or at each row's top-k (:meth:`top_k`).

    Untracked, the reads are ordinary indexing (autograd flows through them when ``z`` requires grad: the dense
    form of a loss). Tracked, ``z`` is detached and every read of log-probabilities (:attr:`reads`) or of raw logits
    (:meth:`logits_at`, :attr:`logit_reads`) is a leaf remembered with its indices, so that the loss's gradient with
    respect to ``z`` can be formed from the leaves' gradients (:meth:`AlignedLoss.fused`)."""

    def __init__(self, logits: torch.Tensor, temperature: float, track: bool = False):
        self.logits, self.temperature, self.track = logits, float(temperature), track
        scaled = logits if self.temperature == 1.0 else logits / self.temperature
        self.values = F.log_softmax(scaled, dim=-1)  # (n, V): one fused kernel, faster than logsumexp on a CPU
        self.vocab_size = logits.shape[-1]
        self.reads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.logit_reads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        #: gradients with respect to raw logits a loss formed in closed form: (rows, cols, gradient)
        self.logit_gradients: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _leaf(self, value: torch.Tensor, rows, cols, into: list) -> torch.Tensor:
        if not self.track:
            return value
        leaf = value.detach().requires_grad_(True)
        into.append((rows, cols, leaf))
        return leaf

    def at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``log q[rows, cols]`` (``rows`` and ``cols`` broadcast, e.g. ``(r, 1)`` and ``(r, c)``)."""
        return self._leaf(self.values[rows, cols], rows, cols, self.reads)

    def logits_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The raw logits ``z[rows][:, cols]`` ``(len(rows), len(cols))`` for 1-D ``rows`` and ``cols`` (the
        hybrid's shared part takes logits)."""
        return self._leaf(block(self.logits, rows, cols), rows, cols, self.logit_reads)

    def top_k(self, rows: torch.Tensor, k: int, columns: torch.Tensor | None = None) -> torch.Tensor:
        """``(len(rows), k)``: the ``k`` largest log-probabilities of each of ``rows`` (decreasing), among
        ``columns`` only when given (the hybrid's unshared tokens; ``-inf`` past their number)."""
        if columns is not None:
            candidates = block(self.values.detach(), rows, columns)  # (r, C)
            kept = min(k, columns.shape[0])
            index = columns[candidates.topk(kept, dim=-1).indices] if kept else \
                candidates.new_zeros((len(rows), 0), dtype=torch.long)
            values = self.at(rows[:, None], index)
            return F.pad(values, (0, k - kept), value=float("-inf"))
        if 2 * len(rows) >= self.values.shape[0]:  # most rows: one top-k over the whole tensor, no row copy
            index = self.values.detach().topk(k, dim=-1).indices[rows]
        else:
            index = self.values[rows].detach().topk(k, dim=-1).indices
        return self.at(rows[:, None], index)


class SpanSide:
    """One side's view of a chunk's spans, from its log-probabilities at the loss's temperature (a
    :class:`Reader`), its target tokens ``labels`` ``(n,)`` and the span of each row ``spans`` ``(n,)`` (``-1``:
    none), with per span (``(m,)`` each): ``log_likelihood`` (the sum of its tokens' log-probabilities), ``first``
    (its first row), ``tokens`` (its row count) and ``log_scale`` (the log-probability of its tokens after the
    first: the merge of the module docstring)."""

    def __init__(self, log_probs: Reader, spans: torch.Tensor, labels: torch.Tensor, num_spans: int):
        self.log_probs = log_probs
        self.vocab_size = log_probs.vocab_size
        self.first, self.tokens = span_structure(spans, num_spans)
        rows = torch.nonzero(spans >= 0).flatten()
        targets = labels.clamp_min(0)
        token = log_probs.at(rows, targets[rows])  # (n_in,)
        total = torch.zeros(num_spans, dtype=token.dtype, device=token.device)
        self.log_likelihood = total.index_add(0, spans[rows], token)
        self.log_scale = self.log_likelihood - log_probs.at(self.first, targets[self.first])

    def merged_top_k(self, spans: torch.Tensor, top_k: int) -> torch.Tensor:
        """``(len(spans), top_k)``: the ``top_k`` largest probabilities of each merged span distribution ``q_j``
        (decreasing; zero-padded past the vocabulary). Scaling a row by a constant keeps its order, so the top-k
        of the first row's log-probabilities is taken and shifted: no ``(m, V)`` distribution is formed."""
        k = min(int(top_k), self.vocab_size)
        values = self.log_probs.top_k(self.first[spans], k)
        return F.pad((values + self.log_scale[spans, None]).exp(), (0, int(top_k) - k))

    def rest_top_k(self, spans: torch.Tensor, columns: torch.Tensor, top_k: int) -> torch.Tensor:
        """``(len(spans), top_k)``: the largest probabilities of the spans' first rows among the token ids
        ``columns`` (the hybrid's unshared part of 1:1 spans), zero-padded."""
        return self.log_probs.top_k(self.first[spans], int(top_k), columns).exp()


def sorted_top_k_distance(q_top: torch.Tensor, p_top: torch.Tensor) -> torch.Tensor:
    """``(m,)``: ``sum_r |q_top[r] - p_top[r]|``, the sorted-probability distance of two ``(m, top_k)`` decreasing
    top-k (zero-padded) probability lists."""
    return (q_top - p_top).abs().sum(-1)


class AlignedLoss:
    """Shared by the cross-tokenizer losses. The engine calls a loss in one of two forms:

    * ``loss(student_logits (n_s, V_s), chunk, labels (n_s,)) -> ()``: the sum over the chunk's spans with
      ordinary autograd (the dense reference, and a student with logit post-processing);
    * :meth:`fused`: the same sum, the student's cross-entropy, and their gradient with respect to the student's
      logits, formed without autograd over ``(n, V)``: the loss reads the student's log-probabilities at a few
      entries per row (:class:`Reader`), autograd runs over those reads only, and the log-softmax's backward is
      applied in closed form, ``dL/dz = (G - softmax(z / T) sum_v G_v) / T`` for ``G = dL/dlog q``.

    A subclass implements :meth:`span_sums` once for both forms.
    """

    aligned = True

    def __init__(self, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.temperature = float(temperature)

    def teacher_side(self, chunk: AlignedChunk) -> SpanSide:
        return SpanSide(chunk.reader(self.temperature), chunk.teacher_spans, chunk.teacher_labels, chunk.num_spans)

    def span_sums(self, student: SpanSide, chunk: AlignedChunk,
                  with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(the loss summed over the chunk's spans, the target entropy summed (0 unless reported))``."""
        raise NotImplementedError

    def __call__(self, student_logits: torch.Tensor, chunk: AlignedChunk, labels: torch.Tensor) -> torch.Tensor:
        if chunk.num_spans == 0:
            return student_logits.sum() * 0.0
        student = SpanSide(Reader(student_logits.float(), self.temperature), chunk.student_spans, labels,
                           chunk.num_spans)
        return self.span_sums(student, chunk, with_entropy=False)[0]

    @torch.no_grad()
    def fused(self, student_logits: torch.Tensor, chunk: AlignedChunk, labels: torch.Tensor, kd_weight: float,
              ce_weight: float, with_entropy: bool = False):
        """``(kd sum, ce sum, teacher ce sum, target entropy sum, dL/dz (n, V))`` for ``L = kd_weight * kd +
        ce_weight * ce`` (CE at temperature 1 over the rows whose label is not ``-100``), ``z`` the student's
        float32 logits ``(n, V)`` (detached)."""
        z = student_logits.float()
        zero = z.new_zeros(())
        kd, entropy = zero, zero
        reader = Reader(z, self.temperature, track=True)
        grads, logit_grads = [], []
        if chunk.num_spans:
            with torch.enable_grad():
                student = SpanSide(reader, chunk.student_spans, labels, chunk.num_spans)
                kd, entropy = self.span_sums(student, chunk, with_entropy)
                leaves = [leaf for _, _, leaf in reader.reads + reader.logit_reads]
                found = torch.autograd.grad(kd, leaves, allow_unused=True) if kd.requires_grad else [None] * len(leaves)
            grads, logit_grads = found[:len(reader.reads)], found[len(reader.reads):]
        # the log-softmax's backward: -softmax(z / T) * (sum of the row's log-probability gradients), then the reads
        row_sums = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        sparse = []
        for (rows, cols, _), grad in zip(reader.reads, grads):
            if grad is not None:
                rows_b, cols_b = torch.broadcast_tensors(rows, cols)
                row_sums.index_add_(0, rows_b.reshape(-1), grad.reshape(-1))
                sparse.append((rows_b, cols_b, grad))
        valid = labels != IGNORE_INDEX
        targets = labels.clamp_min(0)
        ce_sum = zero
        if self.temperature == 1.0:  # CE at T = 1 reads the same log-probabilities
            ce_sum = -reader.values.gather(1, targets[:, None]).squeeze(1)[valid].sum()
        grad_z = reader.values.exp_()  # softmax(z / T), in place: every read above is a copy
        scale = -kd_weight / self.temperature * row_sums
        if self.temperature == 1.0:
            # and shares the softmax: (ce_weight * valid - kd_weight * row_sums) * softmax - ce_weight * onehot
            grad_z.mul_((scale + ce_weight * valid.float())[:, None])
        else:
            grad_z.mul_(scale[:, None])
            if valid.any():
                log_p1 = F.log_softmax(z[valid], dim=-1)
                ce_sum = -log_p1.gather(1, labels[valid][:, None]).sum()
                grad_z[valid] += ce_weight * log_p1.exp_()
        if valid.any() and ce_weight != 0.0:
            rows = torch.nonzero(valid).flatten()
            grad_z.index_put_((rows, labels[rows]), torch.full_like(rows, -ce_weight, dtype=z.dtype), accumulate=True)
        for rows_b, cols_b, grad in sparse:
            grad_z.index_put_((rows_b, cols_b), grad * (kd_weight / self.temperature), accumulate=True)
        logit_gradients = [(rows, cols, grad) for (rows, cols, _), grad in zip(reader.logit_reads, logit_grads)
                           if grad is not None] + reader.logit_gradients
        for rows, cols, grad in logit_gradients:  # of the raw logits (the hybrid's shared part): unique entries
            add_block_(grad_z, rows, cols, grad, alpha=kd_weight)
        return kd.detach(), ce_sum, chunk.cross_entropy_sum(), entropy.detach(), grad_z


class ULDLoss(AlignedLoss):
    """ULD on aligned spans (module docstring), truncated to the ``top_k`` largest probabilities of each side."""

    def __init__(self, top_k: int = 64, temperature: float = 1.0):
        super().__init__(temperature)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}.")
        self.top_k = int(top_k)

    def span_sums(self, student, chunk, with_entropy):
        teacher = self.teacher_side(chunk)
        every = torch.arange(chunk.num_spans, device=student.first.device)
        total = sorted_top_k_distance(student.merged_top_k(every, self.top_k),
                                      teacher.merged_top_k(every, self.top_k)).sum()
        return total, total.new_zeros(())


class HybridLoss(AlignedLoss):
    """GOLD's hybrid (module docstring): ``shared_loss`` on the shared vocabulary of 1:1 spans, ULD elsewhere.

    Args:
        shared_loss: a token loss ``(student_logits (n, S), teacher_logits (n, S)) -> (n,)`` (an llmkd
            :class:`~llmkd.losses.Divergence`, or TAID's interpolated KL) on the shared vocabulary's logits.
        top_k / temperature: ULD's (the temperature of the unshared probabilities and of the other spans).
        shared_weight: the weight of the shared part (None: GOLD's ``|shared| / V_t``); ``rest_weight`` that of
            the unshared part (None: ``1 - shared_weight``).
    """

    def __init__(self, shared_loss, top_k: int = 64, temperature: float = 1.0, shared_weight: float | None = None,
                 rest_weight: float | None = None):
        super().__init__(temperature)
        self.shared_loss, self.top_k = shared_loss, int(top_k)
        self.shared_weight, self.rest_weight = shared_weight, rest_weight
        if callable(getattr(shared_loss, "with_target_entropy", None)):  # TAID: its schedule watches H(p_t)
            self.with_target_entropy = self._with_target_entropy

    def weights(self, num_shared: int, teacher_vocab_size: int) -> tuple[float, float]:
        shared = num_shared / max(teacher_vocab_size, 1) if self.shared_weight is None else self.shared_weight
        rest = 1.0 - shared if self.rest_weight is None else self.rest_weight
        return float(shared), float(rest)

    def _with_target_entropy(self, student_logits, chunk, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss sum, sum of the shared loss's target entropy over the 1:1 spans)`` (a shared loss that reports
        it, such as TAID's; see :meth:`~llmkd.losses.TAIDTokenLoss.with_target_entropy`)."""
        if chunk.num_spans == 0:
            return student_logits.sum() * 0.0, student_logits.new_zeros(())
        student = SpanSide(Reader(student_logits.float(), self.temperature), chunk.student_spans, labels,
                           chunk.num_spans)
        return self.span_sums(student, chunk, with_entropy=True)

    def span_sums(self, student, chunk, with_entropy):
        if chunk.shared is None:
            raise ValueError("HybridLoss needs the shared vocabulary (AlignedTeacher(shared=...)).")
        shared_student, shared_teacher = chunk.shared
        rest_student, rest_teacher = chunk.unshared(student.vocab_size)
        teacher = self.teacher_side(chunk)
        entropy = torch.zeros((), device=student.first.device)
        one_to_one = (student.tokens == 1) & (teacher.tokens == 1)
        spans = torch.arange(chunk.num_spans, device=student.first.device)
        total = torch.zeros((), device=student.first.device)
        if not one_to_one.all():
            others = spans[~one_to_one]
            total = sorted_top_k_distance(student.merged_top_k(others, self.top_k),
                                          teacher.merged_top_k(others, self.top_k)).sum()
        if one_to_one.any():
            singles = spans[one_to_one]
            rows = student.first[singles]
            z_t = block(chunk.teacher_logits, teacher.first[singles], shared_teacher)  # (m1, S)
            shared_weight, rest_weight = self.weights(shared_student.shape[0], chunk.teacher_logits.shape[1])
            closed_form = getattr(self.shared_loss, "fused_kl", lambda: None)() if student.log_probs.track else None
            if closed_form is not None and not with_entropy:  # forward KL: value and gradient in closed form
                z_s = block(student.log_probs.logits, rows, shared_student)
                if z_t is chunk.teacher_logits:  # the kernel overwrites its teacher logits
                    z_t = z_t.clone()
                workspace = ChunkWorkspace(z_s.shape[0], z_s.shape[1], z_s.device)
                shared_part, _, _, _, grad = fused_kl_ce_chunk(z_s, z_t, None, closed_form, shared_weight, 0.0,
                                                               workspace)
                student.log_probs.logit_gradients.append((rows, shared_student, grad))
            elif with_entropy:
                z_s = student.log_probs.logits_at(rows, shared_student)  # (m1, S)
                per_token, target_entropy = self.shared_loss.with_target_entropy(z_s, z_t)
                shared_part, entropy = per_token.sum(), target_entropy.detach().sum()
            else:
                z_s = student.log_probs.logits_at(rows, shared_student)  # (m1, S)
                shared_part = self.shared_loss(z_s, z_t).sum()
            rest = sorted_top_k_distance(student.rest_top_k(singles, rest_student, self.top_k),
                                         teacher.rest_top_k(singles, rest_teacher, self.top_k)).sum()
            total = total + shared_weight * shared_part + rest_weight * rest
        return total, entropy


class SpanLikelihoodLoss(AlignedLoss):
    """ALM's span likelihood matching (module docstring): the binary KL between Bernoulli(``P_t(span)``) and
    Bernoulli(``P_s(span)``), summed over spans; the student's span probability is clamped to
    ``1 - SPAN_EPSILON``."""

    def span_sums(self, student, chunk, with_entropy):
        teacher = self.teacher_side(chunk)
        total = binary_kl(teacher.log_likelihood, student.log_likelihood).sum()
        return total, total.new_zeros(())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def binary_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(Bernoulli(p) || Bernoulli(q))`` elementwise from ``log p`` and ``log q`` (``q`` clamped to
    ``1 - SPAN_EPSILON``; ``p`` to the same so that ``p = 1`` contributes its limit 0 for the second term)."""
    ceiling = torch.log1p(torch.tensor(-SPAN_EPSILON, dtype=log_q.dtype, device=log_q.device))
    log_q, log_p = torch.minimum(log_q, ceiling), torch.minimum(log_p, ceiling)
    p = log_p.exp()
    return p * (log_p - log_q) + (1 - p) * (log1mexp(log_p) - log1mexp(log_q))
