"""Losses on a cached top-k teacher (llmkd.losses.sparse_teacher) against references written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from divergence_reference import REFERENCES, divergence_of_probs

from llmkd.losses import (
    SinkhornTerm,
    SparseTeacher,
    chunked_distillation_loss,
    dense_distillation_loss,
    get_divergence,
)
from llmkd.losses.taid import TAIDTokenLoss

N, V = 6, 23


def top_k_of(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTeacher:
    """What the cache writer stores: top-k ids/log-probs of log_softmax(z / T) and the log tail mass."""
    log_p = torch.log_softmax(teacher_logits.double() / temperature, -1)
    values, ids = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), -1)
    return SparseTeacher(ids, values.float(), tail.float(), teacher_logits.shape[-1], temperature)


def reference_bucket_kl(student_logits, teacher_logits, k, temperature):
    """sum_{i in K} p_i log(p_i / q_i) + P_tail log(P_tail / Q_tail), by explicit loops, float64."""
    rows = []
    for zs, zt in zip(student_logits.double(), teacher_logits.double()):
        p, q = torch.softmax(zt / temperature, -1), torch.softmax(zs / temperature, -1)
        kept = sorted(range(V), key=lambda v: -p[v].item())[:k]
        total = sum(p[i] * torch.log(p[i] / q[i]) for i in kept)
        p_tail = 1 - sum(p[i] for i in kept)
        q_tail = 1 - sum(q[i] for i in kept)
        rows.append(total + p_tail * torch.log(p_tail / q_tail))
    return torch.stack(rows)


def logits(seed, spread=3.0):
    return torch.randn(N, V, generator=torch.Generator().manual_seed(seed)) * spread


@pytest.mark.parametrize("k", [1, 5, 22])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_is_exact_top_k_plus_tail_bucket(k, temperature):
    student = logits(0).double().requires_grad_(True)
    teacher_logits = logits(1)
    sparse = top_k_of(teacher_logits, k, temperature)
    got = sparse.forward_kl(student, temperature)
    expected = reference_bucket_kl(student, teacher_logits, k, temperature)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), student)
    (e,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_at_k_equal_v_every_loss_equals_the_full_teacher():
    student, teacher_logits = logits(2).requires_grad_(True), logits(3)
    sparse = top_k_of(teacher_logits, V)
    assert torch.isneginf(sparse.tail_log_prob).all()
    torch.testing.assert_close(sparse.dense_log_probs(), torch.log_softmax(teacher_logits, -1), rtol=1e-5, atol=1e-6)
    losses = [get_divergence(name) for name in REFERENCES]
    losses += [TAIDTokenLoss(0.4)]
    for loss in losses:
        got, expected = loss(student, sparse.logits(like=student.detach())), loss(student, teacher_logits)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(*(torch.autograd.grad(x.sum(), student)[0] for x in (got, expected)),
                                   rtol=1e-4, atol=1e-6)
    sink = SinkhornTerm(scale=1.0)
    assert sink(student, sparse.logits(like=student.detach())).item() == pytest.approx(
        sink(student, teacher_logits).item(), rel=1e-5)
    labels = torch.randint(0, V, (N,))
    ce = torch.nn.functional.cross_entropy(teacher_logits, labels, reduction="sum")
    assert sparse.cross_entropy_sum(labels).item() == pytest.approx(ce.item(), rel=1e-5)


def reference_bucketed(name, student_logits, teacher_logits, k, temperature, beta=0.5, alpha=0.1):
    """The divergence between the collapsed (k + 1)-point distributions (p_K, P_tail) and (q_K, Q_tail), written
    from the formulas in float64 (T^2 scaling as the registry applies it)."""
    p_full = torch.softmax(teacher_logits.double() / temperature, -1)
    q_full = torch.softmax(student_logits.double() / temperature, -1)
    kept = p_full.topk(k, dim=-1).indices
    p = torch.cat([p_full.gather(1, kept), 1 - p_full.gather(1, kept).sum(-1, keepdim=True)], -1)
    q = torch.cat([q_full.gather(1, kept), 1 - q_full.gather(1, kept).sum(-1, keepdim=True)], -1)

    return divergence_of_probs(name, p, q, beta=beta, alpha=alpha) * temperature**2


@pytest.mark.parametrize("name", [name for name, reference in REFERENCES.items() if reference.f_divergence])
@pytest.mark.parametrize("k", [3, 12])
def test_every_divergence_on_a_cached_teacher_is_its_tail_bucket_value(name, k):
    """Densifying with a tail shaped like the student's makes each divergence equal to the divergence between
    the collapsed (top-k + tail bucket) distributions, in value and gradient."""
    student = logits(8).double().requires_grad_(True)
    teacher_logits = logits(9)
    sparse = top_k_of(teacher_logits, k, temperature=2.0)
    got = get_divergence(name, temperature=2.0)(student, sparse.logits(like=student.detach() / 2.0, temperature=2.0))
    expected = reference_bucketed(name, student, teacher_logits, k, 2.0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)
    (g,) = torch.autograd.grad(got.sum(), student)
    (e,) = torch.autograd.grad(expected.sum(), student)
    torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-6)


def test_the_bucket_leaves_the_tail_shape_free_and_the_uniform_tail_does_not():
    """A student that matches the top-k and the tail's total mass, with another shape inside the tail, is at zero
    distance from the cached teacher; a uniform tail would charge it for the shape."""
    teacher_logits = logits(4)
    k = 4
    sparse = top_k_of(teacher_logits, k)
    log_q = sparse.dense_log_probs().double()
    outside = torch.ones(N, V, dtype=torch.bool).scatter(1, sparse.ids, False)
    noise = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reshaped = torch.where(outside, log_q + noise, log_q)
    tail_now = torch.logsumexp(reshaped.masked_fill(~outside, float("-inf")), -1)
    student = torch.where(outside, reshaped - tail_now[:, None] + sparse.tail_log_prob.double()[:, None], reshaped)
    assert torch.allclose(torch.logsumexp(student, -1), torch.zeros(N, dtype=torch.float64), atol=1e-6)
    for name in ("fkl", "rkl", "jsd", "tvd"):
        assert get_divergence(name)(student, sparse.logits(like=student)).abs().max() < 1e-5, name
    assert sparse.forward_kl(student, 1.0).abs().max() < 1e-5
    uniform = get_divergence("fkl")(student, sparse.dense_logits())
    assert (uniform > 1e-4).all()


def test_engine_on_a_cached_teacher_equals_dense_and_online_at_k_equal_v():
    torch.manual_seed(5)
    hidden = torch.randn(N, 8, requires_grad=True)
    weight = torch.randn(V, 8, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(N, 7), torch.randn(V, 7)
    labels = torch.randint(0, V, (N,))
    kd = get_divergence("fkl", temperature=1.0)
    online = chunked_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, labels, kd, kd_weight=0.7,
                                       ce_weight=0.3, chunk_size=4)
    for k in (V, 5):
        sparse = top_k_of(teacher_hidden @ teacher_weight.T, k)
        cached = chunked_distillation_loss(hidden, weight, sparse, None, labels, kd, kd_weight=0.7, ce_weight=0.3,
                                           chunk_size=4)
        dense = dense_distillation_loss(hidden, weight, sparse, None, labels, kd, kd_weight=0.7, ce_weight=0.3)
        assert cached.loss.item() == pytest.approx(dense.loss.item(), rel=1e-5)
        grads = [torch.autograd.grad(r.loss, (hidden, weight)) for r in (cached, dense)]
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        if k == V:
            assert cached.loss.item() == pytest.approx(online.loss.item(), rel=1e-5)
            assert cached.teacher_ce_sum.item() == pytest.approx(online.teacher_ce_sum.item(), rel=1e-5)
            for a, b in zip(grads[0], torch.autograd.grad(online.loss, (hidden, weight))):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bad_cached_inputs_are_refused():
    sparse = top_k_of(logits(6), 3, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 2.0"):
        sparse.forward_kl(logits(7), 1.0)
    with pytest.raises(ValueError, match="tokens"):
        chunked_distillation_loss(torch.randn(N + 1, 4), torch.randn(V, 4), sparse, None, None,
                                  get_divergence("fkl", temperature=2.0))
    with pytest.raises(ValueError, match="exceeds vocab_size"):
        SparseTeacher(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), torch.zeros(2), 4)
    assert math.isfinite(sparse.forward_kl(logits(7), 2.0).sum().item())


def test_teacher_cross_entropy_reads_the_label_from_the_top_k_or_the_uniform_tail():
    sparse = top_k_of(logits(10), 5)
    labels = torch.cat([sparse.ids[:3, 0], torch.tensor([-100]), torch.randint(0, V, (N - 4,))])
    dense = sparse.dense_log_probs()  # uniform tail
    valid = labels != -100
    expected = -dense[valid].gather(1, labels[valid][:, None]).sum()
    assert sparse.cross_entropy_sum(labels).item() == pytest.approx(expected.item(), rel=1e-6)
