"""A top-k teacher (from the offline cache, :mod:`llmkd.cache`) as a loss input.

Per token the cache keeps the teacher's top-k token ids, their log-probabilities ``log p`` (at the cache's
temperature ``T_c``) and the log of the remaining mass ``log P_tail``. The losses use it two ways:

* exactly, for forward KL: ``KL(p || q)`` on the top-k support plus one tail bucket,

      sum_{i in K} p_i (log p_i - log q_i) + P_tail (log P_tail - log Q_tail),   Q_tail = sum_{j not in K} q_j,

  which equals the full forward KL when k = V (P_tail = 0) and otherwise leaves the student's distribution inside
  the tail free (:meth:`SparseTeacher.forward_kl`);
* approximately, for every other loss (reverse KL, JSD, skew KLs, TVD, TAID's interpolation, the Sinkhorn cost):
  the tail mass is spread uniformly over the ``V - k`` tokens outside the top-k (:meth:`SparseTeacher.dense_logits`),
  which keeps the top-k exact and the total mass 1 but replaces the tail's shape, unknown to the cache, by the
  flattest one. At k = V both are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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

    def dense_log_probs(self) -> torch.Tensor:
        """``(n, V)`` float32 log-probabilities: the top-k exact, the tail mass spread uniformly over the rest."""
        n, k = self.ids.shape
        rest = self.vocab_size - k
        if rest > 0:
            fill = (self.tail_log_prob.float() - math.log(rest))[:, None].expand(n, self.vocab_size)
            dense = fill.clone()
        else:
            dense = torch.full((n, self.vocab_size), float("-inf"), device=self.ids.device)
        return dense.scatter(1, self.ids, self.log_probs.float())

    def dense_logits(self) -> torch.Tensor:
        """``(n, V)`` logits whose ``softmax(z / T_c)`` is :meth:`dense_log_probs` (``T_c * log p``), for any loss
        that softens the teacher with its own temperature."""
        log_probs = self.dense_log_probs()
        return log_probs * self.temperature if self.temperature != 1.0 else log_probs

    def forward_kl(self, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """Exact top-k + tail-bucket ``KL(p || q_T)`` per token, ``q_T = softmax(z_s / T)``: ``(n, V) -> (n,)``.

        ``temperature`` must be the cache's (the cached log-probabilities cannot be re-softened exactly).
        """
        if abs(temperature - self.temperature) > 1e-12:
            raise ValueError(f"the cache holds log-probs at temperature {self.temperature}; the loss asks for "
                             f"{temperature}. Train with the cache's temperature or write a cache at {temperature}.")
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
        """Sum over tokens of ``-log p(label)`` (a label outside the top-k gets its uniform share of the tail)."""
        if labels is None:
            return self.log_probs.new_zeros((), dtype=torch.float32)
        valid = labels != -100
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        return -self.dense_log_probs().gather(1, safe[:, None])[:, 0].masked_fill(~valid, 0.0).sum()


def as_dense_logits(teacher) -> torch.Tensor:
    """Teacher logits ``(n, V)`` from a tensor (returned as is) or a :class:`SparseTeacher` (densified)."""
    return teacher.dense_logits() if isinstance(teacher, SparseTeacher) else teacher
