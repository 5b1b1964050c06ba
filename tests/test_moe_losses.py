"""The MoE load-balancing loss and the preference losses against references written straight from the formulas."""

from __future__ import annotations

import math

import pytest
import torch
from moe_utils import tiny_dense

from llmkd import upcycle_to_moe
from llmkd.losses import dpo_sigmoid_loss, kto_pair_loss, load_balancing_loss, preference_loss
from llmkd.models.routing import RouterMonitor


# ------------------------------------------------------------------------------------------- load balancing
def reference_load_balancing(router_logits, top_k, mask=None):
    """E * sum_e f_e * P_e over all layers' token rows, with explicit loops (docs/ALGORITHMS.md section 3)."""
    num_experts = router_logits[0].shape[1]
    assignments = [0.0] * num_experts
    prob_sums = [torch.zeros((), dtype=torch.float64) for _ in range(num_experts)]
    rows = 0.0
    for logits in router_logits:
        for i in range(logits.shape[0]):
            weight = 1.0 if mask is None else float(mask[i])
            probs = torch.softmax(logits[i].double(), dim=0)
            ranked = sorted(range(num_experts), key=lambda e: -float(probs[e]))[:top_k]
            for e in ranked:
                assignments[e] += weight
            for e in range(num_experts):
                prob_sums[e] = prob_sums[e] + weight * probs[e]
            rows += weight
    return num_experts * sum((assignments[e] / rows) * (prob_sums[e] / rows) for e in range(num_experts))


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_value_and_gradient_match_the_formula(masked):
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(12, 4, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = (torch.rand(12, generator=generator) > 0.3).long() if masked else None
    value = load_balancing_loss(logits, top_k=2, token_mask=mask)
    expected = reference_load_balancing(logits, 2, mask)
    torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    grads = torch.autograd.grad(value, logits)
    expected_grads = torch.autograd.grad(expected, logits)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads)


def test_a_perfectly_uniform_router_gives_top_k():
    logits = [torch.zeros(8, 4)]
    # ties broken by topk: with equal probabilities P_e = 1/E, and sum_e f_e = k, so aux = E * k / E = k
    assert float(load_balancing_loss(logits, top_k=2)) == pytest.approx(2.0)


def test_hook_recorded_aux_loss_equals_the_models_own_aux_loss():
    moe = upcycle_to_moe(tiny_dense("qwen2", 64, layers=4), num_experts=4, top_k=2, every=1)
    monitor = RouterMonitor(moe)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with monitor.recording():
        outputs = moe(input_ids=ids, attention_mask=mask, output_router_logits=True)
        assert len(monitor.router_logits) == 4
        torch.testing.assert_close(monitor.aux_loss(mask), outputs.aux_loss, rtol=1e-6, atol=1e-7)
    assert monitor.router_logits == []  # released when the recording ends
    moe(input_ids=ids)  # not recording: nothing is kept
    assert monitor.router_logits == []


def test_expert_load_metrics_count_the_top_k_assignments():
    moe = upcycle_to_moe(tiny_dense("llama", 64, layers=2), num_experts=4, top_k=2)
    monitor = RouterMonitor(moe)
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    with monitor.recording():
        moe(input_ids=ids)
        aux = monitor.aux_loss(None)
        monitor.accumulate_load(None, aux, training=True)
        chosen = monitor.router_logits[0].topk(2, dim=-1).indices.reshape(-1)
    expected = torch.bincount(chosen, minlength=4).double() / chosen.numel()
    metrics = monitor.reduced_metrics(training=True)
    got = torch.tensor([metrics[f"moe_load_e{e}"] for e in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert metrics["moe_load_max"] == pytest.approx(float(expected.max()))
    assert metrics["moe_aux_loss"] == pytest.approx(float(aux))
    assert monitor.reduced_metrics(training=True) == {}  # reset after reading


# ---------------------------------------------------------------------------------------------- preference
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def reference_dpo(pc, pr, rc, rr, beta):
    return [-math.log(sigmoid(beta * ((a - b) - (c - d)))) for a, b, c, d in zip(pc, pr, rc, rr)]


def reference_kto_pair(pc, pr, rc, rr, beta):
    kl_c = max(sum(a - c for a, c in zip(pc, rc)) / len(pc), 0.0)
    kl_r = max(sum(b - d for b, d in zip(pr, rr)) / len(pr), 0.0)
    chosen = [1 - sigmoid(beta * ((a - c) - kl_r)) for a, c in zip(pc, rc)]
    rejected = [1 - sigmoid(beta * (kl_c - (b - d))) for b, d in zip(pr, rr)]
    return chosen + rejected


def logps(seed: int, n: int = 5, shift: float = 0.0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=generator, dtype=torch.float64) * 8 - 20 + shift).requires_grad_()
            for _ in range(4)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("shift", [0.0, 6.0])  # shift 6: policy above the reference, the KL clamps are active
def test_preference_losses_match_the_formulas(beta, shift):
    pc, pr, rc, rr = logps(0)
    with torch.no_grad():
        pc += shift
        pr += shift
    floats = [t.tolist() for t in (pc, pr, rc, rr)]
    torch.testing.assert_close(dpo_sigmoid_loss(pc, pr, rc, rr, beta),
                               torch.tensor(reference_dpo(*floats, beta), dtype=torch.float64))
    torch.testing.assert_close(kto_pair_loss(pc, pr, rc, rr, beta),
                               torch.tensor(reference_kto_pair(*floats, beta), dtype=torch.float64))
    assert preference_loss("kto_pair", pc, pr, rc, rr, beta).shape == (10,)


@pytest.mark.parametrize("loss", [dpo_sigmoid_loss, kto_pair_loss])
def test_preference_loss_gradients(loss):
    """Autograd gradients against central finite differences (gradcheck), KL clamps inactive and active."""
    for shift in (0.0, 6.0):
        pc, pr, rc, rr = logps(1, shift=0.0)
        with torch.no_grad():
            pc += shift
        assert torch.autograd.gradcheck(lambda a, b: loss(a, b, rc, rr, 0.3).mean(), (pc, pr))


def test_kto_pair_gradients_equal_a_loop_reference():
    pc, pr, rc, rr = logps(2)
    beta = 0.2

    def loop(pc, pr):
        kl_c = torch.clamp(sum(pc[i] - rc[i] for i in range(5)) / 5, min=0)
        kl_r = torch.clamp(sum(pr[i] - rr[i] for i in range(5)) / 5, min=0)
        terms = [1 - torch.sigmoid(beta * ((pc[i] - rc[i]) - kl_r)) for i in range(5)]
        terms += [1 - torch.sigmoid(beta * (kl_c - (pr[i] - rr[i]))) for i in range(5)]
        return sum(terms) / 10

    got = torch.autograd.grad(kto_pair_loss(pc, pr, rc, rr, beta).mean(), (pc, pr))
    want = torch.autograd.grad(loop(pc, pr), (pc, pr))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_dpo_pushes_the_margin_beyond_the_reference():
    """The DPO gradient raises pi_c and lowers pi_r: descending it grows the student's margin."""
    pc, pr, rc, rr = logps(3)
    loss = dpo_sigmoid_loss(pc, pr, rc, rr, 0.1).mean()
    grad_c, grad_r = torch.autograd.grad(loss, (pc, pr))
    assert (grad_c < 0).all() and (grad_r > 0).all()


def test_unknown_preference_loss_is_an_error():
    with pytest.raises(ValueError, match="Unknown preference loss 'ipo'"):
        preference_loss("ipo", *logps(0))
