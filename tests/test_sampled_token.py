"""The sampled-token objective of on-policy distillation (docs/ALGORITHMS.md section 5) against its formula.

References are written from the formula in float64; llmkd computes in float32. Tolerances: a float32 log-softmax
over V entries carries a relative error of a few ulps (2^-23 ~ 1.2e-7) times log V; rtol 1e-5 bounds it with a
margin of ten, and the absolute part is scaled to the largest reference entry (entries that cancel to near zero).
"""

from __future__ import annotations

import pytest
import torch

from llmkd.losses import (
    DistillationObjective,
    OutputHead,
    SampledTokenLoss,
    chunked_loss,
    dense_loss,
)
from llmkd.losses.targets import ProjectedTeacher

pytestmark = pytest.mark.usefixtures("single_thread")

N, H_S, H_T, V = 23, 8, 6, 31


def close(actual, expected, rtol=1e-5):
    expected = expected.to(actual.dtype) if actual.dtype != expected.dtype else expected
    atol = 1e-6 * max(expected.abs().max().item(), 1e-12)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def reference(zs, zt, labels, temperature=1.0):
    """Per token, in float64: value log q(y) - log p(y); gradient (log q(y) - log p(y)) (onehot(y) - q) / T."""
    zs, zt = zs.double(), zt.double()
    log_q = torch.log_softmax(zs / temperature, -1)
    log_p = torch.log_softmax(zt / temperature, -1)
    values = torch.zeros(zs.shape[0], dtype=torch.float64)
    grads = torch.zeros_like(zs)
    for i, y in enumerate(labels.tolist()):
        if y == -100:
            continue
        estimate = log_q[i, y] - log_p[i, y]
        values[i] = estimate
        onehot = torch.zeros(zs.shape[1], dtype=torch.float64)
        onehot[y] = 1.0
        grads[i] = estimate * (onehot - log_q[i].exp()) / temperature
    return values, grads


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_value_and_gradient_equal_the_formula(temperature):
    torch.manual_seed(0)
    zs = (3 * torch.randn(N, V)).requires_grad_(True)
    zt = 3 * torch.randn(N, V)
    labels = torch.randint(0, V, (N,))
    labels[[2, 9]] = -100
    values = SampledTokenLoss(temperature)(zs, zt, labels)
    values.sum().backward()
    ref_values, ref_grads = reference(zs.detach(), zt, labels, temperature)
    close(values.detach(), ref_values)
    close(zs.grad, ref_grads)
    assert values[2] == 0 and values[9] == 0 and zs.grad[[2, 9]].abs().max() == 0


def test_its_expected_gradient_is_the_reverse_kl_gradient():
    """Weighted by the student's own probabilities of every token (the expectation over y ~ q, enumerated), the
    per-token gradients sum to the gradient of KL(q || p): the objective is an unbiased estimate of reverse KL."""
    torch.manual_seed(1)
    zs = torch.randn(4, V, dtype=torch.float64)
    zt = torch.randn(4, V, dtype=torch.float64)
    q = torch.softmax(zs, -1)
    expected_grad = torch.zeros_like(zs)
    for y in range(V):
        _, grads = reference(zs, zt, torch.full((4,), y))
        expected_grad += q[:, [y]] * grads
    kl_input = zs.clone().requires_grad_(True)
    log_q, log_p = torch.log_softmax(kl_input, -1), torch.log_softmax(zt, -1)
    (log_q.exp() * (log_q - log_p)).sum().backward()  # KL(q || p) in float64, by autograd
    torch.testing.assert_close(expected_grad, kl_input.grad, rtol=1e-10, atol=1e-12)


def test_without_labels_it_says_what_it_needs():
    with pytest.raises(ValueError, match="sampled tokens"):
        SampledTokenLoss()(torch.zeros(2, 3), torch.zeros(2, 3))


@pytest.mark.parametrize("engine", [chunked_loss, dense_loss])
def test_the_engine_runs_it_from_hidden_states(engine):
    """Through the chunked engine (chunks of 5 tokens) and its dense reference: the loss is the mean of the
    per-token estimates and the head/hidden gradients are the formula's, chained through the projection."""
    torch.manual_seed(2)
    hidden = torch.randn(N, H_S, requires_grad=True)
    weight = (0.5 * torch.randn(V, H_S)).requires_grad_(True)
    teacher_hidden, teacher_weight = torch.randn(N, H_T), torch.randn(V, H_T)
    labels = torch.randint(0, V, (N,))
    objective = DistillationObjective(SampledTokenLoss(), kd_weight=1.0, ce_weight=0.0)
    teacher = ProjectedTeacher(teacher_hidden, OutputHead(teacher_weight))
    out = engine(hidden, OutputHead(weight), teacher, labels, objective, normalizer=N, chunk_size=5)
    out.loss.backward()

    zs = (hidden.detach().double() @ weight.detach().double().T)
    zt = teacher_hidden.double() @ teacher_weight.double().T
    ref_values, ref_grad_logits = reference(zs, zt, labels)
    close(out.loss.detach(), ref_values.sum() / N)
    close(out.kd_sum, ref_values.sum())
    close(hidden.grad, (ref_grad_logits @ weight.detach().double()) / N)
    close(weight.grad, (ref_grad_logits.T @ hidden.detach().double()) / N)
