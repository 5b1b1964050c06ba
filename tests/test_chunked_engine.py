"""Tests of the chunked distillation engine (llmkd.losses.engine, llmkd.losses.dense_reference).

The engine is held against (a) :func:`dense_distillation_loss` and (b) a naive float64 reference that builds the
full logits ``hidden @ W.T + b`` and the loss from the formulas, in value, gradients (student hidden, head weight
and bias) and metrics; and it is checked never to build an (N x V) tensor.
"""

from __future__ import annotations

import math

import pytest
import torch
from divergence_reference import REFERENCES, divergence_of_probs
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llmkd.losses import (
    DistillationLossOutput,
    LogitTransform,
    chunked_distillation_loss,
    dense_distillation_loss,
    get_divergence,
)

N, H_S, H_T, V = 37, 16, 12, 97


pytestmark = pytest.mark.usefixtures("single_thread")
NAMES = list(REFERENCES)  # every registered divergence (test_losses.py checks the table is complete)


# ----------------------------------------------------------------------------------------------------------------
# Naive float64 reference
# ----------------------------------------------------------------------------------------------------------------
def ref_softmax(z, temperature=1.0):
    z = z / temperature
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def ref_token_divergence(name, zs, zt, temperature=1.0, beta=0.5, alpha=0.1):
    q, p = ref_softmax(zs, temperature), ref_softmax(zt, temperature)
    return divergence_of_probs(name, p, q, beta=beta, alpha=alpha) * temperature**2


def ref_transform(x, scale=1.0, softcap=None):
    x = x * scale
    return x if softcap is None else softcap * torch.tanh(x / softcap)


def ref_ce_sum(z, labels):
    """sum over labels != -100 of -log softmax(z)[y]."""
    if labels is None:
        return z.new_zeros(())
    valid = labels != -100
    if not valid.any():
        return z.new_zeros(())
    logq = torch.log(ref_softmax(z[valid]))
    return -logq[torch.arange(int(valid.sum())), labels[valid]].sum()


def reference(prob, token_loss, *, kd_weight=1.0, ce_weight=0.0, normalizer=None, s_tf=(1.0, None),
              t_tf=(1.0, None), vocab_size=None, use_bias=True):
    """Loss, grads (hidden, weight, bias) and metrics, in float64, with full logits."""
    hs = prob["student_hidden"].detach().double().requires_grad_(True)
    ws = prob["student_weight"].detach().double().requires_grad_(True)
    bs = prob["student_bias"].detach().double().requires_grad_(True)
    ht, wt, bt = (prob[k].detach().double() for k in ("teacher_hidden", "teacher_weight", "teacher_bias"))
    labels = prob["labels"]
    v = vocab_size or min(ws.shape[0], wt.shape[0])
    zs = hs @ ws[:v].T + (bs[:v] if use_bias else 0.0)
    zt = ht @ wt[:v].T + (bt[:v] if use_bias else 0.0)
    zs, zt = ref_transform(zs, *s_tf), ref_transform(zt, *t_tf)
    if callable(token_loss):
        kd = token_loss(zs, zt).sum()
    else:
        name, temperature, beta, alpha = token_loss
        kd = ref_token_divergence(name, zs, zt, temperature, beta, alpha).sum()
    ce = ref_ce_sum(zs, labels)
    total = kd_weight * kd + ce_weight * ce
    norm = float(normalizer) if normalizer is not None else max(hs.shape[0], 1)
    loss = total / max(norm, 1.0)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, [hs, ws, bs], allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, (hs, ws, bs))]
    else:  # N = 0
        grads = [torch.zeros_like(hs), torch.zeros_like(ws), torch.zeros_like(bs)]
    return {"loss": loss.detach(), "grads": grads, "kd_sum": kd.detach(), "ce_sum": ce.detach(),
            "teacher_ce_sum": ref_ce_sum(zt, labels).detach()}


# ----------------------------------------------------------------------------------------------------------------
# Problems and helpers
# ----------------------------------------------------------------------------------------------------------------
def make_problem(n=N, h_s=H_S, h_t=H_T, v_s=V, v_t=V, seed=0, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, min(v_s, v_t), (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    if n > 1:
        labels[0] = -100
    return {
        "student_hidden": torch.randn(n, h_s, generator=g).requires_grad_(True),
        "student_weight": (torch.randn(v_s, h_s, generator=g) * 0.5).requires_grad_(True),
        "student_bias": (torch.randn(v_s, generator=g) * 0.3).requires_grad_(True),
        "teacher_hidden": torch.randn(n, h_t, generator=g),
        "teacher_weight": torch.randn(v_t, h_t, generator=g) * 0.6,
        "teacher_bias": torch.randn(v_t, generator=g) * 0.3,
        "labels": labels,
    }


def run_engine(fn, prob, token_loss, backward=True, use_bias=True, **kw):
    for key in ("student_hidden", "student_weight", "student_bias"):
        prob[key].grad = None
    out = fn(
        prob["student_hidden"], prob["student_weight"], prob["teacher_hidden"], prob["teacher_weight"],
        prob["labels"], token_loss,
        student_bias=prob["student_bias"] if use_bias else None,
        teacher_bias=prob["teacher_bias"] if use_bias else None,
        **kw,
    )
    grads = None
    if backward:
        out.loss.backward()
        grads = [prob[k].grad for k in ("student_hidden", "student_weight", "student_bias")]
    return out, grads


def rel_close(actual, expected, rtol=1e-5, atol_scale=1e-6):
    """Relative agreement, with an absolute floor relative to the tensor's own scale (for entries near 0)."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    atol = atol_scale * max(expected.abs().max().item(), 1e-12) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def check_against(out, grads, ref, check_grads=(True, True, True), rtol=1e-5):
    rel_close(out.loss.detach(), ref["loss"], rtol=rtol)
    rel_close(out.kd_sum, ref["kd_sum"], rtol=rtol)
    rel_close(out.ce_sum, ref["ce_sum"], rtol=rtol)
    rel_close(out.teacher_ce_sum, ref["teacher_ce_sum"], rtol=rtol)
    if grads is not None:
        for got, exp, check in zip(grads, ref["grads"], check_grads):
            if check:
                assert got is not None
                rel_close(got, exp, rtol=rtol, atol_scale=2e-6)


def div_spec(name, temperature=2.0, beta=0.3, alpha=0.2):
    return get_divergence(name, temperature=temperature, beta=beta, alpha=alpha), (name, temperature, beta, alpha)


# ----------------------------------------------------------------------------------------------------------------
# Values, gradients and metrics
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 7, N, N + 20])
@pytest.mark.parametrize("name", NAMES)
def test_chunked_matches_reference_and_dense(name, chunk_size):
    prob = make_problem(seed=1)
    loss_fn, spec = div_spec(name)
    kw = dict(kd_weight=0.7, ce_weight=0.3)
    ref = reference(prob, spec, **kw)

    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=chunk_size, **kw)
    assert isinstance(out, DistillationLossOutput)
    assert out.num_tokens == N
    assert out.loss.dtype == torch.float32 and out.loss.dim() == 0
    for metric in (out.kd_sum, out.ce_sum, out.teacher_ce_sum):
        assert metric.dtype == torch.float32 and metric.dim() == 0 and not metric.requires_grad
    check_against(out, grads, ref)

    dense, dense_grads = run_engine(dense_distillation_loss, prob, loss_fn, **kw)
    check_against(dense, dense_grads, ref)
    for a, b in zip(grads, dense_grads):
        rel_close(a, b, atol_scale=1e-6)
    rel_close(out.loss.detach(), dense.loss.detach())


@pytest.mark.parametrize("kd_weight,ce_weight", [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (2.0, 0.25)])
@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_kd_ce_mixtures(name, kd_weight, ce_weight):
    prob = make_problem(seed=2)
    loss_fn, spec = div_spec(name, temperature=1.0)
    ref = reference(prob, spec, kd_weight=kd_weight, ce_weight=ce_weight)
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=8, kd_weight=kd_weight,
                            ce_weight=ce_weight)
    check_against(out, grads, ref)
    # the loss is exactly the weighted sum of the metrics over the normaliser
    rel_close(out.loss.detach(), (kd_weight * out.kd_sum + ce_weight * out.ce_sum) / N, rtol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd"])
def test_temperatures(name, temperature):
    prob = make_problem(seed=3)
    loss_fn, spec = div_spec(name, temperature=temperature)
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=10, ce_weight=0.1)
    check_against(out, grads, reference(prob, spec, ce_weight=0.1))


@pytest.mark.parametrize("name", ["fkl", "skew_rkl"])
@pytest.mark.parametrize("chunk_size", [5, 64])
def test_teacher_with_larger_padded_head(name, chunk_size):
    # teacher head padded to V_t > V_s: both are cut to min(V_s, V_t) rows; rows beyond get no gradient
    prob = make_problem(v_s=89, v_t=97, seed=4)
    loss_fn, spec = div_spec(name)
    ref = reference(prob, spec, ce_weight=0.5)
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=chunk_size, ce_weight=0.5)
    check_against(out, grads, ref)
    dense, _ = run_engine(dense_distillation_loss, prob, loss_fn, ce_weight=0.5)
    rel_close(out.loss.detach(), dense.loss.detach())
    # garbage in the teacher's padding rows changes nothing
    prob["teacher_weight"][89:] = 1e4
    prob["teacher_bias"][89:] = 1e4
    out2, _ = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=chunk_size, ce_weight=0.5)
    rel_close(out2.loss.detach(), ref["loss"])


def test_explicit_vocab_size_smaller_than_both_heads():
    prob = make_problem(v_s=97, v_t=97, seed=5)
    prob["labels"] = prob["labels"].clamp(max=79).masked_fill(prob["labels"] == -100, -100)
    loss_fn, spec = div_spec("jsd")
    ref = reference(prob, spec, ce_weight=1.0, vocab_size=80)
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=6, ce_weight=1.0, vocab_size=80)
    check_against(out, grads, ref)
    assert torch.all(grads[1][80:] == 0) and torch.all(grads[2][80:] == 0)
    assert torch.all(grads[1][:80].abs().sum(-1) > 0)


@pytest.mark.parametrize("normalizer", [50.0, 50, torch.tensor(50.0), torch.tensor(50), 12.5])
@pytest.mark.parametrize("chunk_size", [7, 100])
def test_given_normalizer(normalizer, chunk_size):
    prob = make_problem(seed=6)
    loss_fn, spec = div_spec("rkl")
    ref = reference(prob, spec, ce_weight=0.4, normalizer=normalizer)
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=chunk_size, ce_weight=0.4,
                            normalizer=normalizer)
    check_against(out, grads, ref)
    dense, dense_grads = run_engine(dense_distillation_loss, prob, loss_fn, ce_weight=0.4, normalizer=normalizer)
    check_against(dense, dense_grads, ref)
    # the metrics are sums, independent of the normaliser
    default, _ = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=chunk_size, ce_weight=0.4)
    rel_close(default.kd_sum, out.kd_sum, rtol=1e-6)
    rel_close(default.loss.detach() * N, out.loss.detach() * float(normalizer), rtol=1e-5)


def test_micro_batches_with_a_global_normalizer_equal_one_batch():
    prob = make_problem(n=40, seed=7)
    loss_fn, _ = div_spec("skew_fkl")
    full, full_grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=9, ce_weight=0.2)
    full_grads = [g.clone() for g in full_grads]
    for k in ("student_hidden", "student_weight", "student_bias"):
        prob[k].grad = None
    total = 0.0
    for part in (slice(0, 15), slice(15, 40)):
        out = chunked_distillation_loss(
            prob["student_hidden"][part], prob["student_weight"], prob["teacher_hidden"][part],
            prob["teacher_weight"], prob["labels"][part], loss_fn, ce_weight=0.2, chunk_size=9,
            normalizer=torch.tensor(40), student_bias=prob["student_bias"], teacher_bias=prob["teacher_bias"],
        )
        out.loss.backward()
        total = total + out.loss.detach()
    rel_close(total, full.loss.detach())
    for got, exp in zip((prob[k].grad for k in ("student_hidden", "student_weight", "student_bias")), full_grads):
        rel_close(got, exp, atol_scale=1e-6)


@pytest.mark.parametrize(
    "s_tf,t_tf",
    [((0.5, None), (1.0, None)), ((1.0, None), (1.0, 3.0)), ((1.0, 2.5), (0.8, None)), ((1.7, 4.0), (0.6, 2.0))],
    ids=["student-scale", "teacher-softcap", "student-softcap-teacher-scale", "both"],
)
@pytest.mark.parametrize("name", ["fkl", "jsd", "tvd"])
def test_logit_transforms(name, s_tf, t_tf):
    prob = make_problem(seed=8)
    loss_fn, spec = div_spec(name, temperature=1.5)
    ref = reference(prob, spec, ce_weight=0.3, s_tf=s_tf, t_tf=t_tf)
    kw = dict(ce_weight=0.3, student_transform=LogitTransform(*s_tf), teacher_transform=LogitTransform(*t_tf))
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=6, **kw)
    check_against(out, grads, ref)
    dense, dense_grads = run_engine(dense_distillation_loss, prob, loss_fn, **kw)
    check_against(dense, dense_grads, ref)
    # the transform matters (the test would not notice a transform that is ignored)
    plain = reference(prob, spec, ce_weight=0.3)
    assert not torch.allclose(plain["loss"], ref["loss"], rtol=1e-3)


def test_logit_transform_formula():
    x = torch.linspace(-20, 20, 41)
    assert LogitTransform().is_identity and torch.equal(LogitTransform()(x), x)
    assert not LogitTransform(scale=2.0).is_identity and not LogitTransform(softcap=30.0).is_identity
    torch.testing.assert_close(LogitTransform(scale=0.25)(x), x * 0.25)
    torch.testing.assert_close(LogitTransform(softcap=5.0)(x), 5.0 * torch.tanh(x / 5.0))
    torch.testing.assert_close(LogitTransform(scale=2.0, softcap=5.0)(x), 5.0 * torch.tanh(2.0 * x / 5.0))
    assert LogitTransform(softcap=5.0)(x).abs().max() < 5.0


@pytest.mark.parametrize("name", ["fkl", "rkl", "tvd"])
def test_labels(name):
    loss_fn, spec = div_spec(name)
    # labels with -100, no labels at all, and only -100
    prob = make_problem(seed=9, ignore_frac=0.5)
    assert (prob["labels"] == -100).any() and (prob["labels"] != -100).any()
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=4, ce_weight=0.6)
    check_against(out, grads, reference(prob, spec, ce_weight=0.6))
    # ignoring a position's label removes exactly that position's CE
    valid = prob["labels"] != -100
    zs = (prob["student_hidden"] @ prob["student_weight"].T + prob["student_bias"]).detach().double()
    per_ce = -torch.log(ref_softmax(zs))[torch.arange(N), prob["labels"].clamp_min(0)]
    rel_close(out.ce_sum, per_ce[valid].sum())

    prob["labels"] = None
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=4, ce_weight=0.6)
    assert out.ce_sum.item() == 0.0 and out.teacher_ce_sum.item() == 0.0
    check_against(out, grads, reference(prob, spec, ce_weight=0.6))
    rel_close(out.loss.detach(), out.kd_sum / N, rtol=1e-6)

    prob = make_problem(seed=9)
    prob["labels"].fill_(-100)
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=4, ce_weight=0.6)
    assert out.ce_sum.item() == 0.0 and out.teacher_ce_sum.item() == 0.0
    assert torch.isfinite(out.loss)
    check_against(out, grads, reference(prob, spec, ce_weight=0.6))


@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("engine", [chunked_distillation_loss, dense_distillation_loss], ids=["chunked", "dense"])
def test_frozen_student_head(engine, use_bias):
    prob = make_problem(seed=10)
    prob["student_weight"].requires_grad_(False)
    loss_fn, spec = div_spec("jsd")
    out, grads = run_engine(engine, prob, loss_fn, chunk_size=5, ce_weight=0.5, use_bias=use_bias)
    assert prob["student_weight"].grad is None
    ref = reference(prob, spec, ce_weight=0.5, use_bias=use_bias)
    check_against(out, grads, ref, check_grads=(True, False, use_bias))
    if not use_bias:
        assert prob["student_bias"].grad is None
    # a frozen bias and a trainable weight
    prob = make_problem(seed=10)
    prob["student_bias"].requires_grad_(False)
    out, grads = run_engine(engine, prob, loss_fn, chunk_size=5, ce_weight=0.5)
    assert prob["student_bias"].grad is None
    check_against(out, grads, reference(prob, spec, ce_weight=0.5), check_grads=(True, True, False))


@pytest.mark.parametrize("engine", [chunked_distillation_loss, dense_distillation_loss], ids=["chunked", "dense"])
def test_teacher_never_gets_gradient(engine):
    prob = make_problem(seed=11)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        prob[k].requires_grad_(True)
    loss_fn, spec = div_spec("fkl")
    out, grads = run_engine(engine, prob, loss_fn, chunk_size=8, ce_weight=0.5)
    for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
        assert prob[k].grad is None
    check_against(out, grads, reference(prob, spec, ce_weight=0.5))


@pytest.mark.parametrize("engine", [chunked_distillation_loss, dense_distillation_loss], ids=["chunked", "dense"])
@pytest.mark.parametrize("name", ["fkl", "jsd"])
def test_zero_tokens(engine, name):
    prob = make_problem(n=0, seed=12)
    loss_fn, _ = div_spec(name)
    out, grads = run_engine(engine, prob, loss_fn, chunk_size=4, ce_weight=0.5)
    assert out.num_tokens == 0
    assert out.loss.item() == 0.0 and torch.isfinite(out.loss)
    assert out.kd_sum.item() == 0.0 and out.ce_sum.item() == 0.0 and out.teacher_ce_sum.item() == 0.0
    assert grads[0].shape == (0, H_S)
    for g in grads[1:]:
        assert g is not None and torch.all(g == 0)
    # also with a given normaliser
    out = engine(prob["student_hidden"], prob["student_weight"], prob["teacher_hidden"], prob["teacher_weight"],
                 prob["labels"], loss_fn, normalizer=torch.tensor(0), chunk_size=4)
    assert out.loss.item() == 0.0


@pytest.mark.parametrize("engine", [chunked_distillation_loss, dense_distillation_loss], ids=["chunked", "dense"])
def test_zero_python_normalizer_is_clamped_like_a_tensor(engine):
    prob = make_problem(n=0, seed=13)
    loss_fn, _ = div_spec("fkl")
    out, grads = run_engine(engine, prob, loss_fn, chunk_size=4, normalizer=0)
    assert out.loss.item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("engine", [chunked_distillation_loss, dense_distillation_loss], ids=["chunked", "dense"])
@pytest.mark.parametrize("name", ["rkl", "skew_fkl"])
def test_no_grad_mode(engine, name):
    prob = make_problem(seed=14)
    loss_fn, spec = div_spec(name)
    ref = reference(prob, spec, ce_weight=0.5)
    with torch.no_grad():
        out = engine(prob["student_hidden"], prob["student_weight"], prob["teacher_hidden"], prob["teacher_weight"],
                     prob["labels"], loss_fn, ce_weight=0.5, chunk_size=6, student_bias=prob["student_bias"],
                     teacher_bias=prob["teacher_bias"])
    assert not out.loss.requires_grad and out.loss.grad_fn is None
    check_against(out, None, ref)
    # inputs that require no grad at all (evaluation), outside no_grad
    detached = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in prob.items()}
    out = engine(detached["student_hidden"], detached["student_weight"], detached["teacher_hidden"],
                 detached["teacher_weight"], detached["labels"], loss_fn, ce_weight=0.5, chunk_size=6,
                 student_bias=detached["student_bias"], teacher_bias=detached["teacher_bias"])
    assert not out.loss.requires_grad
    check_against(out, None, ref)


def test_backward_uses_the_upstream_gradient():
    prob = make_problem(seed=15)
    loss_fn, _ = div_spec("tvd")
    out, grads = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=7, ce_weight=0.5)
    grads = [g.clone() for g in grads]
    for k in ("student_hidden", "student_weight", "student_bias"):
        prob[k].grad = None
    out = chunked_distillation_loss(prob["student_hidden"], prob["student_weight"], prob["teacher_hidden"],
                                    prob["teacher_weight"], prob["labels"], loss_fn, ce_weight=0.5, chunk_size=7,
                                    student_bias=prob["student_bias"], teacher_bias=prob["teacher_bias"])
    (-3.0 * out.loss + 1.0).backward()
    for k, g in zip(("student_hidden", "student_weight", "student_bias"), grads):
        rel_close(prob[k].grad, -3.0 * g, rtol=1e-6)


def test_non_leaf_student_hidden():
    # the hidden states usually come out of the model: gradient must flow through them to earlier parameters
    prob = make_problem(seed=16)
    loss_fn, spec = div_spec("rkl")
    base = prob["student_hidden"].detach().clone().requires_grad_(True)
    scale = torch.tensor(1.0, requires_grad=True)
    out = chunked_distillation_loss(base * scale, prob["student_weight"], prob["teacher_hidden"],
                                    prob["teacher_weight"], prob["labels"], loss_fn, chunk_size=6,
                                    student_bias=prob["student_bias"], teacher_bias=prob["teacher_bias"])
    out.loss.backward()
    ref = reference(prob, spec)
    rel_close(base.grad, ref["grads"][0], atol_scale=2e-6)
    rel_close(scale.grad, (ref["grads"][0] * prob["student_hidden"].detach().double()).sum(), rtol=1e-4)


def test_arbitrary_token_loss_callable():
    # any (n, V), (n, V) -> (n,) callable works, not just a Divergence
    prob = make_problem(seed=17)

    def squared_logit_gap(zs, zt):
        return ((zs - zt) ** 2).mean(-1)

    out, grads = run_engine(chunked_distillation_loss, prob, squared_logit_gap, chunk_size=5, kd_weight=0.5,
                            ce_weight=0.2)
    check_against(out, grads, reference(prob, squared_logit_gap, kd_weight=0.5, ce_weight=0.2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    prob = make_problem(seed=18)
    lo = {k: (v.detach().to(dtype).requires_grad_(v.requires_grad) if v.is_floating_point() else v)
          for k, v in prob.items()}
    loss_fn, spec = div_spec("fkl")
    out, grads = run_engine(chunked_distillation_loss, lo, loss_fn, chunk_size=7, ce_weight=0.5)
    assert out.loss.dtype == torch.float32 and out.kd_sum.dtype == torch.float32
    for g, k in zip(grads, ("student_hidden", "student_weight", "student_bias")):
        assert g.dtype == dtype and torch.isfinite(g).all()
    dense, dense_grads = run_engine(dense_distillation_loss, lo, loss_fn, ce_weight=0.5)
    rel_close(out.loss.detach(), dense.loss.detach(), rtol=1e-4)
    for a, b in zip(grads, dense_grads):
        rel_close(a.float(), b.float(), rtol=2e-2, atol_scale=2e-2)
    # close to the exact loss of the rounded inputs (only the projections run in low precision)
    ref = reference({k: (v.detach().float() if v.is_floating_point() else v) for k, v in lo.items()}, spec,
                    ce_weight=0.5)
    rel_close(out.loss.detach(), ref["loss"], rtol=2e-2)
    rel_close(grads[0].float(), ref["grads"][0], rtol=5e-2, atol_scale=5e-2)


# ----------------------------------------------------------------------------------------------------------------
# Never an (N x V) tensor
# ----------------------------------------------------------------------------------------------------------------
class LargestOutputs(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces, and the row counts of the head projections (matrix
    products whose output has V columns)."""

    def __init__(self):
        super().__init__()
        self.shapes = []
        self.projection_rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and t.shape[-1] == V:
                    self.projection_rows.append(t.shape[0])
        return out


@pytest.mark.parametrize("name", NAMES)
def test_never_materialises_n_by_v(name):
    n, chunk = 64, 16  # chunk >= H so that the transposed (H, V) head view is not mistaken for logits
    prob = make_problem(n=n, seed=19)
    loss_fn, _ = div_spec(name)

    with LargestOutputs() as mode:
        out, _ = run_engine(chunked_distillation_loss, prob, loss_fn, chunk_size=chunk, ce_weight=0.5)
    rows = mode.projection_rows
    assert rows, "the detector saw no projection"
    assert max(rows) <= chunk
    assert len(rows) == 2 * math.ceil(n / chunk)  # one teacher and one student projection per chunk
    # no tensor anywhere (forward or backward) has more than chunk_size rows of V logits
    biggest = max(math.prod(s) for s in mode.shapes)
    assert biggest < n * V / 2, f"a tensor of {biggest} elements was built (N x V = {n * V})"
    assert not any(len(s) >= 2 and s[-1] == V and s[0] > chunk for s in mode.shapes)

    # the detector is real: the dense path does build N x V logits
    with LargestOutputs() as mode:
        run_engine(dense_distillation_loss, prob, loss_fn, ce_weight=0.5)
    assert max(mode.projection_rows) == n
    assert any(s == (n, V) for s in mode.shapes)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", [chunked_distillation_loss, dense_distillation_loss], ids=["chunked", "dense"])
def test_bad_inputs(engine):
    prob = make_problem(seed=20)
    loss_fn, _ = div_spec("fkl")
    hs, ws, ht, wt, y = (prob[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight",
                                           "labels"))
    with pytest.raises(ValueError, match=r"valid tokens only, shaped \(N, hidden\).*\(1, 37, 16\)"):
        engine(hs[None], ws, ht, wt, y, loss_fn)
    with pytest.raises(ValueError, match=r"student has 37 tokens but teacher has 36"):
        engine(hs, ws, ht[:-1], wt, y, loss_fn)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(37,\), got \(36,\)"):
        engine(hs, ws, ht, wt, y[:-1], loss_fn)
    with pytest.raises(ValueError, match=r"vocab_size=98 exceeds a head's output size \(student 97, teacher 97\)"):
        engine(hs, ws, ht, wt, y, loss_fn, vocab_size=98)


@pytest.mark.parametrize("chunk_size", [0, -3])
def test_bad_chunk_size(chunk_size):
    prob = make_problem(seed=21)
    with pytest.raises(ValueError, match=rf"chunk_size must be >= 1, got {chunk_size}"):
        chunked_distillation_loss(prob["student_hidden"], prob["student_weight"], prob["teacher_hidden"],
                                  prob["teacher_weight"], prob["labels"], get_divergence("fkl"),
                                  chunk_size=chunk_size)


@pytest.mark.parametrize("vocab, rows", [(64000, 512), (151936, 128 * 2), (152064, 128 * 2), (32000, 1024),
                                         (97, 4096), (2**25, 16)])
def test_auto_chunk_size(vocab, rows):
    from llmkd.losses.engine import CHUNK_LOGITS_BUDGET, auto_chunk_size

    assert auto_chunk_size(vocab) == rows
    if 16 < rows < 4096:  # the nearest power of two to the budget, in log scale
        assert CHUNK_LOGITS_BUDGET / math.sqrt(2) <= rows * vocab <= CHUNK_LOGITS_BUDGET * math.sqrt(2)


def test_default_chunk_size_gives_the_same_loss():
    prob = make_problem(seed=22)
    out_auto, grads_auto = run_engine(chunked_distillation_loss, prob, get_divergence("fkl"), ce_weight=0.5)
    grads_auto = [g.clone() for g in grads_auto]
    out_one, grads_one = run_engine(chunked_distillation_loss, prob, get_divergence("fkl"), ce_weight=0.5,
                                    chunk_size=1)
    rel_close(out_auto.loss.detach(), out_one.loss.detach())
    for got, expected in zip(grads_auto, grads_one):
        rel_close(got, expected, atol_scale=2e-6)
