"""Tests of the dense divergences, their per-token kernels, the reduction and the registry (docs/ALGORITHMS.md section 0).

Every divergence is held against a naive float64 reference written straight from its formula (explicit softmax,
explicit sums with 0 log 0 = 0), for values and for gradients with respect to the student logits; the kernels are
also checked with ``torch.autograd.gradcheck`` in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from divergence_reference import CASE_IDS, CASES, LIMIT_IDS, LIMITS, REFERENCES, divergence_of_probs

from llmkd.losses import (
    DIVERGENCES,
    Divergence,
    alpha_beta_divergence,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reduce_token_losses,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    softened_log_probs,
    tvd,
)
from llmkd.losses import divergences as D

NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("single_thread")

# ----------------------------------------------------------------------------------------------------------------
# Naive references (float64, straight from the formulas)
# ----------------------------------------------------------------------------------------------------------------


def ref_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(z / T) in float64 from its definition exp(z_v) / sum_w exp(z_w) (max-shifted; -inf -> 0)."""
    z = logits.double() / temperature
    z = z - z.max(dim=-1, keepdim=True).values
    e = torch.exp(z)
    return e / e.sum(dim=-1, keepdim=True)


def ref_divergence(name, student_logits, teacher_logits, temperature=1.0, beta=0.5, alpha=0.1, **params):
    """Per-position divergence (shape ``(...)``), float64, scaled by T^2."""
    q = ref_softmax(student_logits, temperature)
    p = ref_softmax(teacher_logits, temperature)
    return divergence_of_probs(name, p, q, beta=beta, alpha=alpha, **params) * temperature**2


def py_divergence(name, zs, zt, temperature=1.0, beta=0.5, alpha=0.1, ab_alpha=0.2, ab_beta=0.7):
    """The same as :func:`ref_divergence` for ONE position, in pure Python floats and loops (a check of the check)."""

    def softmax(z):
        z = [x / temperature for x in z]
        mx = max(z)
        e = [math.exp(x - mx) for x in z]
        s = sum(e)
        return [x / s for x in e]

    def kl(a, b):
        return sum(ai * (math.log(ai) - math.log(bi)) for ai, bi in zip(a, b) if ai > 0)

    q, p = softmax(zs), softmax(zt)
    if name == "fkl":
        d = kl(p, q)
    elif name == "rkl":
        d = kl(q, p)
    elif name == "jsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        d = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif name == "skew_fkl":
        d = kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])
    elif name == "skew_rkl":
        d = kl(q, [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q)])
    elif name == "abkd":
        a, b = ab_alpha, ab_beta  # the interior cases only (a, b > 0)
        d = -sum(pi**a * qi**b - a / (a + b) * pi ** (a + b) - b / (a + b) * qi ** (a + b)
                 for pi, qi in zip(p, q)) / (a * b)
    else:
        d = 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    return d * temperature**2


def ref_reduce(per_token, mask, reduction="mean", num_items_in_batch=None):
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool)
    masked = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype))
    if reduction == "none":
        return masked
    if reduction == "sum":
        return masked.sum()
    denom = float(num_items_in_batch) if num_items_in_batch is not None else float(mask.sum())
    return masked.sum() / max(denom, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# The library side
# ----------------------------------------------------------------------------------------------------------------
PUBLIC = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_fkl": skew_forward_kl,
    "skew_rkl": skew_reverse_kl,
    "tvd": tvd,
    "abkd": alpha_beta_divergence,
}
KERNELS = {name: entry.kernel for name, entry in DIVERGENCES.items()}
NAMES = list(REFERENCES)

# the divergences whose value stays finite when the teacher gives zero probability to a token the student does not
FINITE_WITH_TEACHER_ZEROS = [c for c in CASES if REFERENCES[c[0]].finite_with_teacher_zeros]
FINITE_WITH_TEACHER_ZEROS_IDS = [i for c, i in zip(CASES, CASE_IDS) if REFERENCES[c[0]].finite_with_teacher_zeros]


def test_every_registered_divergence_has_a_reference_and_a_public_function():
    assert list(DIVERGENCES) == list(REFERENCES) == list(PUBLIC)
    for name, reference in REFERENCES.items():
        assert tuple(DIVERGENCES[name].defaults) == reference.params, name


def call(name, student, teacher, mask=None, **kw):
    return PUBLIC[name](student, teacher, mask, **kw)


def ref_kw(kw):
    return dict(kw)


def make_logits(shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=g) * scale).float()
    teacher = (torch.randn(shape, generator=g) * scale).float()
    return student, teacher


def make_mask(shape, seed=0, keep=0.7):
    g = torch.Generator().manual_seed(seed + 1000)
    mask = torch.rand(shape, generator=g) < keep
    mask.view(-1)[0] = True
    mask.view(-1)[-1] = False
    return mask


def rel_close(actual, expected, rtol=1e-5, atol_scale=1e-6):
    """assert_close with an absolute floor relative to the tensor's own scale (for entries near 0)."""
    expected = expected.to(actual.dtype) if actual.dtype != expected.dtype else expected
    atol = atol_scale * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


SHAPE = (3, 5, 11)  # (B, S, V)


# ----------------------------------------------------------------------------------------------------------------
# The reference itself
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tensor_reference_matches_pure_python_loops(name, kw, temperature):
    student, teacher = make_logits((4, 7), seed=3)
    ref = ref_divergence(name, student, teacher, temperature, **ref_kw(kw))
    for row in range(4):
        expected = py_divergence(name, student[row].tolist(), teacher[row].tolist(), temperature, **ref_kw(kw))
        assert ref[row].item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


# ----------------------------------------------------------------------------------------------------------------
# Values and gradients against the reference
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_value_and_grad_match_reference(name, kw, temperature):
    student, teacher = make_logits(SHAPE, seed=1)
    mask = make_mask(SHAPE[:-1], seed=1)

    s = student.clone().requires_grad_(True)
    loss = call(name, s, teacher, mask, temperature=temperature, **kw)
    loss.backward()

    s64 = student.double().requires_grad_(True)
    per = ref_divergence(name, s64, teacher.double(), temperature, **ref_kw(kw))
    expected = ref_reduce(per, mask)
    expected.backward()

    assert loss.dtype == torch.float32 and loss.dim() == 0
    rel_close(loss.detach().double(), expected.detach(), rtol=1e-5)
    assert s.grad.dtype == torch.float32
    rel_close(s.grad.double(), s64.grad, rtol=1e-4, atol_scale=1e-5)
    # masked positions get exactly no gradient
    assert torch.all(s.grad[~mask] == 0)
    # ... and every valid position of a non-degenerate pair gets some
    assert torch.all(s.grad[mask].abs().sum(-1) > 0)


@pytest.mark.parametrize("name", ["skew_fkl", "skew_rkl"])
def test_skew_default_alpha_is_0_1(name):
    student, teacher = make_logits(SHAPE, seed=2)
    got = call(name, student, teacher, reduction="none")
    rel_close(got.double(), ref_divergence(name, student, teacher, alpha=0.1))
    other = call(name, student, teacher, reduction="none", alpha=0.3)
    assert not torch.allclose(got, other)


def test_jsd_default_beta_is_symmetric_half():
    student, teacher = make_logits(SHAPE, seed=2)
    got = generalized_jsd(student, teacher, reduction="none")
    rel_close(got.double(), ref_divergence("jsd", student, teacher, beta=0.5))


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_one_dimensional_and_two_dimensional_logits(name, kw):
    student, teacher = make_logits((6, 9), seed=4)
    # (N, V)
    rel_close(call(name, student, teacher, reduction="none", **kw).double(),
              ref_divergence(name, student, teacher, **ref_kw(kw)))
    # (V,): a single distribution gives a scalar
    got = call(name, student[0], teacher[0], reduction="none", **kw)
    assert got.shape == ()
    rel_close(got.double(), ref_divergence(name, student[0], teacher[0], **ref_kw(kw)))


# ----------------------------------------------------------------------------------------------------------------
# gradcheck of the per-token kernels in float64
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kw",
    CASES + LIMITS,
    ids=CASE_IDS + LIMIT_IDS,
)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_kernel_gradcheck_float64(name, kw, temperature):
    kernel = KERNELS[name]
    g = torch.Generator().manual_seed(5)
    zs = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    zt = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_(True)

    def fn(a, b):
        log_q = torch.log_softmax(a / temperature, dim=-1)
        log_p = torch.log_softmax(b / temperature, dim=-1)
        return kernel(log_q, log_p, **kw) * temperature**2

    out = fn(zs, zt)
    assert out.dtype == torch.float64, "the per-token kernels must keep the dtype of their inputs"
    assert out.shape == (3,)
    torch.testing.assert_close(out.detach(), ref_divergence(name, zs.detach(), zt.detach(), temperature,
                                                            **ref_kw(kw)), rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (zs, zt), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd"])
def test_kernel_gradgradcheck_float64(name):
    kernel = KERNELS[name]
    g = torch.Generator().manual_seed(6)
    zs = torch.randn(2, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    zt = torch.randn(2, 5, generator=g, dtype=torch.float64)

    def fn(a):
        return kernel(torch.log_softmax(a, -1), torch.log_softmax(zt, -1))

    assert torch.autograd.gradgradcheck(fn, (zs,), eps=1e-6, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Temperature
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_temperature_softens_both_sides_and_scales_by_t_squared(name, temperature):
    student, teacher = make_logits(SHAPE, seed=7)
    got = call(name, student, teacher, temperature=temperature, reduction="none")
    unscaled = call(name, student / temperature, teacher / temperature, temperature=1.0, reduction="none")
    torch.testing.assert_close(got, unscaled * temperature**2, rtol=1e-5, atol=1e-6)
    # softening only one side would give something else
    one_side = call(name, student, teacher / temperature, temperature=1.0, reduction="none") * temperature**2
    assert not torch.allclose(got, one_side, rtol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_kl_gradient_is_t_times_q_minus_p(temperature):
    # d/dz_s [T^2 KL(p_T || q_T)] = T (q_T - p_T): the T^2 scale keeps gradient magnitudes from shrinking with T.
    student, teacher = make_logits(SHAPE, seed=8)
    mask = make_mask(SHAPE[:-1], seed=8)
    s = student.clone().requires_grad_(True)
    forward_kl(s, teacher, mask, temperature=temperature).backward()
    q, p = ref_softmax(student, temperature), ref_softmax(teacher, temperature)
    expected = temperature * (q - p) * mask[..., None] / mask.sum()
    rel_close(s.grad.double(), expected, rtol=1e-4, atol_scale=1e-5)


def test_softened_log_probs():
    student, _ = make_logits(SHAPE, seed=9)
    out = softened_log_probs(student.to(torch.bfloat16), 2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), torch.log(ref_softmax(student.to(torch.bfloat16).float(), 2.0)),
                               rtol=1e-5, atol=1e-5)
    masked = student.clone()
    masked[..., 3] = NEG_INF
    out = softened_log_probs(masked, 1.5)
    assert torch.all(out[..., 3] == NEG_INF)
    assert torch.isfinite(out[..., :3]).all() and torch.isfinite(out[..., 4:]).all()


# ----------------------------------------------------------------------------------------------------------------
# Reductions
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_reductions_against_reference(name, kw):
    student, teacher = make_logits(SHAPE, seed=10)
    mask = make_mask(SHAPE[:-1], seed=10)
    per = ref_divergence(name, student, teacher, 1.5, **ref_kw(kw))

    none = call(name, student, teacher, mask, reduction="none", temperature=1.5, **kw)
    assert none.shape == SHAPE[:-1] and none.dtype == torch.float32
    assert torch.all(none[~mask] == 0)
    rel_close(none.double(), ref_reduce(per, mask, "none"))

    total = call(name, student, teacher, mask, reduction="sum", temperature=1.5, **kw)
    rel_close(total.double(), ref_reduce(per, mask, "sum"))

    mean = call(name, student, teacher, mask, reduction="mean", temperature=1.5, **kw)
    rel_close(mean.double(), per[mask].sum() / mask.sum())

    for n_items in (37, torch.tensor(37), torch.tensor(37.0)):
        got = call(name, student, teacher, mask, temperature=1.5, num_items_in_batch=n_items, **kw)
        rel_close(got.double(), per[mask].sum() / 37)

    # no mask: every position counts
    got = call(name, student, teacher, None, temperature=1.5, **kw)
    rel_close(got.double(), per.mean())
    got = call(name, student, teacher, None, reduction="none", temperature=1.5, **kw)
    rel_close(got.double(), per)


def test_reduce_token_losses_directly():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, float("nan")]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    # masked positions are zeroed, even when they hold NaN
    none = reduce_token_losses(per, mask, reduction="none")
    torch.testing.assert_close(none, torch.tensor([[1.0, 0.0, 3.0], [4.0, 5.0, 0.0]]))
    assert reduce_token_losses(per, mask, reduction="sum").item() == 13.0
    assert reduce_token_losses(per, mask).item() == pytest.approx(13.0 / 4)
    assert reduce_token_losses(per, mask, num_items_in_batch=10).item() == pytest.approx(1.3)
    assert reduce_token_losses(per, mask, num_items_in_batch=torch.tensor(10)).item() == pytest.approx(1.3)
    # an integer 0/1 mask works like a boolean one
    assert reduce_token_losses(per, mask.long()).item() == pytest.approx(13.0 / 4)
    # nothing valid: 0, not NaN
    empty = torch.zeros_like(mask)
    assert reduce_token_losses(per, empty).item() == 0.0
    assert reduce_token_losses(per, empty, num_items_in_batch=0).item() == 0.0
    assert reduce_token_losses(per, empty, num_items_in_batch=torch.tensor(0)).item() == 0.0
    # no mask
    clean = torch.tensor([1.0, 2.0, 6.0])
    assert reduce_token_losses(clean).item() == pytest.approx(3.0)
    assert reduce_token_losses(clean, reduction="sum").item() == pytest.approx(9.0)


@pytest.mark.parametrize("name", NAMES)
def test_all_masked_mean_is_zero_with_zero_gradient(name):
    student, teacher = make_logits(SHAPE, seed=11)
    s = student.clone().requires_grad_(True)
    loss = call(name, s, teacher, torch.zeros(SHAPE[:-1], dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s.grad == 0)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_micro_batches_with_num_items_equal_one_big_batch(name, kw):
    # gradient accumulation invariance: sum of micro-batch losses normalised by the global count == full-batch mean
    student, teacher = make_logits((4, 6, 13), seed=12)
    mask = make_mask((4, 6), seed=12)
    n_items = int(mask.sum())

    s_full = student.clone().requires_grad_(True)
    full = call(name, s_full, teacher, mask, **kw)
    full.backward()

    s_parts = student.clone().requires_grad_(True)
    acc = sum(
        call(name, s_parts[i:i + 2], teacher[i:i + 2], mask[i:i + 2], num_items_in_batch=n_items, **kw)
        for i in (0, 2)
    )
    acc.backward()
    torch.testing.assert_close(acc, full, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s_parts.grad, s_full.grad, rtol=1e-5, atol=1e-8)
    # while the plain per-micro-batch mean would not be the same thing
    naive = sum(call(name, student[i:i + 2], teacher[i:i + 2], mask[i:i + 2], **kw) for i in (0, 2)) / 2
    assert not torch.allclose(naive, full, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# fp32 math whatever the input dtype
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_low_precision_inputs_use_fp32_math(name, kw, dtype):
    student, teacher = make_logits(SHAPE, seed=13)
    mask = make_mask(SHAPE[:-1], seed=13)
    s_lo = student.to(dtype).requires_grad_(True)
    t_lo = teacher.to(dtype)
    loss = call(name, s_lo, t_lo, mask, temperature=1.3, **kw)
    assert loss.dtype == torch.float32

    s_up = s_lo.detach().float().requires_grad_(True)
    expected = call(name, s_up, t_lo.float(), mask, temperature=1.3, **kw)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    # and the fp32 result is the exact one of the (rounded) inputs, not a bf16/fp16 approximation of it
    ref = ref_reduce(ref_divergence(name, s_lo.detach(), t_lo, 1.3, **ref_kw(kw)), mask)
    rel_close(loss.detach().double(), ref, rtol=1e-5)

    loss.backward()
    expected.backward()
    assert s_lo.grad.dtype == dtype
    assert torch.isfinite(s_lo.grad).all()
    torch.testing.assert_close(s_lo.grad, s_up.grad.to(dtype))

    none = call(name, s_lo.detach(), t_lo, mask, reduction="none", **kw)
    assert none.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------
# -inf logits (masked vocabulary entries)
# ----------------------------------------------------------------------------------------------------------------
def _vocab_masked(seed=14, shape=SHAPE):
    student, teacher = make_logits(shape, seed=seed)
    g = torch.Generator().manual_seed(seed)
    vocab_mask = torch.rand(shape, generator=g) < 0.35
    vocab_mask[..., :2] = False  # at least two live tokens per position
    vocab_mask[..., -1] = True  # and at least one masked one
    return student.masked_fill(vocab_mask, NEG_INF), teacher.masked_fill(vocab_mask, NEG_INF), vocab_mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_neg_inf_in_both_values_are_finite_and_exact(name, kw, temperature):
    student, teacher, _ = _vocab_masked()
    mask = make_mask(SHAPE[:-1], seed=14)
    for reduction in ("none", "mean", "sum"):
        got = call(name, student, teacher, mask, reduction=reduction, temperature=temperature, **kw)
        assert torch.isfinite(got).all()
        ref = ref_reduce(ref_divergence(name, student, teacher, temperature, **ref_kw(kw)), mask, reduction)
        rel_close(got.double(), ref)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_neg_inf_columns_equal_dropping_the_columns(name, kw):
    # masking vocabulary entries with -inf on both sides is the same as removing them from the vocabulary
    student, teacher = make_logits(SHAPE, seed=15)
    keep = torch.ones(SHAPE[-1], dtype=torch.bool)
    keep[[1, 4, 10]] = False
    s_inf = student.masked_fill(~keep, NEG_INF)
    t_inf = teacher.masked_fill(~keep, NEG_INF)
    got = call(name, s_inf, t_inf, reduction="none", temperature=1.5, **kw)
    expected = call(name, student[..., keep], teacher[..., keep], reduction="none", temperature=1.5, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,kw", [pytest.param(name, kw, id=case_id) for (name, kw), case_id in zip(CASES, CASE_IDS)])
def test_neg_inf_in_both_gradients_are_finite_and_exact(name, kw):
    student, teacher, vocab_mask = _vocab_masked(seed=16)
    mask = make_mask(SHAPE[:-1], seed=16)
    s = student.clone().requires_grad_(True)
    call(name, s, teacher, mask, temperature=1.5, **kw).backward()
    assert torch.isfinite(s.grad).all(), f"{name}: non-finite gradient with -inf logits"
    assert torch.all(s.grad[vocab_mask] == 0)
    s64 = student.double().requires_grad_(True)
    ref_reduce(ref_divergence(name, s64, teacher.double(), 1.5, **ref_kw(kw)), mask).backward()
    rel_close(s.grad.double(), s64.grad, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("name,kw", FINITE_WITH_TEACHER_ZEROS, ids=FINITE_WITH_TEACHER_ZEROS_IDS)
def test_teacher_neg_inf_with_finite_student_is_finite(name, kw):
    student, teacher = make_logits(SHAPE, seed=17)
    teacher = teacher.clone()
    teacher[..., [0, 5]] = NEG_INF
    mask = make_mask(SHAPE[:-1], seed=17)
    s = student.clone().requires_grad_(True)
    loss = call(name, s, teacher, mask, temperature=1.2, **kw)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    s64 = student.double().requires_grad_(True)
    ref = ref_reduce(ref_divergence(name, s64, teacher.double(), 1.2, **ref_kw(kw)), mask)
    ref.backward()
    rel_close(loss.detach().double(), ref.detach())
    rel_close(s.grad.double(), s64.grad, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("name,kw", [("rkl", {}), ("jsd", {"beta": 1.0})], ids=["rkl", "jsd-beta1"])
def test_reverse_kl_is_plus_inf_not_nan_when_teacher_excludes_a_student_token(name, kw):
    # KL(q || p) with p_v = 0 < q_v is +inf mathematically; it must not be NaN.
    student, teacher = make_logits(SHAPE, seed=18)
    teacher[..., 3] = NEG_INF
    got = call(name, student, teacher, reduction="none", **kw)
    assert torch.all(got == float("inf"))
    # the forward direction only looks at the teacher's support, so it stays finite
    assert torch.isfinite(forward_kl(student, teacher, reduction="none")).all()


# ----------------------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_zero_when_student_equals_teacher(name, kw, temperature):
    logits, _ = make_logits(SHAPE, seed=19, scale=4.0)
    s = logits.clone().requires_grad_(True)
    got = call(name, s, logits, reduction="none", temperature=temperature, **kw)
    assert torch.all(got.abs() < 1e-6)
    if name != "tvd":  # |.| has no gradient at 0; the smooth divergences have a zero gradient at their minimum
        got.sum().backward()
        assert torch.all(s.grad.abs() < 1e-6)
    # shifting logits by a constant changes nothing
    shifted = call(name, logits + 3.0, logits, reduction="none", temperature=temperature, **kw)
    assert torch.all(shifted.abs() < 1e-5)


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
def test_positive_for_different_distributions(name, kw):
    student, teacher = make_logits((50, 17), seed=20, scale=3.0)
    got = call(name, student, teacher, reduction="none", **kw)
    assert torch.all(got > 0)


def test_kl_asymmetry():
    student = torch.tensor([[4.0, 0.0, 0.0, 0.0]])
    teacher = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    fkl = forward_kl(student, teacher).item()
    rkl = reverse_kl(student, teacher).item()
    assert fkl == pytest.approx(ref_divergence("fkl", student, teacher).item(), rel=1e-5)
    assert rkl == pytest.approx(ref_divergence("rkl", student, teacher).item(), rel=1e-5)
    assert abs(fkl - rkl) > 0.1
    # swapping the roles swaps forward and reverse
    s, t = make_logits(SHAPE, seed=21)
    torch.testing.assert_close(forward_kl(s, t, reduction="none"), reverse_kl(t, s, reduction="none"))
    assert not torch.allclose(forward_kl(s, t, reduction="none"), reverse_kl(s, t, reduction="none"), rtol=1e-2)


def test_jsd_and_skew_role_swaps():
    s, t = make_logits(SHAPE, seed=22)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.5, reduction="none"),
                               generalized_jsd(t, s, beta=0.5, reduction="none"), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.2, reduction="none"),
                               generalized_jsd(t, s, beta=0.8, reduction="none"), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.3, reduction="none"),
                               skew_reverse_kl(t, s, alpha=0.3, reduction="none"), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(generalized_jsd(s, t, beta=0.2, reduction="none"),
                              generalized_jsd(t, s, beta=0.2, reduction="none"), rtol=1e-3)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_end_points_are_forward_and_reverse_kl(temperature):
    s, t = make_logits(SHAPE, seed=23)
    mask = make_mask(SHAPE[:-1], seed=23)
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=0.0, temperature=temperature),
                               forward_kl(s, t, mask, temperature=temperature), rtol=0, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, mask, beta=1.0, temperature=temperature),
                               reverse_kl(s, t, mask, temperature=temperature), rtol=0, atol=0)
    # interior beta is neither
    mid = generalized_jsd(s, t, mask, beta=0.5, temperature=temperature)
    assert mid < forward_kl(s, t, mask, temperature=temperature)
    assert mid < reverse_kl(s, t, mask, temperature=temperature)


def test_jsd_end_points_are_the_rescaled_limits():
    # beta -> 0: JSD_beta / beta -> KL(p || q); beta -> 1: JSD_beta / (1 - beta) -> KL(q || p)
    g = torch.Generator().manual_seed(24)
    log_q = torch.log_softmax(torch.randn(5, 8, generator=g, dtype=torch.float64), -1)
    log_p = torch.log_softmax(torch.randn(5, 8, generator=g, dtype=torch.float64), -1)
    eps = 1e-5
    torch.testing.assert_close(D.jsd_per_token(log_q, log_p, beta=eps) / eps, D.jsd_per_token(log_q, log_p, beta=0.0),
                               rtol=1e-3, atol=0)
    torch.testing.assert_close(D.jsd_per_token(log_q, log_p, beta=1 - eps) / eps,
                               D.jsd_per_token(log_q, log_p, beta=1.0), rtol=1e-3, atol=0)


def test_skew_alpha_zero_is_plain_kl_and_skew_is_bounded():
    s, t = make_logits(SHAPE, seed=25)
    torch.testing.assert_close(skew_forward_kl(s, t, alpha=0.0), forward_kl(s, t), rtol=0, atol=0)
    torch.testing.assert_close(skew_reverse_kl(s, t, alpha=0.0), reverse_kl(s, t), rtol=0, atol=0)
    # KL(p || a p + (1-a) q) <= -log(a) since the mixture is >= a p; skewing shrinks the divergence
    for alpha in (0.1, 0.5):
        assert torch.all(skew_forward_kl(s, t, alpha=alpha, reduction="none") <= -math.log(alpha) + 1e-6)
        assert torch.all(skew_reverse_kl(s, t, alpha=alpha, reduction="none") <= -math.log(alpha) + 1e-6)
    assert skew_forward_kl(s, t, alpha=0.1) < forward_kl(s, t)
    assert skew_reverse_kl(s, t, alpha=0.1) < reverse_kl(s, t)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_bounded_by_binary_entropy(beta):
    # beta KL(p||m) + (1-beta) KL(q||m) <= H(beta); approached for disjoint supports
    bound = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
    s, t = make_logits((40, 9), seed=26, scale=5.0)
    assert torch.all(generalized_jsd(s, t, beta=beta, reduction="none") <= bound + 1e-6)
    far_s = torch.tensor([[60.0, 0.0, 0.0]])
    far_t = torch.tensor([[0.0, 0.0, 60.0]])
    assert generalized_jsd(far_s, far_t, beta=beta).item() == pytest.approx(bound, rel=1e-4)


def test_tvd_at_most_one():
    s, t = make_logits((60, 13), seed=27, scale=6.0)
    got = tvd(s, t, reduction="none")
    assert torch.all(got <= 1.0 + 1e-6) and torch.all(got >= 0)
    far = tvd(torch.tensor([[80.0, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 80.0]])).item()
    assert 0.999 < far <= 1.0 + 1e-6
    # with a temperature the T^2-scaled value is bounded by T^2
    got_t = tvd(s, t, reduction="none", temperature=2.0)
    assert torch.all(got_t <= 4.0 + 1e-5)
    rel_close(got_t.double(), ref_divergence("tvd", s, t, 2.0))


# ----------------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "alias,canonical",
    [("fkl", "fkl"), ("forward_kl", "fkl"), ("kl", "fkl"), ("rkl", "rkl"), ("reverse_kl", "rkl"), ("jsd", "jsd"),
     ("generalized_jsd", "jsd"), ("skew_fkl", "skew_fkl"), ("skew_forward_kl", "skew_fkl"),
     ("skew_rkl", "skew_rkl"), ("skew_reverse_kl", "skew_rkl"), ("tvd", "tvd")],
)
def test_get_divergence_names_and_aliases(alias, canonical):
    div = get_divergence(alias, temperature=1.5, beta=0.3, alpha=0.2)
    assert isinstance(div, Divergence)
    assert div.name == canonical and div.temperature == 1.5
    expected_params = {"jsd": {"beta": 0.3}, "skew_fkl": {"alpha": 0.2}, "skew_rkl": {"alpha": 0.2}}.get(canonical, {})
    assert div.params == expected_params


@pytest.mark.parametrize("name,kw", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divergence_callable_matches_public_function(name, kw, dtype):
    s, t = make_logits((9, 12), seed=28)
    s, t = s.to(dtype), t.to(dtype)
    div = get_divergence(name, temperature=2.0, **kw)
    got = div(s, t)
    assert got.shape == (9,) and got.dtype == torch.float32
    torch.testing.assert_close(got, call(name, s, t, reduction="none", temperature=2.0, **kw), rtol=0, atol=0)
    rel_close(got.double(), ref_divergence(name, s, t, 2.0, **ref_kw(kw)))


def test_get_divergence_defaults():
    assert get_divergence("jsd").params == {"beta": 0.5}
    assert get_divergence("skew_fkl").params == {"alpha": 0.1}
    assert get_divergence("skew_rkl").params == {"alpha": 0.1}
    assert get_divergence("fkl").temperature == 1.0


@pytest.mark.parametrize("typo,suggestion", [("fk1", "fkl"), ("reverse-kl", "reverse_kl"), ("jds", "jsd"),
                                             ("skew_fk", "skew_fkl"), ("forwardkl", "forward_kl")])
def test_unknown_divergence_suggests_closest_name(typo, suggestion):
    with pytest.raises(ValueError, match=rf"Unknown divergence '{typo}'.*Did you mean '{suggestion}'\?"):
        get_divergence(typo)


def test_unknown_divergence_without_close_match_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown divergence 'wasserstein'; choose one of \[.*'fkl'.*'tvd'.*\]") as e:
        get_divergence("wasserstein")
    assert "Did you mean" not in str(e.value)


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("fkl", {"temperature": 0.0}, r"temperature must be > 0, got 0"),
        ("tvd", {"temperature": -1.0}, r"temperature must be > 0, got -1"),
        ("jsd", {"beta": 1.5}, r"0 <= beta <= 1, got beta=1.5"),
        ("jsd", {"beta": -0.1}, r"0 <= beta <= 1, got beta=-0.1"),
        ("skew_fkl", {"alpha": 1.0}, r"0 <= alpha < 1.*got alpha=1.0"),
        ("skew_rkl", {"alpha": -0.2}, r"0 <= alpha < 1.*got alpha=-0.2"),
    ],
)
def test_get_divergence_validates_eagerly(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_divergence(name, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Bad input to the public functions
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_mismatched_shapes(name):
    s = torch.randn(2, 3, 7)
    with pytest.raises(ValueError, match=r"student logits \(2, 3, 7\) and teacher logits \(2, 3, 8\) must have the "
                                         r"same shape.*align_vocab_size"):
        call(name, s, torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"same shape"):
        call(name, s, torch.randn(2, 4, 7))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bad_mask_shape(name, reduction):
    s, t = make_logits(SHAPE, seed=29)
    # a mask over the vocabulary dimension, or a transposed one
    for bad in (torch.ones(SHAPE, dtype=torch.bool), torch.ones(5, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match=rf"mask has shape {re_shape(bad.shape)} but the losses have shape "
                                             r"\(3, 5\)"):
            call(name, s, t, bad, reduction=reduction)


def re_shape(shape):
    return "\\(" + ", ".join(str(d) for d in shape) + "\\)"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.0, -2.0])
def test_bad_temperature(name, temperature):
    s, t = make_logits(SHAPE, seed=30)
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        call(name, s, t, temperature=temperature)


@pytest.mark.parametrize("beta", [-0.01, 1.01, 2.0])
def test_bad_beta(beta):
    s, t = make_logits(SHAPE, seed=31)
    with pytest.raises(ValueError, match=rf"generalized_jsd needs 0 <= beta <= 1, got beta={beta}"):
        generalized_jsd(s, t, beta=beta)


@pytest.mark.parametrize("fn", [skew_forward_kl, skew_reverse_kl])
@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_bad_alpha(fn, alpha):
    s, t = make_logits(SHAPE, seed=32)
    with pytest.raises(ValueError, match=rf"0 <= alpha < 1.*got alpha={alpha}"):
        fn(s, t, alpha=alpha)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reduction", ["avg", "MEAN", None])
def test_unknown_reduction(name, reduction):
    s, t = make_logits(SHAPE, seed=33)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'sum', 'none'\), got "):
        call(name, s, t, reduction=reduction)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        reduce_token_losses(torch.ones(3), reduction=reduction)
