"""SinKD: the batch-wise Sinkhorn distance between student and teacher predictions (Cui et al., LREC-COLING 2024,
arXiv 2402.17110; docs/ALGORITHMS.md section 2).

The points of one optimal-transport problem are n predictions (the examples of a classifier's micro-batch, or a
block of token positions of a language model). With ``P_s = softmax(Z_s / tau)`` and ``P_t = softmax(Z_t / tau)``
(both ``(n, V)``, float32):

    W_ij  = || P_s[i] - P_t[j] ||_1                       the (n x n) cost
    Plan  = Sinkhorn(W; eps, iterations), unit marginals  (every row and every column sums to 1)
    L     = scale * sum_ij Plan_ij * W_ij

The iterations run in the log domain (potentials updated with logsumexp), so ``eps = 0.01`` neither underflows
``exp(-W / eps)`` nor divides by zero. Each iteration normalises the rows then the columns, as the official code
does in the plain domain; the two are equal wherever the plain one is finite.

Gradient of the plan: with ``detach_plan=True`` (default) the plan is a constant and ``dL/dW = scale * Plan``. This
is the envelope-theorem gradient of the entropic OT cost ``min_P <P, W> - eps * H(P)`` at convergence (the tests
check it against autograd through the iterations of that cost). With ``detach_plan=False`` autograd runs
through the unrolled iterations of ``<Plan, W>`` itself, as the official code does; that gradient also carries
``(dPlan/dW) . W``, which does not vanish at convergence (about a third of the gradient's size at eps = 0.1 on
random inputs), so the two options are different objectives, not two roads to one gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


SINKHORN_MODES = ("batch", "sequence")


def sinkhorn_plan(cost: torch.Tensor, epsilon: float = 0.1, iterations: int = 20) -> torch.Tensor:
    """The entropic transport plan of a square cost matrix with unit marginals, in the log domain.

    Args:
        cost: ``(n, n)`` float cost (gradients flow through the iterations if it requires grad).
        epsilon: entropic regularisation (> 0).
        iterations: row-then-column normalisations (>= 1).
    Returns:
        ``(n, n)`` plan; after the last iteration every column sums to 1 exactly and every row to 1 up to the
        convergence of the iterations.
    """
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(
            f"sinkhorn_plan takes a square (n, n) cost (student and teacher give the same points), got "
            f"{tuple(cost.shape)}."
        )
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}.")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}.")
    log_kernel = -cost / epsilon
    row_potential = torch.zeros(cost.shape[0], dtype=cost.dtype, device=cost.device)
    col_potential = torch.zeros(cost.shape[1], dtype=cost.dtype, device=cost.device)
    for _ in range(iterations):
        row_potential = -torch.logsumexp(log_kernel + col_potential[None, :], dim=1)
        col_potential = -torch.logsumexp(log_kernel + row_potential[:, None], dim=0)
    return torch.exp(log_kernel + row_potential[:, None] + col_potential[None, :])


def restrict_to_teacher_top_k(student_probs: torch.Tensor, teacher_probs: torch.Tensor, k: int):
    """Keep the ``k`` tokens with the largest total teacher probability over the n points, plus one tail bucket.

    ``(n, V), (n, V) -> (n, k + 1), (n, k + 1)``; the last column is the mass outside the kept tokens, so each
    row still sums to 1. The L1 cost on the result is a lower bound of the full-vocabulary L1 cost (merging
    coordinates can only cancel differences) and equals it when the tail masses agree coordinate-wise.
    """
    if k >= teacher_probs.shape[-1]:
        return student_probs, teacher_probs
    kept = teacher_probs.sum(0).topk(k).indices  # (k,)

    def with_tail(probs: torch.Tensor) -> torch.Tensor:
        head = probs[:, kept]
        tail = (probs.sum(-1, keepdim=True) - head.sum(-1, keepdim=True)).clamp_min(0.0)
        return torch.cat([head, tail], dim=-1)

    return with_tail(student_probs), with_tail(teacher_probs)


def sinkhorn_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
    scale: float = 1e-3,
    detach_plan: bool = True,
    top_k: int | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """The SinKD term ``scale * sum_ij Plan_ij * ||P_s[i] - P_t[j]||_1`` for one set of n points.

    Args:
        student_logits: ``(n, V)`` logits of the student (any dtype; math in float32, float64 for float64 inputs;
            gradients flow here).
        teacher_logits: ``(n, V)`` logits of the teacher (no gradient).
        temperature: tau, both sides are ``softmax(z / tau)`` (paper: 2).
        epsilon / iterations: Sinkhorn regularisation and iteration count (paper: 0.1, 20).
        scale: the paper's multiplier of the transport cost (1e-3).
        detach_plan: treat the plan as a constant (default) or differentiate through the iterations.
        top_k: if set, the cost only sees the teacher's ``top_k`` tokens plus a tail bucket
            (:func:`restrict_to_teacher_top_k`): ``n x n x (k + 1)`` work instead of ``n x n x V``.
        reduction: ``"sum"``: the paper's value, a sum over the plan; ``"mean"``: divided by n (the transport cost
            per point).
    Returns:
        A float32 (float64 for float64 inputs) scalar; 0 for n = 0.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student and teacher logits must both be (n, V) of one shape, got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    n_points = student_logits.shape[0]
    if n_points == 0:
        return student_logits.float().sum() * 0.0
    math_dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    student_probs = torch.softmax(student_logits.to(math_dtype) / temperature, dim=-1)
    teacher_probs = torch.softmax(teacher_logits.detach().to(math_dtype) / temperature, dim=-1)
    if top_k:
        student_probs, teacher_probs = restrict_to_teacher_top_k(student_probs, teacher_probs, int(top_k))
    cost = torch.cdist(student_probs[None], teacher_probs[None], p=1)[0]  # (n, n)
    if detach_plan:
        with torch.no_grad():
            plan = sinkhorn_plan(cost.detach(), epsilon, iterations)
    else:
        plan = sinkhorn_plan(cost, epsilon, iterations)
    loss = scale * (plan * cost).sum()
    return loss / n_points if reduction == "mean" else loss


@dataclass(frozen=True)
class SinkhornTerm:
    """The Sinkhorn term as a *block loss* of the chunked engine: ``(student (n, V), teacher (n, V)) -> scalar``.

    Returns ``n * sinkhorn_loss(...)`` (the paper's value of the block times its number of points); the engine
    divides the sum over blocks by the step's point count N, so each block's paper value enters the objective
    weighted by its share ``n / N`` of the points. With one block holding the whole batch that is exactly the
    paper's term.
    """

    temperature: float = 2.0
    epsilon: float = 0.1
    iterations: int = 20
    scale: float = 1e-3
    detach_plan: bool = True
    top_k: int | None = None

    def __call__(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        value = sinkhorn_loss(
            student_logits, teacher_logits, temperature=self.temperature, epsilon=self.epsilon,
            iterations=self.iterations, scale=self.scale, detach_plan=self.detach_plan, top_k=self.top_k,
        )
        return value * student_logits.shape[0]


def sinkhorn_blocks(valid: torch.Tensor, mode: str = "batch", block_size: int = 512) -> list[tuple[int, int]]:
    """The optimal-transport problems of a language-model micro-batch, as ranges of its flattened valid tokens.

    Args:
        valid: ``(B, S)`` bool, the valid (shifted-label) positions; flattened row-major they are the engine's N
            tokens, so one sequence's tokens are contiguous.
        mode: ``"batch"``: consecutive blocks of at most ``block_size`` tokens across sequences; ``"sequence"``:
            one problem per sequence (a sequence longer than ``block_size`` is split into consecutive blocks, so
            the n x n cost stays bounded).
        block_size: the largest n of one problem.
    Returns:
        ``[(start, end), ...]`` covering ``range(N)`` in order, no empty range.
    """
    if mode not in SINKHORN_MODES:
        raise ValueError(f"sinkhorn mode must be one of {SINKHORN_MODES}, got {mode!r}.")
    if block_size < 1:
        raise ValueError(f"sinkhorn block size must be >= 1, got {block_size}.")
    if mode == "batch":
        total = int(valid.sum())
        segments = [total] if total else []
    else:
        segments = [int(count) for count in valid.sum(dim=1).tolist() if count]
    bounds, start = [], 0
    for length in segments:
        for offset in range(0, length, block_size):
            bounds.append((start + offset, start + min(offset + block_size, length)))
        start += length
    return bounds
