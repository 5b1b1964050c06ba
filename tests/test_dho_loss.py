"""The DHO loss (docs/ALGORITHMS.md section 4) against a naive re-derivation from the formula, values and gradients:

    L = lam * CE(h_ce(z_l), y) + (1 - lam) * T^2 * [KL(p_t(x_l) || q_kd(x_l)) + KL(p_t(x_u) || q_kd(x_u))]
"""

from __future__ import annotations

import math

import pytest
import torch
from test_dho_support import tiny_student, tiny_vit_config

from llmkd.losses.dho import dho_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def naive_softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    return [e / sum(exps) for e in exps]


def naive_dho_loss(ce_logits, kd_logits, labels, teacher, kd_unlabeled, teacher_unlabeled, lam, temperature):
    """Straight from the formula, one example at a time, in Python floats (double precision)."""
    ce_terms = [-math.log(naive_softmax(row)[y]) for row, y in zip(ce_logits.tolist(), labels.tolist())]

    def kl_terms(student, target):
        terms = []
        for s_row, t_row in zip(student.tolist(), target.tolist()):
            p = naive_softmax([v / temperature for v in t_row])
            q = naive_softmax([v / temperature for v in s_row])
            terms.append(sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q) if pc > 0))
        return terms

    ce = sum(ce_terms) / len(ce_terms)
    kd_l = sum(kl_terms(kd_logits, teacher)) / len(labels)
    kd_u = sum(kl_terms(kd_unlabeled, teacher_unlabeled)) / kd_unlabeled.shape[0]
    return lam * ce + (1 - lam) * temperature**2 * (kd_l + kd_u), ce, temperature**2 * kd_l, temperature**2 * kd_u


def random_inputs(b_l=5, b_u=7, classes=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ce = (torch.randn(b_l, classes, generator=generator) * 2).requires_grad_()
    kd = (torch.randn(b_l, classes, generator=generator) * 2).requires_grad_()
    kd_u = (torch.randn(b_u, classes, generator=generator) * 2).requires_grad_()
    labels = torch.randint(0, classes, (b_l,), generator=generator)
    teacher = torch.randn(b_l, classes, generator=generator) * 5
    teacher_u = torch.randn(b_u, classes, generator=generator) * 5
    return ce, kd, labels, teacher, kd_u, teacher_u


@pytest.mark.parametrize("lam,temperature", [(0.5, 2.0), (0.3, 1.0), (0.9, 4.0), (0.0, 2.0), (1.0, 2.0)])
def test_loss_values_match_the_formula(lam, temperature):
    ce, kd, labels, teacher, kd_u, teacher_u = random_inputs()
    result = dho_loss(ce, kd, labels, teacher, kd_u, teacher_u, ce_weight=lam, temperature=temperature)
    expected, ce_ref, kd_l_ref, kd_u_ref = naive_dho_loss(ce, kd, labels, teacher, kd_u, teacher_u, lam,
                                                          temperature)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert result.ce.item() == pytest.approx(ce_ref, rel=1e-5)
    assert result.kd_labeled.item() == pytest.approx(kd_l_ref, rel=1e-5, abs=1e-6)
    assert result.kd_unlabeled.item() == pytest.approx(kd_u_ref, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("lam,temperature", [(0.5, 2.0), (0.2, 3.0)])
def test_gradients_match_the_formula(lam, temperature):
    """dL/dz_ce = lam (softmax(z_ce) - onehot(y)) / B_l; dL/dz_kd = (1 - lam) T (q_kd - p_t) / B (per batch), the
    derivative of T^2 KL(p || softmax(z / T)); and the same gradients by autograd through a float64 re-derivation."""
    ce, kd, labels, teacher, kd_u, teacher_u = random_inputs(seed=3)
    result = dho_loss(ce, kd, labels, teacher, kd_u, teacher_u, ce_weight=lam, temperature=temperature)
    grads = torch.autograd.grad(result.loss, (ce, kd, kd_u))

    b_l, b_u = ce.shape[0], kd_u.shape[0]
    onehot = torch.nn.functional.one_hot(labels, ce.shape[1]).double()
    expected_ce = lam * (torch.softmax(ce.double(), -1) - onehot) / b_l
    expected_kd = (1 - lam) * temperature * (torch.softmax(kd.double() / temperature, -1)
                                             - torch.softmax(teacher.double() / temperature, -1)) / b_l
    expected_kd_u = (1 - lam) * temperature * (torch.softmax(kd_u.double() / temperature, -1)
                                               - torch.softmax(teacher_u.double() / temperature, -1)) / b_u
    for got, want in zip(grads, (expected_ce, expected_kd, expected_kd_u)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)

    # autograd through an explicit float64 version of the formula
    leaves = [t.detach().double().requires_grad_() for t in (ce, kd, kd_u)]
    ce64, kd64, kd_u64 = leaves
    log_p = torch.log(torch.exp(teacher.double() / temperature) / torch.exp(teacher.double() / temperature).sum(-1,
                                                                                                         True))
    log_p_u = torch.log(torch.exp(teacher_u.double() / temperature)
                        / torch.exp(teacher_u.double() / temperature).sum(-1, True))
    log_q = kd64 / temperature - torch.log(torch.exp(kd64 / temperature).sum(-1, True))
    log_q_u = kd_u64 / temperature - torch.log(torch.exp(kd_u64 / temperature).sum(-1, True))
    ce_ref = -(ce64.gather(1, labels[:, None]) - torch.log(torch.exp(ce64).sum(-1, True))).mean()
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() + (log_p_u.exp() * (log_p_u - log_q_u)).sum(-1).mean()
    reference = lam * ce_ref + (1 - lam) * temperature**2 * kl
    for got, want in zip(grads, torch.autograd.grad(reference, leaves)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)


def test_counts_divide_the_sums():
    """Under accumulation / data parallelism each sum is divided by the step's global count."""
    ce, kd, labels, teacher, kd_u, teacher_u = random_inputs()
    mean = dho_loss(ce, kd, labels, teacher, kd_u, teacher_u)
    halved = dho_loss(ce, kd, labels, teacher, kd_u, teacher_u, labeled_count=2 * len(labels),
                      unlabeled_count=2 * kd_u.shape[0])
    assert halved.loss.item() == pytest.approx(mean.loss.item() / 2, rel=1e-6)
    # two halves of a batch with the whole batch's counts sum to the whole batch's loss
    first = dho_loss(ce[:2], kd[:2], labels[:2], teacher[:2], kd_u[:3], teacher_u[:3], labeled_count=5,
                     unlabeled_count=7)
    second = dho_loss(ce[2:], kd[2:], labels[2:], teacher[2:], kd_u[3:], teacher_u[3:], labeled_count=5,
                      unlabeled_count=7)
    assert (first.loss + second.loss).item() == pytest.approx(mean.loss.item(), rel=1e-5)


def test_ce_head_gets_no_gradient_from_unlabeled_data():
    """With a backbone that couples no examples (ViT: LayerNorm), the CE head's gradient from the whole loss equals
    the gradient of lam * CE on the labeled batch alone: unlabeled images reach only the KD head."""
    model = tiny_student(tiny_vit_config(), seed=1)
    generator = torch.Generator().manual_seed(0)
    labeled, unlabeled = torch.randn(3, 3, 16, 16, generator=generator), torch.randn(4, 3, 16, 16,
                                                                                    generator=generator)
    labels = torch.tensor([0, 2, 3])
    teacher, teacher_u = torch.randn(3, 4, generator=generator), torch.randn(4, 4, generator=generator)

    out = model(pixel_values=torch.cat([labeled, unlabeled]))
    loss = dho_loss(out.ce_logits[:3], out.kd_logits[:3], labels, teacher, out.kd_logits[3:], teacher_u).loss
    full = torch.autograd.grad(loss, (model.ce_head.weight, model.kd_head.weight))
    ce_only = torch.nn.functional.cross_entropy(model(pixel_values=labeled).ce_logits, labels) * 0.5
    (ce_alone,) = torch.autograd.grad(ce_only, (model.ce_head.weight,))
    torch.testing.assert_close(full[0], ce_alone, rtol=1e-5, atol=1e-7)
    assert full[1].abs().sum() > 0  # the KD head does learn


def test_bad_inputs_fail_clearly():
    ce, kd, labels, teacher, kd_u, teacher_u = random_inputs()
    with pytest.raises(ValueError, match=r"class ids in \[0, 6\)"):
        dho_loss(ce, kd, torch.full_like(labels, 6), teacher, kd_u, teacher_u)
    with pytest.raises(ValueError, match="unlabeled batch .* differ in shape"):
        dho_loss(ce, kd, labels, teacher, kd_u, teacher_u[:, :4])
