"""SinKD's Sinkhorn term (docs/ALGORITHMS.md section 2) against references written from the formulas.

The references run in float64 and in the plain domain: ``K = exp(-W / eps)`` normalised by rows then columns, as
the paper (and the official code) writes it, with the cost built by explicit sums over the vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from llmkd.losses import (
    SinkhornTerm,
    chunked_distillation_loss,
    dense_distillation_loss,
    get_divergence,
    sinkhorn_blocks,
    sinkhorn_loss,
    sinkhorn_plan,
)
from llmkd.losses.sinkhorn import restrict_to_teacher_top_k
from sinkhorn_reference import reference_plan, reference_sinkhorn


pytestmark = pytest.mark.usefixtures("single_thread")


def logits(n, v, seed, spread=3.0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=generator) * spread).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
def softened_cost(n, v, spread, dtype=torch.float32):
    zs, zt = logits(n, v, 0, spread, dtype), logits(n, v, 1, spread, dtype)
    return torch.cdist(torch.softmax(zs / 2, -1)[None], torch.softmax(zt / 2, -1)[None], p=1)[0]


@pytest.mark.parametrize("n,v,spread,iterations", [(32, 50, 1.0, 20), (64, 1000, 3.0, 20), (16, 40, 3.0, 200),
                                                   (32, 2, 3.0, 300)])
def test_plan_marginals_are_one(n, v, spread, iterations):
    """Every row and column of the plan sums to 1 within 1e-5. The paper's 20 iterations get there on typical
    batches; confident predictions over few classes need more (sinkhorn_iterations), e.g. 16 x 40 classes at
    spread 3 is still 1.8e-3 off after 20 iterations."""
    plan = sinkhorn_plan(softened_cost(n, v, spread), epsilon=0.1, iterations=iterations)
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(plan.sum(dim=0), torch.ones(n), rtol=0, atol=1e-5)
    assert (plan >= 0).all()


def test_log_domain_equals_the_plain_domain_reference():
    cost = torch.rand(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    for eps, iterations in ((0.1, 20), (0.5, 3), (0.05, 50)):
        torch.testing.assert_close(sinkhorn_plan(cost, eps, iterations), reference_plan(cost, eps, iterations),
                                   rtol=1e-10, atol=1e-12)


def test_the_last_normalisation_makes_columns_exact_even_far_from_convergence():
    cost = torch.rand(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    plan = sinkhorn_plan(cost, epsilon=0.01, iterations=3)
    torch.testing.assert_close(plan.sum(dim=0), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-12)


def test_plan_refuses_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        sinkhorn_plan(torch.rand(3, 4))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_plan(torch.rand(3, 3), epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn_plan(torch.rand(3, 3), iterations=0)


# ----------------------------------------------------------------------------------------------------------------
# The loss: values and gradients
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("detach_plan", [True, False])
@pytest.mark.parametrize("tau,eps,scale", [(2.0, 0.1, 1e-3), (1.0, 0.3, 0.5)])
def test_value_and_gradient_match_the_reference(detach_plan, tau, eps, scale):
    zs = logits(7, 13, 2).requires_grad_(True)
    zt = logits(7, 13, 3)
    value = sinkhorn_loss(zs.float(), zt.float(), temperature=tau, epsilon=eps, scale=scale, detach_plan=detach_plan)
    expected = reference_sinkhorn(zs, zt, tau=tau, eps=eps, scale=scale, detach_plan=detach_plan)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    zs64 = zs.detach().clone().requires_grad_(True)
    value64 = sinkhorn_loss(zs64, zt, temperature=tau, epsilon=eps, scale=scale, detach_plan=detach_plan)
    (grad,) = torch.autograd.grad(value64, zs64)
    (expected_grad,) = torch.autograd.grad(expected, zs)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-6, atol=1e-10)


def test_unrolled_gradient_is_the_exact_gradient_of_the_value():
    zs = logits(5, 6, 4).requires_grad_(True)
    zt = logits(5, 6, 5)
    assert torch.autograd.gradcheck(
        lambda z: sinkhorn_loss(z, zt, epsilon=0.2, iterations=10, scale=1.0, detach_plan=False), (zs,),
        eps=1e-6, atol=1e-6,
    )


def entropic_ot_cost(cost, eps, iterations):
    """<P, W> - eps * H(P) with H(P) = -sum P (log P - 1), P the plan of W through the unrolled iterations."""
    plan = sinkhorn_plan(cost, eps, iterations)
    return (plan * cost).sum() + eps * (plan * (torch.log(plan) - 1)).sum()


def test_detached_gradient_is_the_envelope_gradient_of_the_entropic_ot_cost():
    """By the envelope theorem, d/dW [min_P <P,W> - eps H(P)] = P*; autograd through the iterations of that cost
    approaches the detached plan as the iterations converge."""
    cost = softened_cost(8, 6, 2.0, torch.float64).requires_grad_(True)
    eps = 0.1
    detached = sinkhorn_plan(cost.detach(), eps, 3000)
    errors = []
    for iterations in (1, 3, 10, 100, 1000):
        (unrolled,) = torch.autograd.grad(entropic_ot_cost(cost, eps, iterations), cost)
        errors.append((unrolled - detached).abs().max().item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 1e-10 and errors[0] > 1e-2, errors


def test_detached_and_unrolled_are_different_objectives():
    """The official code differentiates <Plan(W), W> through the iterations; that gradient carries
    (dPlan/dW) . W, which does not vanish at convergence (documented in llmkd.losses.sinkhorn)."""
    zs = logits(8, 5, 6).requires_grad_(True)
    zt = logits(8, 5, 7)
    grads = {}
    for iterations in (300, 600):
        for detach in (True, False):
            value = sinkhorn_loss(zs, zt, iterations=iterations, detach_plan=detach, scale=1.0)
            (grads[iterations, detach],) = torch.autograd.grad(value, zs)
    # each gradient has converged in the iterations ...
    torch.testing.assert_close(grads[300, True], grads[600, True], rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(grads[300, False], grads[600, False], rtol=1e-7, atol=1e-12)
    # ... to different limits
    gap = (grads[600, True] - grads[600, False]).abs().max() / grads[600, True].abs().max()
    assert gap > 0.05


# ----------------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------------
def test_sinkhorn_term_is_permutation_invariant():
    """Shuffling the student's points (or the teacher's) leaves the transport cost unchanged: the term alone
    cannot tell which teacher prediction belongs to which student prediction (hence KD/CE beside it)."""
    zs, zt = logits(10, 8, 8), logits(10, 8, 9)
    base = sinkhorn_loss(zs, zt, scale=1.0)
    permutation = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(permutation, torch.arange(10))
    torch.testing.assert_close(sinkhorn_loss(zs[permutation], zt, scale=1.0), base, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(sinkhorn_loss(zs, zt[permutation], scale=1.0), base, rtol=1e-12, atol=1e-14)
    # whereas a per-example divergence does change
    kl = get_divergence("fkl")
    assert not torch.allclose(kl(zs[permutation], zt).sum(), kl(zs, zt).sum())


def test_identical_points_have_zero_cost_under_a_converged_plan():
    z = logits(6, 9, 10)
    assert sinkhorn_loss(z, z, epsilon=0.01, iterations=500, scale=1.0).item() < 1e-6


@pytest.mark.parametrize("detach_plan", [True, False])
def test_no_nan_or_inf_at_eps_0_01_with_peaked_logits(detach_plan):
    zs = (logits(32, 50, 11, spread=30.0, dtype=torch.float32)).requires_grad_(True)
    zt = logits(32, 50, 12, spread=30.0, dtype=torch.float32)
    value = sinkhorn_loss(zs, zt, epsilon=0.01, detach_plan=detach_plan)
    (grad,) = torch.autograd.grad(value, zs)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    # the plain-domain kernel underflows here, which is why the log domain is used
    cost = torch.cdist(torch.softmax(zs.detach() / 2, -1)[None], torch.softmax(zt / 2, -1)[None], p=1)[0]
    assert torch.exp(-cost / 1e-3).sum(dim=1).eq(0).any()
    assert torch.isfinite(sinkhorn_plan(cost, 1e-3, 20)).all()


def test_bf16_inputs_give_a_finite_float32_loss_equal_to_the_rounded_fp32_inputs():
    zs = logits(12, 30, 13, dtype=torch.float32).bfloat16().requires_grad_(True)
    zt = logits(12, 30, 14, dtype=torch.float32).bfloat16()
    value = sinkhorn_loss(zs, zt, epsilon=0.01)
    (grad,) = torch.autograd.grad(value, zs)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    expected = sinkhorn_loss(zs.detach().float(), zt.float(), epsilon=0.01)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_edge_sizes_and_mean_reduction():
    zs, zt = logits(1, 5, 15), logits(1, 5, 16)
    l1 = (torch.softmax(zs / 2, -1) - torch.softmax(zt / 2, -1)).abs().sum()
    assert sinkhorn_loss(zs, zt, scale=1.0).item() == pytest.approx(l1.item(), rel=1e-10)  # plan = [[1]]
    empty = sinkhorn_loss(torch.zeros(0, 5, requires_grad=True), torch.zeros(0, 5))
    assert empty.item() == 0.0 and empty.requires_grad
    zs, zt = logits(6, 5, 17), logits(6, 5, 18)
    assert sinkhorn_loss(zs, zt, reduction="mean").item() == pytest.approx(sinkhorn_loss(zs, zt).item() / 6)
    with pytest.raises(ValueError, match="reduction"):
        sinkhorn_loss(zs, zt, reduction="max")
    with pytest.raises(ValueError, match="one shape"):
        sinkhorn_loss(zs, zt[:5])


def test_top_k_restriction_keeps_mass_and_lower_bounds_the_full_cost():
    zs, zt = logits(6, 40, 19), logits(6, 40, 20)
    ps, pt = torch.softmax(zs, -1), torch.softmax(zt, -1)
    ks, kt = restrict_to_teacher_top_k(ps, pt, 5)
    assert ks.shape == (6, 6) and kt.shape == (6, 6)
    torch.testing.assert_close(ks.sum(-1), torch.ones(6, dtype=torch.float64))
    kept = pt.sum(0).topk(5).indices
    torch.testing.assert_close(kt[:, :5], pt[:, kept])
    full = sinkhorn_loss(zs, zt, scale=1.0, epsilon=0.05, iterations=200)
    for k in (1, 5, 20):
        restricted = sinkhorn_loss(zs, zt, scale=1.0, epsilon=0.05, iterations=200, top_k=k)
        assert restricted.item() <= full.item() + 1e-9
    assert sinkhorn_loss(zs, zt, top_k=40).item() == pytest.approx(sinkhorn_loss(zs, zt).item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Blocks of a language-model micro-batch, and the term inside the chunked engine
# ----------------------------------------------------------------------------------------------------------------
def test_blocks_in_batch_and_sequence_modes():
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert sinkhorn_blocks(valid, "batch", 512) == [(0, 8)]
    assert sinkhorn_blocks(valid, "batch", 3) == [(0, 3), (3, 6), (6, 8)]
    assert sinkhorn_blocks(valid, "sequence", 512) == [(0, 3), (3, 8)]
    assert sinkhorn_blocks(valid, "sequence", 2) == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8)]
    assert sinkhorn_blocks(torch.zeros(2, 3, dtype=torch.bool), "batch", 4) == []
    with pytest.raises(ValueError, match="mode"):
        sinkhorn_blocks(valid, "token", 4)


@pytest.mark.parametrize("mode", ["batch", "sequence"])
@pytest.mark.parametrize("detach_plan", [True, False])
def test_chunked_engine_with_the_sinkhorn_term_equals_dense_and_the_formula(mode, detach_plan):
    torch.manual_seed(21)
    n, h_s, h_t, v = 11, 6, 5, 17
    valid = torch.tensor([[1] * 4 + [0] * 3, [1] * 7], dtype=torch.bool)
    bounds = sinkhorn_blocks(valid, mode, 5)
    student_hidden = torch.randn(n, h_s, dtype=torch.float64, requires_grad=True)
    student_weight = torch.randn(v, h_s, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(n, h_t, dtype=torch.float64), torch.randn(v, h_t, dtype=torch.float64)
    labels = torch.randint(0, v, (n,))
    term = SinkhornTerm(epsilon=0.2, scale=0.1, detach_plan=detach_plan)
    kd = get_divergence("fkl", temperature=2.0, scale_by_t2=False)
    kwargs = dict(kd_weight=0.9, ce_weight=0.1, block_loss=term, block_weight=0.8, chunk_bounds=bounds)
    chunked = chunked_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kd,
                                        **kwargs)
    dense = dense_distillation_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, kd,
                                    **kwargs)
    # the formula, written out: per block, the block's paper value times its share of the points
    zs, zt = student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T
    ps, pt = torch.softmax(zs / 2, -1), torch.softmax(zt / 2, -1)
    kd_ref = (pt * (pt.log() - ps.log())).sum()
    ce_ref = torch.nn.functional.cross_entropy(zs, labels, reduction="sum")
    sink_ref = sum(
        (end - start) * reference_sinkhorn(zs[start:end], zt[start:end], eps=0.2, scale=0.1, detach_plan=detach_plan)
        for start, end in bounds
    )
    expected = (0.9 * kd_ref + 0.1 * ce_ref + 0.8 * sink_ref) / n
    # (the engine's math is float32, whatever the input dtype)
    for result in (chunked, dense):
        assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)
        assert result.block_sum.item() == pytest.approx(sink_ref.item(), rel=1e-5)
    grads = [torch.autograd.grad(r.loss, (student_hidden, student_weight)) for r in (chunked, dense)]
    expected_grads = torch.autograd.grad(expected, (student_hidden, student_weight))
    for got in grads:
        for g, e in zip(got, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_engine_refuses_bounds_that_do_not_tile_the_tokens():
    hidden, weight = torch.randn(6, 4), torch.randn(9, 4)
    kd = get_divergence("fkl")
    for bad in ([(0, 3), (4, 6)], [(0, 3)], [(0, 0), (0, 6)]):
        with pytest.raises(ValueError, match="chunk_bounds"):
            chunked_distillation_loss(hidden, weight, hidden, weight, None, kd, chunk_bounds=bad)
