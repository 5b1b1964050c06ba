"""Part a of scripts/gpu_check.py: the chunked engine and the dense path against a float64 reference, on the device.

Each case (every divergence of :mod:`llmkd.losses.registry`, TAID, a cached top-k teacher, Gemma-style soft-capping)
runs the engine (:func:`~llmkd.losses.chunked_distillation_loss`) and the dense path
(:func:`~llmkd.losses.dense_distillation_loss`) on N tokens of the real heads (151,936 x 896 student, 152,064 x 3,584
teacher: the teacher's head is padded, both are cut to the shared ids) in float32 and in bfloat16, and compares the
loss, the metric sums and the gradients with respect to the student's hidden states and head with the same
quantities computed in float64 on the same device from the formulas (tests/divergence_reference.py).

The reference and what it leaves out. It takes the same (rounded) inputs, computes the logits exactly and then rounds
them to the input dtype, as the projection does (its output has the input's dtype), with the gradient passed
straight through the rounding; everything after that is float64. What the engine does beyond that is float32
arithmetic (unit roundoff ``u32 = 2^-24``) and, in bfloat16 (8 bits of mantissa: ``u = 2^-8``), the rounding of the
logits' gradient ``G`` and of the returned gradients to bfloat16 (this part runs with TF32 and cuBLAS's
reduced-precision bfloat16 reductions off: :func:`gpu_check_common.set_full_precision_products`). ``u`` below is
the input dtype's unit roundoff (``2^-24`` or ``2^-8``); ``H`` the hidden size, ``V`` the vocabulary, ``N`` the
tokens.

- Values (a sum over tokens, or the loss): ``|a - e| <= u32 * (8 log2(V) * S1 + 12 sqrt(H) * S2)``, with
  ``S1 = sum_n (max_v |z_s| + max_v |z_t| + log V)``: each token's value comes out of a few row reductions over V whose
  float32 rounding is at most ``log2(V) u32`` times the size of their terms (pairwise or tree sums), eight of them
  allowed; ``S2 = sum_{n,v} |dL/dz| |z|`` over both models' logits: the float32 error of a logit computed as a
  length-H sum is about ``sqrt(H) u32 |z|`` and enters the value through ``dL/dz``; in bfloat16 the same error moves a
  logit to the neighbouring bfloat16 value (``2u |z|``) on a fraction ``~ sqrt(H) u32 / u`` of the entries, which is
  the same size again, hence 12 rather than 4.
- Gradients of the hidden states (``G @ W``, sums of ``K = V`` terms) and of the head (``G^T @ h``, ``K = N``), with
  ``G = dL/dz`` ``(N, V)`` the logits' gradient. Its float32 error (:func:`logit_gradient_errors`): every loss's ``G``
  combines the two distributions with coefficients at most ``Lambda = 2 Z + log V`` (``Z = max |z|``), computed from
  logits whose float32 error is ``~sqrt(H) Z u32``, so each entry is off by at most
  ``E_ind = 4 u32 (sqrt(H) Z |G| + (sqrt(H) Z + Lambda) P)`` (``P`` the two distributions weighted as in the loss;
  TVD adds ``2 w (q + p)`` where the sign of ``p - q`` is within that error), independently from entry to entry, and
  by ``E_coh = 8 sqrt(H) Z u32 P`` in common within a row (its normaliser). In float32 the check is elementwise
  (:func:`elementwise_bound`): ``|a - e| <= 2 u32 |e| + 4 sqrt(K) u32 |G| @ |F| + E_coh @ |F| + 8 sqrt(E_ind^2 @ F^2)``
  (the result's rounding, the product's float32 sums, and independent errors in quadrature: by Hoeffding's
  inequality beyond 8 root-sum-squares has probability below 1e-13 per entry). In bfloat16 it is norm-wise
  (:func:`normwise_bound`), because a logit whose float32 sum lies near a bfloat16 rounding boundary rounds to the
  neighbouring value (``2u |z|``, with probability ``~4 sqrt(H) u32 / u``), which can move single entries of the
  head's gradient far beyond the rest; ``||a - e||_2`` is bounded by 4 standard deviations of the sum of the
  independent roundings (of the result and of ``G`` before the products, each of variance ``u^2 / 3``, the
  flipped logits and ``E_ind``) plus the common and the float32-sum parts.

A row passes when every compared value is finite and within its bound; the table reports the largest
error / bound ratio. Measured on the CPU (vocabulary 32,768, the real hidden sizes) the ratios stayed below 0.02
in float32 and 0.1 in bfloat16, while a hidden-state gradient scaled by 1.01 (float32) or 1.1 (bfloat16; TVD, whose
gradient is a sign, about 1.15) exceeded its bound. Each
soft-capping case also checks that the cap changes the loss by more than 100 bounds, so that an ignored cap would
fail.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

import gpu_check_common as common
from gpu_check_common import log

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from divergence_reference import divergence_of_probs, kl  # noqa: E402  (the tests' divergences from the formulas)

U32 = 2.0**-24


def unit_roundoff(dtype) -> float:
    """``2^-24`` for float32, ``2^-8`` for bfloat16 (8 bits of mantissa)."""
    return {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]


@dataclass(frozen=True)
class Case:
    """One engine check. ``loss``: a divergence name or ``taid``; ``cached``: the teacher as its top-``cached``
    (a :class:`~llmkd.losses.SparseTeacher`); ``caps``: (student, teacher) soft-caps (None: no cap)."""

    name: str
    loss: str
    temperature: float = 1.0
    params: tuple = ()
    taid_t: float = 0.4
    cached: int | None = None
    caps: tuple = (None, None)
    kd_weight: float = 0.7
    ce_weight: float = 0.3


CASES = (
    Case("forward KL, T=1 (closed form)", "fkl"),
    Case("forward KL, T=2 (closed form)", "fkl", temperature=2.0),
    Case("reverse KL, T=2", "rkl", temperature=2.0),
    Case("JSD beta=0.3", "jsd", params=(("beta", 0.3),)),
    Case("skew forward KL alpha=0.2", "skew_fkl", params=(("alpha", 0.2),)),
    Case("skew reverse KL alpha=0.2", "skew_rkl", params=(("alpha", 0.2),)),
    Case("TVD", "tvd"),
    Case("TAID t=0.4 (closed form)", "taid"),
    Case("cached top-64 teacher, forward KL T=1", "fkl", cached=64),
    Case("cached top-64 teacher, forward KL T=2", "fkl", temperature=2.0, cached=64),
    Case("cached top-64 teacher, TAID t=0.4", "taid", cached=64),
    Case("Gemma soft-cap 30 on both, forward KL", "fkl", caps=(30.0, 30.0)),
    Case("Gemma soft-cap 30 on the teacher, forward KL (closed form)", "fkl", caps=(None, 30.0)),
    Case("Gemma soft-cap 30 on both, JSD", "jsd", params=(("beta", 0.5),), caps=(30.0, 30.0)),
)


def make_problem(shapes: dict, dtype, device, seed: int) -> dict:
    """Hidden states ``(N, H_s)``/``(N, H_t)``, heads ``(V_s, H_s)``/``(V_t, H_t)`` in ``dtype`` on ``device``,
    logits of standard deviation ~6 (Gemma's cap of 30 then bends the largest ones), labels ``(N,)`` with a
    quarter ignored (-100)."""
    n = shapes["engine"]["tokens"]
    h_s, h_t = shapes["student"]["hidden_size"], shapes["teacher"]["hidden_size"]
    v_s, v_t = shapes["student"]["vocab_size"], shapes["teacher"]["vocab_size"]
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*size, scale=1.0):
        return (torch.randn(*size, generator=generator, device=device) * scale).to(dtype)

    labels = torch.randint(0, v_s, (n,), generator=generator, device=device)
    labels[torch.rand(n, generator=generator, device=device) < 0.25] = -100
    return {"student_hidden": normal(n, h_s), "student_weight": normal(v_s, h_s, scale=6 / math.sqrt(h_s)),
            "teacher_hidden": normal(n, h_t), "teacher_weight": normal(v_t, h_t, scale=6 / math.sqrt(h_t)),
            "labels": labels, "vocab": min(v_s, v_t)}


def token_loss(case: Case):
    from llmkd.losses import TAIDTokenLoss, get_divergence

    if case.loss == "taid":
        return TAIDTokenLoss(case.taid_t)
    return get_divergence(case.loss, temperature=case.temperature, **dict(case.params))


def sparse_teacher(problem: dict, case: Case):
    """The teacher's top-k at the case's temperature, as the cache stores it (float32 log-probabilities)."""
    from llmkd.losses import SparseTeacher

    vocab = problem["vocab"]
    with torch.no_grad():
        z = problem["teacher_hidden"].double() @ problem["teacher_weight"][:vocab].double().T
        log_p = torch.log_softmax(z / case.temperature, dim=-1)
        top, ids = log_p.topk(case.cached, dim=-1)
        tail = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), dim=-1)
    return SparseTeacher(ids, top.float(), tail.float(), vocab, case.temperature)


def run_path(engine, problem: dict, case: Case, chunk: int | None, teacher=None):
    """``engine`` (chunked or dense) on the problem: (output, grad of hidden ``(N, H_s)``, grad of head
    ``(V_s, H_s)``)."""
    from llmkd.losses import LogitTransform

    hidden = problem["student_hidden"].detach().requires_grad_(True)
    weight = problem["student_weight"].detach().requires_grad_(True)
    teacher_weight = None if teacher is not None else problem["teacher_weight"]
    out = engine(hidden, weight, teacher if teacher is not None else problem["teacher_hidden"], teacher_weight,
                 problem["labels"], token_loss(case), kd_weight=case.kd_weight, ce_weight=case.ce_weight,
                 chunk_size=chunk, vocab_size=problem["vocab"], student_transform=LogitTransform(softcap=case.caps[0]),
                 teacher_transform=LogitTransform(softcap=case.caps[1]))
    out.loss.backward()
    return out, hidden.grad, weight.grad


def rounded_logits(hidden, weight, vocab: int, dtype):
    """Exact logits ``hidden @ weight[:vocab].T`` in float64, rounded to ``dtype`` with the gradient passed straight
    through: ``(N, V)``."""
    exact = hidden @ weight[:vocab].T
    return exact + (exact.detach().to(dtype).double() - exact.detach())


def capped(z, cap):
    return z if cap is None else cap * torch.tanh(z / cap)


def softmax(z, temperature=1.0):
    return torch.softmax(z / temperature, dim=-1)


def cross_entropy_sum(z, labels):
    """``sum over labels != -100 of -log softmax(z)[label]`` in float64."""
    valid = labels != -100
    log_q = torch.log_softmax(z[valid], dim=-1)
    return -log_q.gather(1, labels[valid].unsqueeze(1)).sum()


def bucketed(probs, ids):
    """``(n, V)`` probabilities -> ``(n, k + 1)``: the top-k ids' and the rest's mass."""
    top = probs.gather(1, ids)
    return torch.cat([top, (1.0 - top.sum(-1, keepdim=True)).clamp_min(0.0)], dim=-1)


def cached_terms(case: Case, z_s, teacher, labels):
    """Kd sum, teacher CE and the target's probabilities ``(N, V)`` of a cached teacher: top-k + one tail bucket
    (forward KL), or TAID on the teacher densified with a tail shaped like the (detached) student
    (:mod:`llmkd.losses.sparse_teacher`)."""
    log_p = torch.cat([teacher.log_probs.double(), teacher.tail_log_prob.double()[:, None]], dim=-1)
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # the cache's renormalisation
    ids, vocab, k = teacher.ids, teacher.vocab_size, teacher.k
    valid = labels != -100
    hit = teacher.ids == labels.clamp_min(0)[:, None]
    label_log_p = torch.where(hit.any(-1), log_p[:, :k].masked_fill(~hit, float("-inf")).amax(-1),
                              log_p[:, k] - math.log(vocab - k))
    teacher_ce = -label_log_p[valid].sum()
    q = softmax(z_s.detach(), case.temperature)
    tail_q = (1.0 - q.gather(1, ids).sum(-1, keepdim=True))
    dense = (log_p[:, k:] + q.log() - tail_q.log()).scatter(1, ids, log_p[:, :k])  # log p~: (n, V)
    if case.loss != "taid":
        kd = case.temperature**2 * kl(log_p.exp(), bucketed(softmax(z_s, case.temperature), ids)).sum()
        return kd, teacher_ce, dense.exp()
    target = softmax((1 - case.taid_t) * z_s.detach() + case.taid_t * dense)
    return kl(target, softmax(z_s)).sum(), teacher_ce, target


def kd_terms(case: Case, zs, zt, teacher, labels):
    """The reference kd sum (with gradient), the teacher's CE and the target's probabilities ``(N, V)`` at the
    case's temperature (the teacher's, TAID's interpolation, or the densified cache)."""
    if teacher is not None:
        return cached_terms(case, zs, teacher, labels)
    if case.loss == "taid":
        target = softmax((1 - case.taid_t) * zs.detach() + case.taid_t * zt)
        return kl(target, softmax(zs)).sum(), cross_entropy_sum(zt, labels), target.detach()
    p, q = softmax(zt, case.temperature), softmax(zs, case.temperature)
    kd = case.temperature**2 * divergence_of_probs(case.loss, p, q, **dict(case.params)).sum()
    return kd, cross_entropy_sum(zt, labels), p.detach()


def value_bounds(values: dict, z_s, z_t, case: Case, hidden: int) -> dict:
    """The value bounds of the module docstring: ``u32 (8 log2(V) S1 + 12 sqrt(H) S2)`` per quantity."""
    n_tokens, vocab = z_s.shape
    s1 = (z_s.detach().abs().amax(-1) + z_t.detach().abs().amax(-1) + math.log(vocab)).sum().item()
    factor = case.temperature**2  # the KD term's T^2
    scales = {"loss": (case.kd_weight * factor + case.ce_weight) / n_tokens, "kd_sum": factor, "ce_sum": 1.0,
              "teacher_ce_sum": 1.0}
    inputs = [z_s] + ([z_t] if z_t.requires_grad else [])
    bounds = {}
    for name, value in values.items():
        grads = torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True) if value.requires_grad \
            else [None] * len(inputs)
        s2 = sum((g.abs() * x.detach().abs()).sum().item() for g, x in zip(grads, inputs) if g is not None)
        bounds[name] = U32 * (8 * math.log2(vocab) * s1 * scales[name] + 12 * math.sqrt(hidden) * s2)
    return bounds


def logit_gradient_errors(case: Case, zs, g, target, dtype, hidden: int, z_max: float):
    """``(E_ind, E_coh)``, both ``(N, V)``: how far the float32 logits' gradient ``G`` can be from the exact one, in a
    part independent from entry to entry and a part common to a row. Every loss's ``G`` is a combination of the two
    distributions (and their mixtures) with coefficients at most ``Lambda = 2 Z + log V`` (log-ratios,
    log-normalisers), computed in float32 from logits whose float32 error is ``~sqrt(H) Z u32``:
    ``E_ind = 4 u32 (sqrt(H) Z |G| + (sqrt(H) Z + Lambda) P)`` and ``E_coh = 8 sqrt(H) Z u32 P``, with
    ``P = w_kd (q_T + p_T) + w_ce q_1`` the distributions weighted as in the loss. TVD's gradient is a sign of
    ``p - q``: where ``|p - q|`` is within the logits' error the sign is undecided and the entry may move by
    ``2 w_kd (q + p)``."""
    n_tokens, vocab = zs.shape
    lam = 2 * z_max + math.log(vocab)
    logit_error = math.sqrt(hidden) * z_max * U32
    weighted = loss_weighted_probs(case, zs, target)
    independent = 4 * (logit_error * g + (logit_error + lam * U32) * weighted)
    if case.loss == "tvd":
        q_t, w_kd = softmax(zs.detach(), case.temperature), case.kd_weight * case.temperature / n_tokens
        undecided = ((target - q_t).abs() <= 8 * logit_error * (target + q_t)).double()
        independent = independent + 2 * w_kd * (
            (q_t + target) * undecided + q_t * (q_t * undecided).sum(-1, keepdim=True))
    return independent, 8 * logit_error * weighted


def loss_weighted_probs(case: Case, zs, target):
    """``P = w_kd (q_T + p_T) + w_ce q_1`` ``(N, V)``, ``w_kd = kd_weight T / N``, ``w_ce = ce_weight / N``: the size
    of the logits' gradient each entry can take."""
    n_tokens = zs.shape[0]
    w_kd, w_ce = case.kd_weight * case.temperature / n_tokens, case.ce_weight / n_tokens
    return w_kd * (softmax(zs.detach(), case.temperature) + target) + w_ce * softmax(zs.detach())


def elementwise_bound(grad, g, errors, factor, inner: int):
    """Float32: the elementwise bound of a gradient ``G @ F`` (``F`` the head ``(V, H)`` for the hidden states; the
    hidden states ``(N, H)`` with ``G^T`` for the head): ``2 u32 |e|`` (rounding of the result, twice for the head's
    float32 accumulation), ``4 sqrt(K) u32 |G| @ |F|`` (the product's float32 sums of K terms), ``E_coh @ |F|`` and
    ``8 sqrt(E_ind^2 @ F^2)``: independent errors add in quadrature (Hoeffding: exceeding 8 times the root sum of
    squares has probability below 1e-13)."""
    independent, coherent = errors
    magnitude = factor.abs()
    return (2 * U32 * grad.abs() + 4 * math.sqrt(inner) * U32 * (g @ magnitude) + coherent @ magnitude
            + 8 * (independent.square() @ factor.square()).sqrt())


def normwise_bound(grad, g, errors, flips, factor, inner: int) -> float:
    """Bfloat16: a bound on ``||a - e||_2`` of a gradient ``G @ F`` (see :func:`elementwise_bound`). Rounding to
    bfloat16 is a uniform error of variance at most ``u^2 / 3`` per rounded number: the result (twice, ``2 u^2 / 3
    ||e||^2``) and each ``G`` entry before the product (``u^2 / 3 sum G^2 ||F_v||^2``). A logit whose float32 sum lies
    near a bfloat16 rounding boundary rounds to the neighbouring value (``2 u |z|``) with probability
    ``f = 4 sqrt(H) u32 / u``, moving ``G`` by up to ``b = 2 u (|z_s| + |z_t|) P``: variance ``f b^2``. With the
    float32 errors of :func:`logit_gradient_errors` (``E_ind^2``), the sum of these many independent contributions
    stays below 4 standard deviations; the common part ``E_coh`` and the product's float32 sums add linearly.
    Unlike the float32 check this is norm-wise: one flipped logit can move single entries far more than the rest."""
    u = unit_roundoff(torch.bfloat16)
    independent, coherent = errors
    flip_probability, flip_size = flips
    row_norms = factor.square().sum(-1)  # ||F_v||^2, (K_out,) rows of the factor
    variance = (2 * u**2 / 3 * grad.square().sum() + ((u**2 / 3 * g.square() + independent.square()
                                                       + flip_probability * flip_size.square()) @ row_norms).sum())
    linear = (coherent @ factor.abs()).norm() + 4 * math.sqrt(inner) * U32 * (g @ factor.abs()).norm()
    return (4 * variance.sqrt() + linear).item()


def gradient_bounds(h_s, w_s, g, errors, dtype, flips, vocab: int) -> dict:
    """The bounds of the hidden states' and the head's gradients: elementwise tensors in float32, norm-wise
    ``{"norm": bound}`` in bfloat16 (the head's rows beyond the shared ids must get exactly no gradient)."""
    head, hidden_states = w_s.detach()[:vocab], h_s.detach()
    transposed = [e.T for e in errors]
    if dtype == torch.float32:
        head_bound = elementwise_bound(w_s.grad[:vocab], g.T, transposed, hidden_states, h_s.shape[0])
        return {"grad_hidden": elementwise_bound(h_s.grad, g, errors, head, vocab),
                "grad_weight": torch.nn.functional.pad(head_bound, (0, 0, 0, w_s.shape[0] - vocab))}
    probability, size = flips
    return {"grad_hidden": {"norm": normwise_bound(h_s.grad, g, errors, flips, head, vocab)},
            "grad_weight": {"norm": normwise_bound(w_s.grad[:vocab], g.T, transposed, (probability, size.T),
                                                   hidden_states, h_s.shape[0]),
                            "zero_beyond": vocab}}


def reference(problem: dict, case: Case, dtype, teacher=None) -> dict:
    """Float64 values, gradients and the bound tensors of the module docstring."""
    vocab, labels = problem["vocab"], problem["labels"]
    h_s = problem["student_hidden"].double().requires_grad_(True)
    w_s = problem["student_weight"].double().requires_grad_(True)
    z_s = rounded_logits(h_s, w_s, vocab, dtype)
    zs = capped(z_s, case.caps[0])
    z_t = rounded_logits(problem["teacher_hidden"].double(), problem["teacher_weight"].double(), vocab, dtype)
    z_t = z_t.detach().requires_grad_(teacher is None)
    zt = capped(z_t, case.caps[1])
    kd, teacher_ce, target = kd_terms(case, zs, zt, teacher, labels)
    ce = cross_entropy_sum(zs, labels)
    loss = (case.kd_weight * kd + case.ce_weight * ce) / labels.numel()
    values = {"loss": loss, "kd_sum": kd, "ce_sum": ce, "teacher_ce_sum": teacher_ce}
    hidden = h_s.shape[1]
    bounds = value_bounds(values, z_s, z_t, case, hidden)

    g = torch.autograd.grad(loss, z_s, retain_graph=True)[0].abs()  # |dL/dz| at the head's output, (N, V)
    loss.backward()
    z_max = max(z_s.detach().abs().max().item(), z_t.detach().abs().max().item())
    errors = logit_gradient_errors(case, zs, g, target, dtype, hidden, z_max)
    widest = max(hidden, problem["teacher_hidden"].shape[1])
    u = unit_roundoff(dtype)
    flips = (min(1.0, 4 * math.sqrt(widest) * U32 / u),
             2 * u * (z_s.detach().abs() + z_t.detach().abs()) * loss_weighted_probs(case, zs, target))
    values.update(grad_hidden=h_s.grad, grad_weight=w_s.grad)
    bounds.update(gradient_bounds(h_s, w_s, g, errors, dtype, flips, vocab))
    return {"values": values, "bounds": bounds}


def within(actual, expected, bound) -> tuple[float, bool]:
    """(error / bound, whether ``actual`` is finite and within the bound). ``bound``: a number or a tensor of
    ``expected``'s shape (elementwise: the largest ratio), or ``{"norm": b}`` (``||actual - expected||_2 / b``; with
    ``"zero_beyond": r``, rows from r on must be exactly 0)."""
    actual = torch.as_tensor(actual).double().to(torch.as_tensor(expected).device)
    expected = torch.as_tensor(expected).double()
    finite = bool(torch.isfinite(actual).all())
    if isinstance(bound, dict):
        rows = bound.get("zero_beyond", actual.shape[0] if actual.dim() else None)
        ratio = (actual[:rows] - expected[:rows]).norm().item() / max(bound["norm"], 1e-300)
        if actual.dim() and bool((actual[rows:] != 0).any()):
            ratio = math.inf
    else:
        bound = torch.as_tensor(bound, dtype=torch.float64, device=expected.device)
        error = (actual - expected).abs()
        ratio = (error / bound.clamp_min(1e-300)).max().item() if error.numel() else 0.0
    return (ratio if finite else math.inf), finite and ratio <= 1.0


def compare(out, grad_hidden, grad_weight, ref: dict, fault: float = 1.0) -> dict:
    """Per quantity ``(error / bound, passed)`` of one path against the reference; ``fault`` scales the hidden
    gradient (fault injection for the test of the failure exit)."""
    actual = {"loss": out.loss.detach(), "kd_sum": out.kd_sum, "ce_sum": out.ce_sum,
              "teacher_ce_sum": out.teacher_ce_sum, "grad_hidden": grad_hidden * fault, "grad_weight": grad_weight}
    return {name: within(actual[name], ref["values"][name].detach(), ref["bounds"][name]) for name in actual}


def summary_row(case: Case, dtype, path: str, results: dict) -> dict:
    worst = max(results, key=lambda name: results[name][0])
    return {"check": case.name, "dtype": str(dtype).replace("torch.", ""), "path": path,
            "passed": all(passed for _, passed in results.values()), "worst": worst,
            "ratio": results[worst][0], "ratios": {name: ratio for name, (ratio, _) in results.items()}}


def cap_matters_row(case: Case, dtype, problem: dict, ref: dict, teacher) -> dict:
    """Soft-capping must move the loss by more than 100 of its bounds (else an ignored cap would pass): the row's
    ratio is 100 bounds / the cap's effect on the loss, <= 1 passes like every other row."""
    uncapped = reference(problem, Case(case.name, case.loss, case.temperature, case.params), dtype, teacher)
    shift = abs(uncapped["values"]["loss"].item() - ref["values"]["loss"].item()) / ref["bounds"]["loss"]
    ratio = 100 / shift if shift > 0 else math.inf
    return {"check": f"{case.name}: the cap changes the loss", "dtype": str(dtype).replace("torch.", ""),
            "path": "reference", "passed": ratio <= 1, "worst": "100 bounds / cap effect", "ratio": ratio,
            "ratios": {"cap": ratio}}


def case_rows(case: Case, index: int, problem: dict, dtype, chunk: int | None, inject_fault: bool) -> list[dict]:
    """One case's rows: the chunked and the dense path against the reference (and whether the cap matters)."""
    from llmkd.losses import chunked_distillation_loss, dense_distillation_loss

    teacher = sparse_teacher(problem, case) if case.cached else None
    ref = reference(problem, case, dtype, teacher)
    rows = []
    for path, engine in (("chunked", chunked_distillation_loss), ("dense", dense_distillation_loss)):
        fault = 1.25 if inject_fault and index == 0 and path == "chunked" else 1.0
        out, grad_hidden, grad_weight = run_path(engine, problem, case, chunk, teacher)
        rows.append(summary_row(case, dtype, path, compare(out, grad_hidden, grad_weight, ref, fault)))
    if case.caps != (None, None):
        rows.append(cap_matters_row(case, dtype, problem, ref, teacher))
    return rows


def engine_rows(shapes: dict, device, inject_fault: bool):
    """Every case in float32 and bfloat16, the chunked and the dense path: yields one summary row each (a case
    that raises gives failed rows, and the others still run)."""
    import traceback

    for dtype in (torch.float32, torch.bfloat16):
        problem = make_problem(shapes, dtype, device, seed=0)
        for index, case in enumerate(CASES):
            try:
                rows = case_rows(case, index, problem, dtype, shapes["engine"]["chunk"], inject_fault)
            except Exception as error:  # noqa: BLE001 - reported as failed rows
                traceback.print_exc()
                rows = [{"check": case.name, "dtype": str(dtype).replace("torch.", ""), "path": path,
                         "passed": False, "worst": "error", "ratio": math.inf, "ratios": {},
                         "error": f"{type(error).__name__}: {error}"[:300]} for path in ("chunked", "dense")]
            log(f"{case.name} [{dtype}]: " + ", ".join(
                f"{row['path']} {row['ratio']:.3g} ({row['worst']})" for row in rows))
            yield from rows
            common.release_memory(device)
