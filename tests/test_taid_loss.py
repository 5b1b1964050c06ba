"""TAID loss, its target's entropy and its schedule against references written from the formulas.

The schedule's step index is 0-based (the optimizer steps completed before the step whose loss is fed, as the
official code's global_step); tests/test_taid_official.py holds it to a transcription of the official update.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmkd.losses import (
    LogitTransform,
    SparseTeacher,
    chunked_distillation_loss,
    dense_distillation_loss,
    get_divergence,
)
from llmkd.losses.taid import TAIDSchedule, TAIDTokenLoss, taid_loss


def reference_taid(student, teacher, t):
    """sum_v p_t (log p_t - log q), p_t = softmax((1-t) z_s + t z_t) with z_s a constant; float64, per row."""
    target = torch.softmax((1 - t) * student.detach().double() + t * teacher.double(), dim=-1)
    log_q = torch.log_softmax(student.double(), dim=-1)
    return (target * (torch.log(target) - log_q)).sum(-1)


def reference_entropy_and_cross_entropy(student, teacher, t):
    """(H(p_t), -sum_v p_t log q) per row in float64; entries with p_t = 0 contribute 0. At t = 0 and t = 1 the
    target is the student's or the teacher's distribution (the weighted sum would be 0 * -inf at masked entries)."""
    mixed = {0.0: student.detach().double(), 1.0: teacher.double()}.get(
        t, (1 - t) * student.detach().double() + t * teacher.double())
    target = torch.softmax(mixed, dim=-1)
    log_q = torch.log_softmax(student.detach().double(), dim=-1)
    zero = torch.zeros((), dtype=torch.float64)
    entropy = -torch.where(target > 0, target * torch.log(target), zero).sum(-1)
    cross_entropy = -torch.where(target > 0, target * log_q, zero).sum(-1)
    return entropy, cross_entropy


@pytest.mark.parametrize("t", [0.0, 0.2, 0.4, 0.77, 1.0])
def test_value_and_gradient_match_the_formula(t):
    torch.manual_seed(0)
    student = torch.randn(3, 5, 11, requires_grad=True)
    teacher = torch.randn(3, 5, 11)
    mask = torch.rand(3, 5) > 0.3
    loss = taid_loss(student, teacher, mask, t=t)
    expected = reference_taid(student, teacher, t)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_no_gradient_flows_through_the_target():
    """With p_t detached the gradient is exactly (q - p_t) / N per valid token; through p_t it would differ."""
    torch.manual_seed(1)
    student = torch.randn(6, 9, requires_grad=True)
    teacher = torch.randn(6, 9)
    t = 0.5
    (grad,) = torch.autograd.grad(taid_loss(student, teacher, t=t), student)
    q = torch.softmax(student.detach(), -1)
    p_t = torch.softmax((1 - t) * student.detach() + t * teacher, -1)
    torch.testing.assert_close(grad, (q - p_t) / 6, rtol=1e-5, atol=1e-7)
    # the same loss without stop-gradient has a different gradient: the test above can fail
    target = torch.softmax((1 - t) * student + t * teacher, -1)
    live = (target * (torch.log(target) - torch.log_softmax(student, -1))).sum(-1).mean()
    (live_grad,) = torch.autograd.grad(live, student)
    assert not torch.allclose(live_grad, grad, atol=1e-4)


def test_t_zero_is_zero_loss_and_t_one_is_forward_kl():
    from llmkd.losses import forward_kl

    torch.manual_seed(2)
    student, teacher = torch.randn(4, 13), torch.randn(4, 13)
    assert taid_loss(student, teacher, t=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert taid_loss(student, teacher, t=1.0).item() == pytest.approx(forward_kl(student, teacher).item(), rel=1e-6)


def test_masked_vocabulary_and_low_precision_are_finite_and_fp32():
    torch.manual_seed(3)
    student = torch.randn(4, 10, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(4, 10, dtype=torch.bfloat16)
    with torch.no_grad():
        student[:, :2] = float("-inf")
        teacher[:, :2] = float("-inf")
    loss = taid_loss(student, teacher, t=0.6)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad.float()).all()


def test_bad_t_is_refused():
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        taid_loss(torch.zeros(2, 3), torch.zeros(2, 3), t=1.5)


@pytest.mark.parametrize("engine", [chunked_distillation_loss, dense_distillation_loss])
def test_taid_runs_in_the_chunked_engine(engine):
    torch.manual_seed(4)
    hidden = torch.randn(23, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(17, 8, dtype=torch.float64, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(23, 6, dtype=torch.float64), torch.randn(17, 6, dtype=torch.float64)
    out = engine(hidden, weight, teacher_hidden, teacher_weight, None, TAIDTokenLoss(0.3), chunk_size=5)
    expected = reference_taid(hidden @ weight.T, teacher_hidden @ teacher_weight.T, 0.3).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grads = torch.autograd.grad(out.loss, [hidden, weight])
    expected_grads = torch.autograd.grad(expected, [hidden, weight])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------ the target's entropy
@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
def test_target_entropy_and_cross_entropy_match_the_formula(t):
    """with_target_entropy gives (KL, H(p_t)) from one softmax; KL + H is the official loss -sum p_t log q."""
    torch.manual_seed(5)
    student = (torch.randn(7, 19) * 2).requires_grad_(True)
    teacher = torch.randn(7, 19) * 3
    with torch.no_grad():  # a masked vocabulary entry: p_t = 0 there, and 0 log 0 counts as 0
        student[:, -1] = float("-inf")
        teacher[:, -1] = float("-inf")
    kl, entropy = TAIDTokenLoss(t).with_target_entropy(student, teacher)
    want_entropy, want_ce = reference_entropy_and_cross_entropy(student, teacher, t)
    # float32 softmax and sums over 19 entries of O(1) terms: relative error a few 1e-7; 1e-5 is a wide margin
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((kl + entropy).double(), want_ce, rtol=1e-5, atol=1e-6)
    assert torch.equal(kl, TAIDTokenLoss(t)(student, teacher))  # the same KL as the plain call
    assert not entropy.requires_grad and kl.requires_grad


def _engine_problem(seed=6, n=21, hidden=8, vocab=23):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.7,
            torch.randn(n, hidden, generator=g), torch.randn(vocab, hidden, generator=g) * 0.9)


@pytest.mark.parametrize("path", ["fused", "autograd", "dense"])
@pytest.mark.parametrize("t", [0.3, 1.0])
def test_engine_reports_the_target_entropy_on_every_path(path, t):
    """chunked_distillation_loss's target_entropy_sum on the closed-form path (identity head), the autograd path
    (a logit post-processing forces it) and the dense engine: all equal sum_n H(p_t) of the float64 formula."""
    s_hidden, s_weight, t_hidden, t_weight = _engine_problem()
    transform = LogitTransform(softcap=4.0) if path == "autograd" else LogitTransform()
    engine = dense_distillation_loss if path == "dense" else chunked_distillation_loss
    out = engine(s_hidden, s_weight, t_hidden, t_weight, None, TAIDTokenLoss(t), chunk_size=5,
                 student_transform=transform)
    student_logits = transform(s_hidden.double() @ s_weight.double().T)
    entropy, cross_entropy = reference_entropy_and_cross_entropy(student_logits, t_hidden.double() @ t_weight.double().T, t)
    # float32 logits from an 8-dim product, 21 rows of O(1) entropies: 1e-5 relative is far above round-off
    assert out.target_entropy_sum.item() == pytest.approx(entropy.sum().item(), rel=1e-5)
    assert (out.kd_sum + out.target_entropy_sum).item() == pytest.approx(cross_entropy.sum().item(), rel=1e-5)


@pytest.mark.parametrize("t", [0.5, 1.0])
def test_a_cached_teacher_reports_the_entropy_of_the_densified_target(t):
    """With a cached top-k teacher TAID interpolates with the densified teacher (tail shaped like the student);
    the closed-form path densifies it even at t = 1, so its entropy is that of the target the gradient uses and
    equals the autograd path's."""
    s_hidden, s_weight, t_hidden, t_weight = _engine_problem(seed=7)
    teacher_log_probs = torch.log_softmax(t_hidden @ t_weight.T, dim=-1)
    top, ids = teacher_log_probs.topk(6, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    cached = SparseTeacher(ids, top, tail, s_weight.shape[0], 1.0)
    fused = chunked_distillation_loss(s_hidden, s_weight, cached, None, None, TAIDTokenLoss(t), chunk_size=5)
    plain = chunked_distillation_loss(s_hidden, s_weight, cached, None, None, TAIDTokenLoss(t), chunk_size=5,
                                      student_transform=LogitTransform(scale=1.0 + 1e-12))  # forces autograd
    student_logits = s_hidden @ s_weight.T
    dense_teacher = cached.dense_logits(like=student_logits)
    entropy, _ = reference_entropy_and_cross_entropy(student_logits, dense_teacher, t)
    assert fused.target_entropy_sum.item() == pytest.approx(entropy.sum().item(), rel=1e-5)
    assert plain.target_entropy_sum.item() == pytest.approx(entropy.sum().item(), rel=1e-5)
    assert fused.kd_sum.item() == pytest.approx(plain.kd_sum.item(), rel=1e-5)


def test_token_losses_without_a_target_entropy_report_none():
    s_hidden, s_weight, t_hidden, t_weight = _engine_problem()
    out = chunked_distillation_loss(s_hidden, s_weight, t_hidden, t_weight, None, get_divergence("rkl"))
    assert out.target_entropy_sum is None


# ---------------------------------------------------------------------------------------------- the schedule
def reference_schedule(losses, max_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """The update rule of TAIDSchedule's docstring, written out; the call for step k (0-based) sees losses[k]."""
    t, m, prev, history = t_start, 0.0, None, []
    for step, J in enumerate(losses):
        if prev is None:
            prev = J
        else:
            delta = (prev - J) / (prev + 1e-15)
            m = beta * m + (1 - beta) * delta
            dt = alpha * (1 / (1 + math.exp(-m))) * (1 - t)
            t_lin = t_start + (t_end - t_start) * step / max_steps
            t = min(t_end, max(t_lin, t + dt))
            prev = J
        history.append(t)
    return history


def scripted_losses(n=60):
    # falls fast, plateaus, rises a little, falls again
    return [3.0 * math.exp(-k / 10) + 0.5 + (0.2 if 30 <= k < 40 else 0.0) for k in range(n)]


def test_schedule_matches_the_reference_rule():
    losses = scripted_losses()
    schedule = TAIDSchedule(t_start=0.4, alpha=0.05, beta=0.9)
    got = [schedule.update(J, step, 60) for step, J in enumerate(losses)]
    want = reference_schedule(losses, 60, alpha=0.05, beta=0.9)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_first_step_does_not_move_t_and_t_never_decreases():
    schedule = TAIDSchedule(t_start=0.2, alpha=0.05)
    assert schedule.update(2.0, 0, 100) == 0.2 and schedule.prev_loss == 2.0 and schedule.momentum == 0.0
    ts = [schedule.update(J, step, 100) for step, J in enumerate(scripted_losses(), start=1)]
    assert all(b >= a for a, b in zip(ts, ts[1:]))


def test_linear_floor_and_cap():
    schedule = TAIDSchedule(t_start=0.4, t_end=0.9, alpha=0.0)  # no adaptive push: t is the floor
    ts = [schedule.update(1.0, step, 10) for step in range(20)]
    assert ts[0] == 0.4  # first step: no update
    assert ts[5] == pytest.approx(0.4 + 0.5 * 5 / 10)  # the floor of step index 5 (the sixth step)
    assert max(ts) == pytest.approx(0.9) and ts[-1] == pytest.approx(0.9)
    fast = TAIDSchedule(t_start=0.4, t_end=0.7, alpha=10.0)
    for step, J in enumerate(scripted_losses()):
        assert fast.update(J, step, 1000) <= 0.7


def test_adaptive_push_above_the_floor_while_loss_falls():
    schedule = TAIDSchedule(t_start=0.4, alpha=0.05, beta=0.5)
    for step, J in enumerate([3.0, 2.0, 1.5, 1.2, 1.0]):
        t = schedule.update(J, step, 1000)
    assert t > schedule.linear_floor(4, 1000) + 1e-3


def test_disable_adaptive_follows_the_linear_floor():
    """t is the floor of the step index (the first call changes nothing, and the floor of step 0 is t_start); the
    momentum is still updated, as in the official code."""
    schedule = TAIDSchedule(t_start=0.2, alpha=0.5, disable_adaptive=True)
    for step, J in enumerate(scripted_losses(20)):
        assert schedule.update(J, step, 20) == pytest.approx(0.2 + 0.8 * step / 20)
    assert schedule.momentum > 0.0  # the scripted losses fall over the first 20 steps


def test_state_round_trip_continues_identically():
    losses = scripted_losses()
    whole = TAIDSchedule(alpha=0.05, beta=0.9)
    first = TAIDSchedule(alpha=0.05, beta=0.9)
    for step, J in enumerate(losses[:25]):
        whole.update(J, step, 60)
        first.update(J, step, 60)
    resumed = TAIDSchedule(alpha=0.05, beta=0.9)
    resumed.load_state_dict(first.state_dict())
    for step, J in enumerate(losses[25:], start=25):
        assert resumed.update(J, step, 60) == whole.update(J, step, 60)
    assert resumed.state_dict() == whole.state_dict()
    with pytest.raises(KeyError, match="Unknown TAID schedule state"):
        resumed.load_state_dict({"tt": 0.3})


def test_a_schedule_driven_by_the_other_loss_is_not_resumed():
    """prev and m of a KL-driven schedule measure the KL: continuing them with cross-entropies would be wrong."""
    saved = TAIDSchedule(schedule_loss="kl")
    saved.update(1.0, 0, 10)
    with pytest.raises(ValueError, match="schedule_loss='kl'.*Resume with schedule_loss='kl'"):
        TAIDSchedule().load_state_dict(saved.state_dict())
    resumed = TAIDSchedule(schedule_loss="kl")
    resumed.load_state_dict(saved.state_dict())
    assert resumed.prev_loss == 1.0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="t_start <= t_end"):
        TAIDSchedule(t_start=0.8, t_end=0.5)
    with pytest.raises(ValueError, match="beta"):
        TAIDSchedule(beta=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        TAIDSchedule().update(float("nan"), 1, 10)
    with pytest.raises(ValueError, match="schedule_loss must be one of .*got 'ce'"):
        TAIDSchedule(schedule_loss="ce")
