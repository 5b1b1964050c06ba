"""A top-k teacher (from the offline cache, :mod:`llmkd.cache`) as a loss input.

Per token the cache keeps the teacher's top-k token ids, their log-probabilities ``log p`` (at the cache's
temperature ``T_c``) and the log of the remaining mass ``log P_tail``. The tail's shape is unknown, so the losses
compare the two distributions on the top-k support plus ONE TAIL BUCKET: ``(p_1..p_k, P_tail)`` against
``(q_1..q_k, Q_tail)`` with ``Q_tail`` the student's mass outside the top-k. For forward KL:

    sum_{i in K} p_i (log p_i - log q_i) + P_tail (log P_tail - log Q_tail)

This is computed by densifying the teacher with a tail SHAPED LIKE THE STUDENT'S (detached): outside the top-k,
``p_j = P_tail * q_j / Q_tail``. Every divergence of section 0 (fkl, rkl, JSD, skew KLs, TVD) is an f-divergence,
whose terms vanish wherever the two distributions are proportional, so on this densification each equals its
top-k + tail-bucket value exactly, in value and gradient (tested; :meth:`SparseTeacher.forward_kl` is the explicit
bucket formula kept as the reference). At k = V everything is exact. TAID's interpolation and the Sinkhorn cost use
the same densified teacher: inside the tail the teacher then agrees with the student in shape, which is the
approximation (measured by ``scripts/bench_cache_error.py``, reported in BENCHMARKS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..constants import IGNORE_INDEX
from .fused import fused_kl_ce_chunk, fused_sparse_kl_ce_chunk


@dataclass
class SparseTeacher:
    """The top-k teacher targets of n tokens.

    Attributes:
        ids: ``(n, k)`` long, token ids (each < ``vocab_size``).
        log_probs: ``(n, k)`` float32, ``log p`` of those ids at temperature ``temperature``.
        tail_log_prob: ``(n,)`` float32, ``log`` of the mass outside the top-k (``-inf`` when k = V).
        vocab_size: V, the vocabulary the distribution is over.
        temperature: T_c, the temperature the log-probabilities were computed at.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_prob: torch.Tensor
    vocab_size: int
    temperature: float = 1.0

    def __post_init__(self):
        if self.ids.shape != self.log_probs.shape or self.ids.dim() != 2:
            raise ValueError(f"ids and log_probs must both be (n, k), got {tuple(self.ids.shape)} and "
                             f"{tuple(self.log_probs.shape)}.")
        if self.tail_log_prob.shape != self.ids.shape[:1]:
            raise ValueError(f"tail_log_prob must be (n,) = ({self.ids.shape[0]},), got {tuple(self.tail_log_prob.shape)}.")
        if self.ids.shape[1] > self.vocab_size:
            raise ValueError(f"k = {self.ids.shape[1]} exceeds vocab_size = {self.vocab_size}.")

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    def __getitem__(self, rows: slice) -> "SparseTeacher":
        return SparseTeacher(self.ids[rows], self.log_probs[rows], self.tail_log_prob[rows], self.vocab_size,
                             self.temperature)

    def to(self, device) -> "SparseTeacher":
        return SparseTeacher(self.ids.to(device), self.log_probs.to(device), self.tail_log_prob.to(device),
                             self.vocab_size, self.temperature)

    def dense_log_probs(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, V)`` float32 log-probabilities: the top-k exact and the tail mass ``P_tail`` spread over the other
        tokens in proportion to ``exp(like)`` (the student's log-probabilities, detached: the tail-bucket
        densification), or uniformly when ``like`` is None (or puts no mass outside the top-k)."""
        n, k = self.ids.shape
        rest = self.vocab_size - k
        tail = self.tail_log_prob.float()[:, None]  # (n, 1)
        if rest == 0:
            dense = torch.full((n, self.vocab_size), float("-inf"), device=self.ids.device)
        else:
            dense = (tail - math.log(rest)).expand(n, self.vocab_size)
            if like is not None:
                log_like = torch.log_softmax(like.detach().float(), dim=-1)
                log_like_tail = torch.logsumexp(log_like.scatter(1, self.ids, float("-inf")), dim=-1, keepdim=True)
                shaped = tail + log_like - torch.where(torch.isfinite(log_like_tail), log_like_tail,
                                                       torch.zeros_like(log_like_tail))
                dense = torch.where(torch.isfinite(log_like_tail), shaped, dense)
        dense = dense.scatter(1, self.ids, self.log_probs.float())
        # a quantized cache (8-bit log-probs) sums to 1 only approximately: renormalise (a no-op when exact)
        return dense - torch.logsumexp(dense, dim=-1, keepdim=True)

    def dense_logits(self, like: torch.Tensor | None = None) -> torch.Tensor:
        """``(n, V)`` logits whose ``softmax(z / T_c)`` is :meth:`dense_log_probs` (``T_c * log p``), for any loss
        that softens the teacher with its own temperature."""
        log_probs = self.dense_log_probs(like)
        return log_probs * self.temperature if self.temperature != 1.0 else log_probs

    # -- as the engine's teacher targets (llmkd.losses.targets): the whole batch, and each chunk of it -------------
    def default_vocab_size(self, student_rows: int) -> int:
        return self.vocab_size

    def check(self, num_tokens: int, student_rows: int, vocab_size: int) -> None:
        if self.num_tokens != num_tokens:
            raise ValueError(f"student has {num_tokens} tokens but the cached teacher has {self.num_tokens}: both must "
                             "be the same valid positions of the same batch.")
        if vocab_size != self.vocab_size or vocab_size > student_rows:
            raise ValueError(f"vocab_size={vocab_size} must equal the cache's vocabulary ({self.vocab_size}) and fit "
                             f"the student's head ({student_rows} rows).")

    def chunk(self, start: int, end: int, vocab_size: int, workspace=None) -> "SparseTeacher":
        return self[start:end]

    def logits(self, like: torch.Tensor | None = None, temperature: float | None = None) -> torch.Tensor:
        """:meth:`dense_logits` with its tail shaped like ``like``, for a loss at ``temperature`` (checked against
        the cache's when given: cached log-probabilities cannot be re-softened exactly)."""
        if temperature is not None:
            self.check_temperature(temperature)
        return self.dense_logits(like=like)

    def fused_kl_ce(self, student_logits: torch.Tensor, labels: torch.Tensor | None, kl, kd_weight: float,
                    ce_weight: float, workspace, densify: bool = False):
        """The chunk's closed-form forward KL + CE (:mod:`.fused`): on the top-k + tail bucket directly
        (:func:`~llmkd.losses.fused.fused_sparse_kl_ce_chunk`), or densified with a tail shaped like the student
        when the target interpolates logits (``kl.teacher_share != 1``, TAID) or ``densify`` asks for it (so that
        a reported target entropy is that of the target the gradient uses). The teacher's cross-entropy is the
        cache's own (:meth:`cross_entropy_sum`)."""
        if kl.teacher_share != 1.0 or densify:
            sums = fused_kl_ce_chunk(student_logits, self.dense_logits(like=student_logits), labels, kl, kd_weight,
                                     ce_weight, workspace)
        else:
            sums = fused_sparse_kl_ce_chunk(student_logits, self, labels, kl, kd_weight, ce_weight, workspace)
        kd_sum, ce_sum, teacher_ce_sum, entropy_sum, grad = sums
        if labels is not None:
            teacher_ce_sum = self.cross_entropy_sum(labels)
        return kd_sum, ce_sum, teacher_ce_sum, entropy_sum, grad

    def check_temperature(self, temperature: float) -> None:
        if abs(temperature - self.temperature) > 1e-12:
            raise ValueError(f"the cache holds log-probs at temperature {self.temperature}; the loss asks for "
                             f"{temperature}. Train with the cache's temperature or write a cache at {temperature}.")

    def forward_kl(self, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Top-k + tail-bucket ``KL(p || q_T)`` per token, ``q_T = softmax(z_s / T)``, from the explicit formula:
        ``(n, V) -> (n,)`` (the reference the densified path is tested against).

        ``temperature`` must be the cache's (the cached log-probabilities cannot be re-softened exactly).
        """
        self.check_temperature(temperature)
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)  # (n, V)
        log_q_top = log_q.gather(1, self.ids)  # (n, k)
        p_top = self.log_probs.float().exp()
        top = (p_top * (self.log_probs.float() - log_q_top)).sum(-1)
        outside = log_q.scatter(1, self.ids, float("-inf"))
        log_q_tail = torch.logsumexp(outside, dim=-1)  # (n,)
        tail = self.tail_log_prob.float()
        has_tail = torch.isfinite(tail)
        safe_tail = torch.where(has_tail, tail, torch.zeros_like(tail))
        safe_q_tail = torch.where(has_tail, log_q_tail, torch.zeros_like(log_q_tail))
        tail_term = torch.where(has_tail, safe_tail.exp() * (safe_tail - safe_q_tail), torch.zeros_like(tail))
        return top + tail_term

    def cross_entropy_sum(self, labels: torch.Tensor | None) -> torch.Tensor:
        """Sum over tokens of ``-log p(label)`` (a label outside the top-k gets its uniform share of the tail), from
        the ``(n, k + 1)`` cached values only: no ``(n, V)`` tensor."""
        if labels is None:
            return self.log_probs.new_zeros((), dtype=torch.float32)
        valid = labels != IGNORE_INDEX
        log_probs, tail = self.log_probs.float(), self.tail_log_prob.float()
        hit = self.ids == labels[:, None]  # (n, k)
        rest = self.vocab_size - self.k
        outside = tail - math.log(rest) if rest > 0 else torch.full_like(tail, float("-inf"))
        label_log_prob = torch.where(hit.any(-1), log_probs.masked_fill(~hit, float("-inf")).max(-1).values, outside)
        # the same normalisation as dense_log_probs (a quantized cache sums to 1 only approximately)
        total = torch.logsumexp(torch.cat([log_probs, tail[:, None]], dim=-1), dim=-1)
        return -(label_log_prob - total).masked_fill(~valid, 0.0).sum()
