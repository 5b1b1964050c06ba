"""The chunked engine's closed-form path (llmkd.losses.fused) against its autograd path and a float64 reference.

Forward KL and TAID describe themselves with ``fused_kl()``; the engine then computes values and gradients by hand.
Wrapping the same token loss in a plain function hides that description and sends the engine through autograd: the
two must agree in loss, metrics and every gradient, for every mixture of KD, CE, ignored labels, temperatures,
biases, a block loss (SinKD's Sinkhorn term) and low precision. The naive reference is written from the formula.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_chunked_engine import V, make_problem, ref_softmax, rel_close, run_engine
from torch.utils._python_dispatch import TorchDispatchMode

import llmkd.losses.sparse_teacher as sparse_teacher_module
import llmkd.losses.targets as teacher_targets
from llmkd.losses import SinkhornTerm, TAIDTokenLoss, chunked_distillation_loss, get_divergence
from llmkd.losses.fused import FusedKL

pytestmark = pytest.mark.usefixtures("single_thread")


class autograd_only:  # noqa: N801 - used like the function it replaced
    """The same token loss without its ``fused_kl`` description: the engine must use autograd. Its temperature
    (the one a cached teacher's tail is shaped at) is kept."""

    def __init__(self, token_loss):
        self.token_loss = token_loss
        if hasattr(token_loss, "temperature"):
            self.temperature = token_loss.temperature

    def __call__(self, student_logits, teacher_logits):
        return self.token_loss(student_logits, teacher_logits)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the chunks the closed-form path computes."""
    calls = []

    def spy_on(real):
        def spy(*args, **kwargs):
            calls.append(args[0].shape[0])
            return real(*args, **kwargs)
        return spy

    for module, name in ((teacher_targets, "fused_kl_ce_chunk"), (sparse_teacher_module, "fused_kl_ce_chunk"),
                         (sparse_teacher_module, "fused_sparse_kl_ce_chunk")):
        monkeypatch.setattr(module, name, spy_on(getattr(module, name)))
    return calls


def both_paths(prob, token_loss, **kw):
    fused_out, fused_grads = run_engine(chunked_distillation_loss, prob, token_loss, **kw)
    fused_grads = [None if g is None else g.clone() for g in fused_grads]
    plain_out, plain_grads = run_engine(chunked_distillation_loss, prob, autograd_only(token_loss), **kw)
    return (fused_out, fused_grads), (plain_out, plain_grads)


def closed_form_kl_atol(prob) -> float:
    """Float32 rounding bound of the closed-form KL sum ``sum_n <p, y> - lse(y) - <p, z> + lse(z)``: each of the four
    terms is at most ``max|logit| + log V`` in size and is rounded with relative error ~``u`` (2^-24) a few times, so
    ``|error| <= 8 u sum_n (max|y| + max|z| + log V)``. Where the KL itself is ~0 (TAID at t = 0, whose autograd path
    returns exactly 0) this absolute floor, not a relative tolerance, is what any machine can promise."""
    with torch.no_grad():
        z = prob["student_hidden"] @ prob["student_weight"].T + prob["student_bias"]
        y = prob["teacher_hidden"] @ prob["teacher_weight"].T + prob["teacher_bias"]
    n, vocab = z.shape
    return 8 * 2.0**-24 * n * (y.abs().max().item() + z.abs().max().item() + math.log(vocab))


def assert_same(fused, plain, rtol=2e-5, atol_scale=2e-6, kd_atol=0.0):
    (fused_out, fused_grads), (plain_out, plain_grads) = fused, plain
    for field in ("loss", "kd_sum", "ce_sum", "teacher_ce_sum", "block_sum"):
        actual, expected = getattr(fused_out, field).detach(), getattr(plain_out, field).detach()
        if field in ("loss", "kd_sum") and kd_atol:
            torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=kd_atol)
        else:
            rel_close(actual, expected, rtol=rtol)
    for got, expected in zip(fused_grads, plain_grads):
        assert (got is None) == (expected is None)
        if got is None:
            continue
        # an absolute floor too: where the true gradient is 0 (TAID at t = 0), autograd leaves float32 round-off
        atol = max(atol_scale * expected.abs().max().item(), 1e-7)
        torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol)


TOKEN_LOSSES = {
    "fkl_t1": lambda: get_divergence("fkl"),
    "fkl_t2": lambda: get_divergence("fkl", temperature=2.0),
    "fkl_t0.5_no_t2": lambda: get_divergence("fkl", temperature=0.5, scale_by_t2=False),
    "taid_0": lambda: TAIDTokenLoss(0.0),
    "taid_0.4": lambda: TAIDTokenLoss(0.4),
    "taid_1": lambda: TAIDTokenLoss(1.0),
}


@pytest.mark.parametrize("ignore_frac", [0.0, 0.3])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.5, 0.5), (0.0, 1.0), (0.7, 1.3)])
@pytest.mark.parametrize("loss_name", sorted(TOKEN_LOSSES))
def test_fused_path_equals_autograd_path(loss_name, weights, ignore_frac, fused_calls):
    prob = make_problem(seed=3, ignore_frac=ignore_frac)
    if ignore_frac == 0.0:
        prob["labels"][0] = 5  # make_problem always ignores row 0
    kd_weight, ce_weight = weights
    fused, plain = both_paths(prob, TOKEN_LOSSES[loss_name](), kd_weight=kd_weight, ce_weight=ce_weight,
                              chunk_size=10)
    assert fused_calls == [10, 10, 10, 7], "the closed-form path was not taken for every chunk"
    # kd_sum is unweighted; the loss holds kd_weight * kd_sum / tokens: max(1, kd_weight) * the sum's bound covers both
    assert_same(fused, plain, kd_atol=max(1.0, kd_weight) * closed_form_kl_atol(prob))


@pytest.mark.parametrize("loss_name", ["fkl_t1", "fkl_t2", "taid_0.4"])
def test_without_labels_and_without_bias(loss_name, fused_calls):
    prob = make_problem(seed=4)
    prob["labels"] = None
    fused, plain = both_paths(prob, TOKEN_LOSSES[loss_name](), kd_weight=1.0, ce_weight=0.0, use_bias=False,
                              chunk_size=16)
    assert len(fused_calls) == 3
    assert_same(fused, plain)
    assert float(fused[0].ce_sum) == 0.0 and float(fused[0].teacher_ce_sum) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_values_and_gradients_match_the_formula(temperature):
    """Float64 reference from the definition: T^2 sum_v p log(p / q) and c * CE, differentiated by autograd."""
    prob = make_problem(seed=5, ignore_frac=0.3)
    kd_weight, ce_weight = 0.6, 0.4
    out, grads = run_engine(chunked_distillation_loss, prob, get_divergence("fkl", temperature=temperature),
                            kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=8)

    hs, ws, bs = (prob[k].detach().double().requires_grad_(True)
                  for k in ("student_hidden", "student_weight", "student_bias"))
    zs = hs @ ws.T + bs
    zt = prob["teacher_hidden"].double() @ prob["teacher_weight"].double().T + prob["teacher_bias"].double()
    p, q = ref_softmax(zt, temperature), ref_softmax(zs, temperature)
    kd = temperature**2 * (p * (p.log() - q.log())).sum()
    valid = prob["labels"] != -100
    rows = torch.arange(len(valid))[valid]
    ce = -ref_softmax(zs)[rows, prob["labels"][valid]].log().sum()
    teacher_ce = -ref_softmax(zt)[rows, prob["labels"][valid]].log().sum()
    loss = (kd_weight * kd + ce_weight * ce) / len(valid)
    expected_grads = torch.autograd.grad(loss, (hs, ws, bs))

    rel_close(out.loss.detach(), loss.detach())
    rel_close(out.kd_sum, kd.detach())
    rel_close(out.ce_sum, ce.detach())
    rel_close(out.teacher_ce_sum, teacher_ce)
    for got, expected in zip(grads, expected_grads):
        rel_close(got, expected, atol_scale=2e-6)


def test_masked_teacher_vocabulary_entries_are_zero_probability():
    """-inf teacher logits (a masked vocabulary entry): p = 0 there, the loss and gradients stay finite and equal
    the autograd path's (which treats 0 * log 0 as 0)."""
    prob = make_problem(seed=6)
    prob["teacher_bias"][V - 5:] = float("-inf")
    prob["labels"][prob["labels"] >= V - 5] = -100
    fused, plain = both_paths(prob, get_divergence("fkl"), kd_weight=1.0, ce_weight=0.5, chunk_size=9)
    assert torch.isfinite(fused[0].loss)
    assert all(torch.isfinite(g).all() for g in fused[1])
    assert_same(fused, plain)


@pytest.mark.parametrize("detach_plan", [True, False])
def test_block_loss_gradient_is_added(detach_plan, fused_calls):
    """SinKD: the Sinkhorn term of each block goes through autograd, KD and CE through the closed form."""
    prob = make_problem(seed=7, n=24)
    sinkhorn = SinkhornTerm(temperature=2.0, epsilon=0.1, iterations=10, scale=1.0, detach_plan=detach_plan)
    bounds = [(0, 10), (10, 24)]
    fused, plain = both_paths(prob, get_divergence("fkl", temperature=2.0, scale_by_t2=False), kd_weight=0.9,
                              ce_weight=0.1, block_loss=sinkhorn, block_weight=0.8, chunk_bounds=bounds)
    assert fused_calls == [10, 14]
    assert float(fused[0].block_sum) > 0
    assert_same(fused, plain)


def test_bfloat16_head(fused_calls):
    prob = make_problem(seed=8)
    for key in ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
                "teacher_bias"):
        prob[key] = prob[key].detach().to(torch.bfloat16).requires_grad_(prob[key].requires_grad)
    fused, plain = both_paths(prob, get_divergence("fkl"), kd_weight=0.5, ce_weight=0.5, chunk_size=16)
    assert fused_calls and fused[1][0].dtype == torch.bfloat16 and fused[1][1].dtype == torch.bfloat16
    assert_same(fused, plain, rtol=2e-2, atol_scale=2e-2)  # bfloat16 has 8 bits of mantissa


def test_other_divergences_and_transforms_take_the_autograd_path(fused_calls):
    prob = make_problem(seed=9)
    run_engine(chunked_distillation_loss, prob, get_divergence("rkl"), chunk_size=16)
    assert get_divergence("jsd").fused_kl() is None and get_divergence("tvd").fused_kl() is None
    from llmkd.losses import LogitTransform
    run_engine(chunked_distillation_loss, prob, get_divergence("fkl"), chunk_size=16,
               student_transform=LogitTransform(softcap=5.0))
    assert fused_calls == []
    assert get_divergence("fkl", temperature=3.0).fused_kl() == FusedKL(3.0, 9.0, 1.0)
    assert TAIDTokenLoss(0.25).fused_kl() == FusedKL(1.0, 1.0, 0.25)


class VocabWideAllocations(TorchDispatchMode):
    """Counts the fresh tensors (not views, not in-place results) with V columns that aten ops allocate."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == V and t._base is None
                    and not any(t.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in inputs)):
                self.count += 1
        return out


def test_chunks_reuse_their_buffers():
    """No allocation churn: the number of (rows, V) allocations does not grow with the number of chunks."""
    counts = {}
    for chunk_size in (32, 8, 4):
        prob = make_problem(n=64, seed=10)
        with VocabWideAllocations() as mode:
            run_engine(chunked_distillation_loss, prob, get_divergence("fkl", temperature=2.0), kd_weight=0.5,
                       ce_weight=0.5, chunk_size=chunk_size)
        counts[math.ceil(64 / chunk_size)] = mode.count
    assert counts[2] > 0
    assert counts[2] == counts[8] == counts[16], counts


# ----------------------------------------------------------------------------------------------------------------
# A cached top-k teacher (SparseTeacher)
# ----------------------------------------------------------------------------------------------------------------
def sparse_teacher(prob, k, temperature, quantize=False):
    """The top-k teacher of the problem's teacher logits at ``temperature`` (as the cache writes it)."""
    from llmkd.losses import SparseTeacher

    zt = prob["teacher_hidden"] @ prob["teacher_weight"].T + prob["teacher_bias"]
    log_p = torch.log_softmax(zt / temperature, dim=-1)
    top, ids = log_p.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7)) if k < V else torch.full((len(zt),), float("-inf"))
    if quantize:  # an 8-bit-like cache: values off by a little, mass no longer exactly 1
        top = (top * 16).round() / 16
    return SparseTeacher(ids, top, tail, V, temperature)


def run_cached(prob, teacher, token_loss, **kw):
    for key in ("student_hidden", "student_weight", "student_bias"):
        prob[key].grad = None
    out = chunked_distillation_loss(prob["student_hidden"], prob["student_weight"], teacher, None, prob["labels"],
                                    token_loss, student_bias=prob["student_bias"], **kw)
    out.loss.backward()
    return out, [prob[k].grad.clone() for k in ("student_hidden", "student_weight", "student_bias")]


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("k", [5, V])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.5, 0.5), (0.7, 1.3)])
def test_cached_teacher_fused_path_equals_autograd_path(weights, temperature, k, quantize, fused_calls):
    prob = make_problem(seed=11, ignore_frac=0.3)
    teacher = sparse_teacher(prob, k, temperature, quantize)
    kd = get_divergence("fkl", temperature=temperature)
    kd_weight, ce_weight = weights
    fused = run_cached(prob, teacher, kd, kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=10)
    assert len(fused_calls) == 4
    plain = run_cached(prob, teacher, autograd_only(kd), kd_weight=kd_weight, ce_weight=ce_weight, chunk_size=10)
    assert len(fused_calls) == 4
    assert_same(fused, plain)


def test_cached_teacher_value_is_the_top_k_plus_tail_bucket_formula():
    prob = make_problem(seed=12)
    teacher = sparse_teacher(prob, 6, 2.0)
    out, _ = run_cached(prob, teacher, get_divergence("fkl", temperature=2.0), kd_weight=1.0, chunk_size=8)
    zs = prob["student_hidden"] @ prob["student_weight"].T + prob["student_bias"]
    expected = 4.0 * teacher.forward_kl(zs.detach(), 2.0).sum()  # T^2 * the explicit bucket formula
    rel_close(out.kd_sum, expected, rtol=1e-5)


@pytest.mark.parametrize("k", [6, V])
def test_taid_with_a_cached_teacher_equals_its_autograd_path(k, fused_calls):
    prob = make_problem(seed=13, ignore_frac=0.3)
    teacher = sparse_teacher(prob, k, 1.0)
    fused = run_cached(prob, teacher, TAIDTokenLoss(0.5), kd_weight=0.6, ce_weight=0.4, chunk_size=8)
    assert len(fused_calls) == 5
    plain = run_cached(prob, teacher, autograd_only(TAIDTokenLoss(0.5)), kd_weight=0.6, ce_weight=0.4, chunk_size=8)
    assert len(fused_calls) == 5
    assert_same(fused, plain)
