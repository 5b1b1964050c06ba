"""TAID loss and schedule (ALGORITHMS.md section 1) against references written from the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from llmkd.losses import chunked_distillation_loss, dense_distillation_loss
from llmkd.losses.taid import TAIDSchedule, TAIDTokenLoss, taid_loss


def reference_taid(student, teacher, t):
    """sum_v p_t (log p_t - log q), p_t = softmax((1-t) z_s + t z_t) with z_s a constant; float64, per row."""
    target = torch.softmax((1 - t) * student.detach().double() + t * teacher.double(), dim=-1)
    log_q = torch.log_softmax(student.double(), dim=-1)
    return (target * (torch.log(target) - log_q)).sum(-1)


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


# ---------------------------------------------------------------------------------------------- the schedule
def reference_schedule(losses, max_steps, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99):
    """The update rule of ALGORITHMS.md section 1, written out; step k (1-based) sees losses[k-1]."""
    t, m, prev, history = t_start, 0.0, None, []
    for step, J in enumerate(losses, start=1):
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
    got = [schedule.update(J, step, 60) for step, J in enumerate(losses, start=1)]
    want = reference_schedule(losses, 60, alpha=0.05, beta=0.9)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_first_step_does_not_move_t_and_t_never_decreases():
    schedule = TAIDSchedule(t_start=0.2, alpha=0.05)
    assert schedule.update(2.0, 1, 100) == 0.2 and schedule.prev_loss == 2.0
    ts = [schedule.update(J, step, 100) for step, J in enumerate(scripted_losses(), start=2)]
    assert all(b >= a for a, b in zip(ts, ts[1:]))


def test_linear_floor_and_cap():
    schedule = TAIDSchedule(t_start=0.4, t_end=0.9, alpha=0.0)  # no adaptive push: t is the floor
    ts = [schedule.update(1.0, step, 10) for step in range(1, 21)]
    assert ts[0] == 0.4  # first step: no update
    assert ts[4] == pytest.approx(0.4 + 0.5 * 5 / 10)
    assert max(ts) == pytest.approx(0.9) and ts[-1] == pytest.approx(0.9)
    fast = TAIDSchedule(t_start=0.4, t_end=0.7, alpha=10.0)
    for step, J in enumerate(scripted_losses(), start=1):
        assert fast.update(J, step, 1000) <= 0.7


def test_adaptive_push_above_the_floor_while_loss_falls():
    schedule = TAIDSchedule(t_start=0.4, alpha=0.05, beta=0.5)
    for step, J in enumerate([3.0, 2.0, 1.5, 1.2, 1.0], start=1):
        t = schedule.update(J, step, 1000)
    assert t > schedule.linear_floor(5, 1000) + 1e-3


def test_disable_adaptive_follows_the_linear_floor():
    schedule = TAIDSchedule(t_start=0.2, alpha=0.5, disable_adaptive=True)
    for step, J in enumerate(scripted_losses(20), start=1):
        assert schedule.update(J, step, 20) == pytest.approx(0.2 + 0.8 * step / 20)


def test_state_round_trip_continues_identically():
    losses = scripted_losses()
    whole = TAIDSchedule(alpha=0.05, beta=0.9)
    first = TAIDSchedule(alpha=0.05, beta=0.9)
    for step, J in enumerate(losses[:25], start=1):
        whole.update(J, step, 60)
        first.update(J, step, 60)
    resumed = TAIDSchedule(alpha=0.05, beta=0.9)
    resumed.load_state_dict(first.state_dict())
    for step, J in enumerate(losses[25:], start=26):
        assert resumed.update(J, step, 60) == whole.update(J, step, 60)
    assert resumed.state_dict() == whole.state_dict()
    with pytest.raises(KeyError, match="Unknown TAID schedule state"):
        resumed.load_state_dict({"tt": 0.3})


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="t_start <= t_end"):
        TAIDSchedule(t_start=0.8, t_end=0.5)
    with pytest.raises(ValueError, match="beta"):
        TAIDSchedule(beta=1.0)
    with pytest.raises(ValueError, match="non-finite"):
        TAIDSchedule().update(float("nan"), 1, 10)
