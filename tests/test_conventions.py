"""llmkd's loss conventions next to TRL's and Liger-Kernel's: one test (or a pair) per row of docs/CONVENTIONS.md.

Every test runs the other library's own function on the same random inputs as llmkd's and checks the setting or
the multiplier that the table states makes the numbers equal: values, and gradients where the loss has a student.

- TRL (a dependency of llmkd): ``GKDTrainer.generalized_jsd_loss`` (logits in; it is the loss of
  ``trl.experimental.gkd.GKDTrainer``), run in float64 as the reference, and
  ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (hidden states and output heads in; the loss of
  ``DistillationTrainer``; float32 internally).
- Liger-Kernel (the ``liger`` extra; skipped with its reason when absent): ``LigerFusedLinearJSDLoss`` from
  ``liger_kernel.chunked_loss``, which runs on CPU without triton. ``compiled=False``: torch.compile on CPU adds a
  C++ build and changes nothing in the math.

llmkd computes in float32 whatever the input dtype, so its values are compared with a float64 reference within the
a-priori bound of :func:`float32_tolerance` (and with another float32 implementation within twice that bound).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import; the API is pinned by trl

import pytest
import torch
import torch.nn.functional as F
from trl.experimental.gkd.gkd_trainer import GKDTrainer
from trl.trainer.distillation_trainer import _chunked_divergence_loss

from llmkd.losses import (
    chunked_distillation_loss,
    dense_distillation_loss,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
)

pytestmark = pytest.mark.usefixtures("single_thread")

trl_jsd = GKDTrainer.generalized_jsd_loss
UNIT_ROUNDOFF = 2.0**-24  # float32
B, S, V, H_S, H_T = 3, 5, 11, 8, 6  # batch, sequence, vocabulary, student and teacher hidden sizes


# ----------------------------------------------------------------------------------------------------------------
# Tolerances
# ----------------------------------------------------------------------------------------------------------------
def float32_tolerance(magnitude: float, chain: int) -> float:
    """An a-priori bound on the float32 error of a loss value (or gradient entry) computed here.

    Every float32 operation rounds with relative error at most u = 2^-24, and a sum of n terms has absolute error at
    most gamma_n * sum |terms|, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms,
    section 4.2). ``chain`` is the longest chain of accumulations behind the value (a head's dot product over the
    hidden size, a softmax normaliser and a KL sum over the vocabulary, a sum over tokens); ``magnitude`` bounds the
    sum of the absolute values of its terms (see :func:`kl_magnitude`). The factor 4 covers the independent rows
    that enter one value: the student's and the teacher's log-softmax, the JSD's mixture, the CE.
    """
    n_u = chain * UNIT_ROUNDOFF
    return 4.0 * n_u / (1.0 - n_u) * magnitude


def kl_magnitude(max_abs_logit: float, temperature: float, vocab: int = V) -> float:
    """Bound on sum_v a_v |log a_v - log b_v| for one token: both log-softmaxes of logits within [-M, M] lie in
    [-(2M/T + log V), 0], so every log-ratio, and any average of them, is at most ``2M/T + log V`` (the gradient
    entries of one token are bounded by the same quantity, for T >= 1)."""
    return 2.0 * max_abs_logit / temperature + math.log(vocab)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    actual, expected = actual.detach().double(), expected.detach().double()
    error = (actual - expected).abs().max().item()
    assert error <= tolerance, f"{what}: max |difference| {error:.3e} exceeds the float32 bound {tolerance:.3e}"


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------
def make_logits(seed: int = 0):
    """Student and teacher logits ``(B, S, V)`` (float32, spread like a trained LM's: std 3) and labels ``(B, S)`` with
    -100 at four positions (a prompt, a padded end)."""
    gen = torch.Generator().manual_seed(seed)
    student = 3.0 * torch.randn(B, S, V, generator=gen)
    teacher = 3.0 * torch.randn(B, S, V, generator=gen)
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :2] = -100
    labels[2, 3:] = -100
    return student, teacher, labels


def make_heads(seed: int = 1, teacher_vocab: int = V):
    """Hidden states of B*S tokens and output heads: student ``(N, H_S)`` / ``(V, H_S)``, teacher ``(N, H_T)`` /
    ``(teacher_vocab, H_T)``; labels ``(N,)`` with -100 at four positions."""
    gen = torch.Generator().manual_seed(seed)
    n = B * S
    student_hidden = torch.randn(n, H_S, generator=gen)
    student_weight = torch.randn(V, H_S, generator=gen)
    teacher_hidden = torch.randn(n, H_T, generator=gen)
    teacher_weight = torch.randn(teacher_vocab, H_T, generator=gen)
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[[0, 1, 7, 14]] = -100
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term float32 sum or dot product."""
    return n * UNIT_ROUNDOFF / (1.0 - n * UNIT_ROUNDOFF)


def fused_tolerance(hs, ws, ht, wt, temperature: float, tokens: int, vocab: int = V) -> float:
    """The float32 error bound of a per-token-mean divergence computed from hidden states and heads, for comparing
    two float32 implementations (hence the factor 2: each may be off by the bound, in opposite directions).

    On top of :func:`float32_tolerance` of the divergence itself, each logit carries the rounding of its dot product,
    at most ``gamma_H * sum_i |h_i| |w_i|``; a perturbation d of the student's logits moves a KL-type value by at most
    ``2 d / T`` (its gradient ``(q - p) / T`` has l1 norm <= 2 / T), one of the teacher's by at most ``2 L d / T``
    (gradient ``p (log p - log q - KL) / T``, with L = :func:`kl_magnitude`).
    """
    student_logits, teacher_logits = hs @ ws.T, ht @ wt[:vocab].T
    magnitude = kl_magnitude(student_logits.abs().max().item() + teacher_logits.abs().max().item(), temperature,
                             vocab)
    student_rounding = gamma(hs.shape[-1]) * (hs.abs() @ ws.abs().T).max().item()
    teacher_rounding = gamma(ht.shape[-1]) * (ht.abs() @ wt.abs().T).max().item()
    rounding = (2.0 * student_rounding + 2.0 * magnitude * teacher_rounding) / temperature
    return 2.0 * (float32_tolerance(magnitude, 2 * vocab + tokens) + rounding)


def head_grad_tolerance(value_tolerance: float, hs, ws, tokens: int) -> float:
    """Bound on the gradients for the student's hidden states and head, from the bound on the value: the gradient
    for the logits of one token is off by at most ``value_tolerance / N`` per entry (the loss is a mean over N tokens);
    ``grad_h = G W`` sums V such entries times |W| and ``grad_W = G^T h`` sums N of them times |h|; the factor 2
    covers the rounding of those two products (gamma_V, gamma_N are far below 1)."""
    per_logit = value_tolerance / tokens
    return 2.0 * per_logit * max(ws.shape[0] * ws.abs().max().item(), tokens * hs.abs().max().item())


def leaf(tensor: torch.Tensor, dtype=None) -> torch.Tensor:
    return tensor.detach().clone().to(dtype or tensor.dtype).requires_grad_(True)


def grad_of(loss_fn, *inputs):
    """(value, gradients of the value with respect to ``inputs``) with fresh leaves."""
    leaves = [leaf(x) for x in inputs]
    value = loss_fn(*leaves)
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), grads


@pytest.fixture(scope="module")
def liger_jsd():
    module = pytest.importorskip(
        "liger_kernel.chunked_loss",
        reason="Liger-Kernel is not installed: `pip install -e '.[liger]'` (on a CPU machine "
               "`pip install --no-deps liger-kernel` is enough: its chunked losses need no triton)",
    )
    return module.LigerFusedLinearJSDLoss


def liger_loss(liger_cls, *, beta, temperature, hard=0.0, soft=1.0, ignore_index=-100):
    """Liger's fused JSD loss as a function of (student_hidden, student_weight); the teacher is bound later."""
    return liger_cls(weight_hard_loss=hard, weight_soft_loss=soft, beta=beta, temperature=temperature,
                     ignore_index=ignore_index, compiled=False, chunk_size=4)


# ----------------------------------------------------------------------------------------------------------------
# Row: T^2 scaling
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_t2_trl_equals_llmkd_divided_by_t2(temperature, beta):
    """TRL does not multiply by T^2: TRL = llmkd / T^2 (values and student-logit gradients)."""
    student, teacher, labels = make_logits()
    mask = labels != -100
    n = int(mask.sum())
    ours, (ours_grad,) = grad_of(
        lambda zs: generalized_jsd(zs, teacher, mask, beta=beta, temperature=temperature) / temperature**2, student)
    ref, (ref_grad,) = grad_of(
        lambda zs: trl_jsd(zs, teacher.double(), labels=labels, beta=beta, temperature=temperature),
        student.double())
    magnitude = kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), temperature)
    tolerance = float32_tolerance(magnitude, 2 * V + n)
    assert_within(ours, ref, tolerance, "value")
    assert_within(ours_grad, ref_grad, float32_tolerance(magnitude / n, 2 * V + n), "gradient")
    if temperature != 1.0:  # the factor is really there: without dividing, llmkd is T^2 times TRL
        unscaled = generalized_jsd(student, teacher, mask, beta=beta, temperature=temperature)
        assert_within(unscaled, temperature**2 * ref, temperature**2 * tolerance, "llmkd = T^2 TRL")
        assert abs(unscaled - ref).item() > temperature**2 * tolerance


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_t2_liger_equals_llmkd_without_t2(liger_jsd, temperature):
    """Liger does not multiply by T^2 either: Liger = llmkd / T^2, or llmkd's engine with a Divergence built with
    ``scale_by_t2=False`` (values, and gradients for the student's hidden states and head)."""
    hs, ws, ht, wt, labels = make_heads()
    valid = labels != -100
    liger = liger_loss(liger_jsd, beta=0.5, temperature=temperature)
    theirs, their_grads = grad_of(lambda h, w: liger(h, w, ht, wt, labels), hs, ws)
    scaled = get_divergence("jsd", temperature=temperature, beta=0.5)
    unscaled = get_divergence("jsd", temperature=temperature, beta=0.5, scale_by_t2=False)
    ours, our_grads = grad_of(
        lambda h, w: chunked_distillation_loss(h[valid], w, ht[valid], wt, None, scaled).loss / temperature**2,
        hs, ws)
    ours_unscaled = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, None, unscaled).loss
    n = int(valid.sum())
    tolerance = fused_tolerance(hs, ws, ht, wt, temperature, n)
    assert_within(ours, theirs, tolerance, "value")
    assert_within(ours_unscaled, theirs, tolerance, "value, scale_by_t2=False")
    grad_tolerance = head_grad_tolerance(tolerance, hs, ws, n)
    for name, mine, other in zip(("hidden", "weight"), our_grads, their_grads):
        assert_within(mine, other, grad_tolerance, f"gradient w.r.t. the student's {name}")


# ----------------------------------------------------------------------------------------------------------------
# Row: reductions
# ----------------------------------------------------------------------------------------------------------------
def test_reductions_trl_with_labels():
    """With labels: TRL's batchmean = llmkd's mean (per valid token), TRL's mean = llmkd's mean / V, sums equal,
    TRL's none is (N_valid, V) per vocabulary entry (sum it over V: llmkd's (B, S) at the valid positions)."""
    student, teacher, labels = make_logits()
    mask = labels != -100
    zs, zt = student.double(), teacher.double()
    ours = {r: generalized_jsd(student, teacher, mask, reduction=r) for r in ("mean", "sum", "none")}
    theirs = {r: trl_jsd(zs, zt, labels=labels, reduction=r) for r in ("batchmean", "mean", "sum", "none")}
    n = int(mask.sum())
    per_token = float32_tolerance(kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), 1.0),
                                  2 * V + n)
    assert_within(ours["mean"], theirs["batchmean"], per_token, "batchmean")
    assert_within(ours["mean"] / V, theirs["mean"], per_token / V, "mean")
    assert_within(ours["sum"], theirs["sum"], n * per_token, "sum")
    assert theirs["none"].shape == (n, V) and ours["none"].shape == (B, S)
    assert_within(ours["none"][mask], theirs["none"].sum(-1), per_token, "none")
    assert torch.all(ours["none"][~mask] == 0)


def test_reductions_trl_without_labels():
    """Without labels TRL's batchmean divides by the batch size B, not by the B*S tokens: TRL = llmkd's mean * S for
    (B, S, V) logits (and = llmkd's mean for (N, V) logits); TRL's none is (B, S, V)."""
    student, teacher, _ = make_logits()
    zs, zt = student.double(), teacher.double()
    per_token = float32_tolerance(kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), 1.0),
                                  2 * V + B * S)
    ours_mean = generalized_jsd(student, teacher)
    assert_within(ours_mean * S, trl_jsd(zs, zt), S * per_token, "batchmean on (B, S, V)")
    assert_within(ours_mean, trl_jsd(zs.reshape(-1, V), zt.reshape(-1, V)), per_token, "batchmean on (N, V)")
    assert_within(ours_mean / V, trl_jsd(zs, zt, reduction="mean"), per_token / V, "mean")
    trl_none = trl_jsd(zs, zt, reduction="none")
    assert trl_none.shape == (B, S, V)
    assert_within(generalized_jsd(student, teacher, reduction="none"), trl_none.sum(-1), per_token, "none")


def test_reductions_num_items_in_batch():
    """Given num_items_in_batch, TRL returns sum / num_items_in_batch whatever ``reduction`` says ("none" included);
    llmkd uses it for "mean" only."""
    student, teacher, labels = make_logits()
    mask = labels != -100
    num_items = 40  # e.g. the valid tokens of all micro-batches of an optimizer step
    ours = generalized_jsd(student, teacher, mask, num_items_in_batch=num_items)
    tolerance = float32_tolerance(kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), 1.0),
                                  2 * V + B * S)
    for reduction in ("batchmean", "mean", "sum", "none"):
        theirs = trl_jsd(student.double(), teacher.double(), labels=labels, reduction=reduction,
                         num_items_in_batch=num_items)
        assert theirs.dim() == 0
        assert_within(ours, theirs, tolerance, f"reduction={reduction!r} with num_items_in_batch")
    assert generalized_jsd(student, teacher, mask, reduction="sum", num_items_in_batch=num_items) == \
        generalized_jsd(student, teacher, mask, reduction="sum")
    with pytest.raises(ValueError, match="reduction must be one of"):
        generalized_jsd(student, teacher, mask, reduction="batchmean")


def test_reductions_liger_per_micro_batch(liger_jsd):
    """Liger divides by the valid tokens of the call (no num_items_in_batch): under gradient accumulation the
    micro-batch losses must be weighted by n_valid_i / n_valid_total to give the one-large-batch loss that llmkd's
    ``normalizer=num_items_in_batch`` gives."""
    hs, ws, ht, wt, labels = make_heads()
    halves = [slice(0, 4), slice(4, B * S)]  # 2 and 9 valid tokens: unequal on purpose
    ht = ht.clone()
    ht[halves[0]] *= 4.0  # a sharper teacher on the first micro-batch: the two micro-batch means differ clearly
    liger = liger_loss(liger_jsd, beta=0.5, temperature=1.0)
    divergence = get_divergence("jsd", beta=0.5)
    counts = [int((labels[part] != -100).sum()) for part in halves]
    total = sum(counts)
    whole = liger(hs, ws, ht, wt, labels)
    theirs = [liger(hs[part], ws, ht[part], wt, labels[part]) for part in halves]
    ours = []
    for part in halves:
        valid = labels[part] != -100
        ours.append(chunked_distillation_loss(hs[part][valid], ws, ht[part][valid], wt, None, divergence,
                                              normalizer=total).loss)
    tolerance = fused_tolerance(hs, ws, ht, wt, 1.0, total)
    assert_within(sum(ours), whole, tolerance, "llmkd's accumulated micro-batches")
    assert_within(sum(t * c / total for t, c in zip(theirs, counts)), whole, tolerance, "Liger reweighted")
    # the plain average of Liger's losses is off by more than any rounding could explain
    assert abs(sum(theirs) / 2 - whole).item() > tolerance


# ----------------------------------------------------------------------------------------------------------------
# Rows: generalized JSD's beta; which side is p
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_beta_same_convention_as_trl(beta):
    """Same beta in llmkd and TRL: mixture m = beta p + (1 - beta) q (p the teacher), beta = 0 forward KL(p || q),
    beta = 1 reverse KL(q || p)."""
    student, teacher, labels = make_logits()
    mask = labels != -100
    n = int(mask.sum())
    ours, (ours_grad,) = grad_of(lambda zs: generalized_jsd(zs, teacher, mask, beta=beta), student)
    ref, (ref_grad,) = grad_of(lambda zs: trl_jsd(zs, teacher.double(), labels=labels, beta=beta), student.double())
    magnitude = kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), 1.0)
    assert_within(ours, ref, float32_tolerance(magnitude, 2 * V + n), "value")
    assert_within(ours_grad, ref_grad, float32_tolerance(magnitude / n, 2 * V + n), "gradient")
    if beta == 0.0:
        assert_within(forward_kl(student, teacher, mask), ref, float32_tolerance(magnitude, 2 * V + n), "fkl")
    if beta == 1.0:
        assert_within(reverse_kl(student, teacher, mask), ref, float32_tolerance(magnitude, 2 * V + n), "rkl")
    if 0.0 < beta < 0.5:  # the test can tell the convention from its mirror image
        mirrored = trl_jsd(student.double(), teacher.double(), labels=labels, beta=1.0 - beta)
        assert abs(mirrored - ref).item() > float32_tolerance(magnitude, 2 * V + n)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_beta_same_convention_as_liger(liger_jsd, beta):
    """Liger's chunked JSD uses the same beta (its endpoints are the same KLs)."""
    hs, ws, ht, wt, labels = make_heads()
    valid = labels != -100
    theirs = liger_loss(liger_jsd, beta=beta, temperature=1.0)(hs, ws, ht, wt, labels)
    ours = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, None, get_divergence("jsd", beta=beta)).loss
    tolerance = fused_tolerance(hs, ws, ht, wt, 1.0, int(valid.sum()))
    assert_within(ours, theirs, tolerance, "value")
    endpoint = {0.0: "fkl", 1.0: "rkl"}.get(beta)
    if endpoint is not None:
        named = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, None, get_divergence(endpoint)).loss
        assert_within(named, theirs, tolerance, endpoint)


def test_which_side_is_p():
    """Everyone calls (student, teacher) in that order and p is the teacher: forward KL is KL(teacher || student),
    torch's ``F.kl_div(student_log_probs, teacher_log_probs, log_target=True)``; swapping the arguments changes it."""
    student, teacher, labels = make_logits()
    mask = labels != -100
    n = int(mask.sum())
    log_q = F.log_softmax(student.double(), -1)[mask]
    log_p = F.log_softmax(teacher.double(), -1)[mask]
    torch_kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / n  # KL(p || q): target = teacher
    magnitude = kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), 1.0)
    tolerance = float32_tolerance(magnitude, 2 * V + n)
    assert_within(forward_kl(student, teacher, mask), torch_kl, tolerance, "llmkd forward_kl")
    assert_within(trl_jsd(student.double(), teacher.double(), labels=labels, beta=0.0), torch_kl, tolerance, "TRL")
    swapped = forward_kl(teacher, student, mask)
    assert abs(swapped - torch_kl).item() > 0.05 * torch_kl.item()


# ----------------------------------------------------------------------------------------------------------------
# Row: temperature, on which sides
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [2.0, 4.0])
def test_temperature_softens_both_sides(temperature):
    """llmkd and TRL divide both logits by T: the loss at T on (z_s, z_t) is the loss at 1 on (z_s / T, z_t / T);
    softening the student alone (as Liger's fused KL-div op on a given target does) is a different number."""
    student, teacher, labels = make_logits()
    mask = labels != -100
    at_t = trl_jsd(student.double(), teacher.double(), labels=labels, beta=0.0, temperature=temperature)
    pre_divided = trl_jsd(student.double() / temperature, teacher.double() / temperature, labels=labels, beta=0.0)
    assert torch.allclose(at_t, pre_divided, rtol=1e-12, atol=0.0)  # float64, identical operations
    ours = forward_kl(student, teacher, mask, temperature=temperature) / temperature**2
    n = int(mask.sum())
    magnitude = kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), temperature)
    assert_within(ours, at_t, float32_tolerance(magnitude, 2 * V + n), "both sides softened")
    student_only = F.kl_div(F.log_softmax(student.double() / temperature, -1)[mask],
                            F.log_softmax(teacher.double(), -1)[mask], log_target=True, reduction="sum") / n
    assert abs(student_only - at_t).item() > 0.05 * at_t.item()


class FixedLogits(torch.nn.Module):
    """A stand-in causal LM whose forward returns given logits ``(B, S, V)`` (as an object with ``.logits``)."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, input_ids=None, attention_mask=None):
        return type("Output", (), {"logits": self.logits})()


def test_gkd_trainer_loss_is_at_temperature_one_on_shifted_positions():
    """GKDTrainer.compute_loss calls the loss without its ``temperature`` (0.9 by default, the sampling temperature),
    i.e. at T = 1, on ``logits[:, :-1]`` against ``labels[:, 1:]``: llmkd's loss at T = 1 with
    ``mask = labels[:, 1:] != -100`` on the same shifted logits."""
    student, teacher, labels = make_logits()
    trainer = object.__new__(GKDTrainer)  # compute_loss reads only these attributes
    trainer.teacher_model, trainer.beta, trainer.temperature = FixedLogits(teacher.double()), 0.5, 0.9
    model = FixedLogits(student.double())
    inputs = {"input_ids": torch.zeros(B, S, dtype=torch.long), "attention_mask": torch.ones(B, S),
              "labels": labels}
    theirs = GKDTrainer.compute_loss(trainer, model, inputs)
    shifted_mask = labels[:, 1:] != -100
    ours = generalized_jsd(student[:, :-1], teacher[:, :-1], shifted_mask, beta=0.5)
    n = int(shifted_mask.sum())
    magnitude = kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), 1.0)
    assert_within(ours, theirs, float32_tolerance(magnitude, 2 * V + n), "GKDTrainer's loss")
    at_sampling_temperature = generalized_jsd(student[:, :-1], teacher[:, :-1], shifted_mask, beta=0.5,
                                              temperature=0.9) / 0.9**2
    assert abs(at_sampling_temperature - theirs).item() > float32_tolerance(magnitude, 2 * V + n)


def test_temperature_liger_both_sides_and_ce_unsoftened(liger_jsd):
    """Liger's chunked loss softens both sides for the divergence and computes its CE on the raw student logits,
    as llmkd's engine does."""
    temperature = 2.0
    hs, ws, ht, wt, labels = make_heads()
    valid = labels != -100
    n = int(valid.sum())
    theirs = liger_loss(liger_jsd, beta=0.0, temperature=temperature)(hs, ws, ht, wt, labels)
    pre_divided = liger_loss(liger_jsd, beta=0.0, temperature=1.0)(hs, ws / temperature, ht, wt / temperature, labels)
    tolerance = fused_tolerance(hs, ws, ht, wt, 1.0, n)  # T = 1 bounds T = 2 (every term shrinks with 1 / T)
    assert_within(theirs, pre_divided, tolerance, "Liger at T = Liger at 1 on logits / T")
    ours = forward_kl(hs[valid] @ ws.T, ht[valid] @ wt.T, temperature=temperature) / temperature**2
    assert_within(ours, theirs, tolerance, "llmkd / T^2")
    raw_ce = F.cross_entropy(hs.double() @ ws.double().T, labels)  # mean over the valid labels
    ce_only = liger_loss(liger_jsd, beta=0.0, temperature=temperature, hard=1.0, soft=0.0)(hs, ws, ht, wt, labels)
    engine_ce = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, labels[valid], get_divergence("fkl",
                                          temperature=temperature), kd_weight=0.0, ce_weight=1.0).loss
    # CE = logsumexp(z) - z_y: terms within 2 max|z| + log V; each logit off by gamma_H sum|h||w| (moves CE by 2x)
    ce_tolerance = 2.0 * (float32_tolerance(2 * (hs @ ws.T).abs().max().item() + math.log(V), V + n)
                          + 2.0 * gamma(H_S) * (hs.abs() @ ws.abs().T).max().item())
    assert_within(ce_only, raw_ce, ce_tolerance, "Liger's CE at T = 2")
    assert_within(engine_ce, raw_ce, ce_tolerance, "llmkd's CE at T = 2")


# ----------------------------------------------------------------------------------------------------------------
# Row: masking / ignore_index
# ----------------------------------------------------------------------------------------------------------------
def test_masking_trl_labels_and_llmkd_mask():
    """TRL masks with ``labels == -100``; llmkd takes ``mask = labels != -100`` (True = counts). A fully masked batch
    is 0 with a zero gradient in both."""
    student, teacher, labels = make_logits()
    mask = labels != -100
    n = int(mask.sum())
    magnitude = kl_magnitude(student.abs().max().item() + teacher.abs().max().item(), 1.0)
    ours = generalized_jsd(student, teacher, mask)
    theirs = trl_jsd(student.double(), teacher.double(), labels=labels)
    assert_within(ours, theirs, float32_tolerance(magnitude, 2 * V + n), "masked mean")
    unmasked = trl_jsd(student.double(), teacher.double(), labels=torch.zeros_like(labels))
    assert abs(unmasked - theirs).item() > float32_tolerance(magnitude, 2 * V + B * S)  # masking changed the value
    nothing = torch.full_like(labels, -100)
    ours_empty, (ours_grad,) = grad_of(lambda zs: generalized_jsd(zs, teacher, nothing != -100), student)
    theirs_empty, (their_grad,) = grad_of(lambda zs: trl_jsd(zs, teacher.double(), labels=nothing), student.double())
    assert ours_empty.item() == 0.0 and theirs_empty.item() == 0.0
    assert torch.all(ours_grad == 0) and torch.all(their_grad == 0)


@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_masking_liger_ignore_index(liger_jsd, ignore_index):
    """Liger drops the rows whose target is ``ignore_index`` from the divergence and the CE and divides by the rest;
    llmkd's engine takes the valid rows only (``hidden[labels != ignore_index]``)."""
    hs, ws, ht, wt, labels = make_heads()
    labels = torch.where(labels == -100, torch.tensor(ignore_index), labels)
    valid = labels != ignore_index
    n = int(valid.sum())
    liger = liger_loss(liger_jsd, beta=0.5, temperature=1.0, hard=0.4, soft=0.6, ignore_index=ignore_index)
    theirs, their_grads = grad_of(lambda h, w: liger(h, w, ht, wt, labels), hs, ws)
    ours, our_grads = grad_of(
        lambda h, w: chunked_distillation_loss(h[valid], w, ht[valid], wt, labels[valid],
                                               get_divergence("jsd", beta=0.5), kd_weight=0.6, ce_weight=0.4).loss,
        hs, ws)
    tolerance = fused_tolerance(hs, ws, ht, wt, 1.0, n)  # the CE's terms are within the same bound
    assert_within(ours, theirs, tolerance, "value")
    grad_tolerance = head_grad_tolerance(tolerance, hs, ws, n)
    for name, mine, other in zip(("hidden", "weight"), our_grads, their_grads):
        assert_within(mine, other, grad_tolerance, f"gradient w.r.t. the student's {name}")
    assert torch.all(their_grads[0][~valid] == 0)  # ignored rows get no gradient
    empty = liger(hs, ws, ht, wt, torch.full_like(labels, ignore_index))
    assert empty.item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Row: weight between the hard-label CE and the KD term
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_and_kd_weights_liger(liger_jsd, temperature):
    """Liger: ``w_hard * CE + w_soft * D``. llmkd: ``(1 - kd_ratio) * CE + kd_ratio * T^2 * D``. The engine with
    ``ce_weight=w_hard, kd_weight=w_soft`` and an unscaled divergence is Liger's loss; from a config,
    ``kd_ratio = w_soft / (w_soft + w_hard T^2)`` gives Liger's loss times ``T^2 / (w_soft + w_hard T^2)``."""
    w_hard, w_soft = 0.3, 0.7
    hs, ws, ht, wt, labels = make_heads()
    valid = labels != -100
    n = int(valid.sum())
    liger = liger_loss(liger_jsd, beta=0.5, temperature=temperature, hard=w_hard, soft=w_soft)
    theirs, their_grads = grad_of(lambda h, w: liger(h, w, ht, wt, labels), hs, ws)
    engine = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, labels[valid],
                                       get_divergence("jsd", beta=0.5, temperature=temperature, scale_by_t2=False),
                                       kd_weight=w_soft, ce_weight=w_hard).loss
    kd_ratio = w_soft / (w_soft + w_hard * temperature**2)
    multiplier = (w_soft + w_hard * temperature**2) / temperature**2  # = w_hard + w_soft / T^2
    ours, our_grads = grad_of(
        lambda h, w: multiplier * chunked_distillation_loss(
            h[valid], w, ht[valid], wt, labels[valid], get_divergence("jsd", beta=0.5, temperature=temperature),
            kd_weight=kd_ratio, ce_weight=1.0 - kd_ratio).loss,
        hs, ws)
    tolerance = fused_tolerance(hs, ws, ht, wt, 1.0, n)  # T = 1 bounds T = 2; the CE's terms are within it too
    assert_within(engine, theirs, tolerance, "engine with Liger's weights")
    assert_within(ours, theirs, tolerance, "kd_ratio mapping times the multiplier")
    grad_tolerance = head_grad_tolerance(tolerance, hs, ws, n)
    for name, mine, other in zip(("hidden", "weight"), our_grads, their_grads):
        assert_within(mine, other, grad_tolerance, f"gradient w.r.t. the student's {name}")


def test_ce_and_kd_weights_trl_has_no_ce_term():
    """TRL's distillation losses have no CE term: they are llmkd with ``kd_ratio = 1`` (CE weight 0), over T^2."""
    temperature = 2.0
    hs, ws, ht, wt, labels = make_heads()
    valid = labels != -100
    n = int(valid.sum())
    theirs, _, counted = _chunked_divergence_loss(hs.reshape(B, S, H_S), ht.reshape(B, S, H_T), ws, wt,
                                                  valid.reshape(B, S), 0.5, temperature=temperature)
    assert int(counted) == n
    ours = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, labels[valid],
                                     get_divergence("jsd", beta=0.5, temperature=temperature),
                                     kd_weight=1.0, ce_weight=0.0).loss / temperature**2
    tolerance = fused_tolerance(hs, ws, ht, wt, temperature, n)
    assert_within(ours, theirs, tolerance, "kd_ratio = 1")


# ----------------------------------------------------------------------------------------------------------------
# Row: fused head (hidden states + output heads) or logits in
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_fused_head_trl_distillation_trainer(beta):
    """TRL's DistillationTrainer loss takes hidden states ``(B, K, H)``, both heads and a completion mask ``(B, K)``;
    llmkd's engine takes the valid rows ``(N, H)``. Same numbers over T^2 (values and gradients for the student's
    hidden states and head), and the same as llmkd's dense loss on the projected logits; with
    ``num_items_in_batch`` both divide the sum by it."""
    temperature = 2.0
    hs, ws, ht, wt, labels = make_heads()
    valid = labels != -100
    n = int(valid.sum())

    def trl_loss(h, w, num_items=None):
        return _chunked_divergence_loss(h.reshape(B, S, H_S), ht.reshape(B, S, H_T), w, wt, valid.reshape(B, S),
                                        beta, num_items_in_batch=num_items, temperature=temperature)[0]

    divergence = get_divergence("jsd", beta=beta, temperature=temperature)
    theirs, their_grads = grad_of(trl_loss, hs, ws)
    ours, our_grads = grad_of(
        lambda h, w: chunked_distillation_loss(h[valid], w, ht[valid], wt, None, divergence).loss / temperature**2,
        hs, ws)
    dense = dense_distillation_loss(hs[valid], ws, ht[valid], wt, None, divergence).loss / temperature**2
    tolerance = fused_tolerance(hs, ws, ht, wt, temperature, n)
    assert_within(ours, theirs, tolerance, "chunked value")
    assert_within(dense, theirs, tolerance, "dense value")
    grad_tolerance = head_grad_tolerance(tolerance, hs, ws, n)
    for name, mine, other in zip(("hidden", "weight"), our_grads, their_grads):
        assert_within(mine, other, grad_tolerance, f"gradient w.r.t. the student's {name}")
    with_items = trl_loss(hs, ws, num_items=40)
    ours_items = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, None, divergence,
                                           normalizer=40).loss / temperature**2
    assert_within(ours_items, with_items, tolerance, "num_items_in_batch")


def test_fused_head_liger_pads_a_smaller_student_vocabulary(liger_jsd):
    """With a teacher head of more rows than the student's (padded vocabularies), Liger appends zero LOGITS to the
    student (probability mass on ids the student cannot produce); llmkd distils over the shared ids
    ``[0, min(V_s, V_t))``. Liger's number is the divergence against the zero-padded student logits."""
    extra = 3
    hs, ws, ht, wt, labels = make_heads(teacher_vocab=V + extra)
    valid = labels != -100
    n = int(valid.sum())
    theirs = liger_loss(liger_jsd, beta=0.5, temperature=1.0)(hs, ws, ht, wt, labels)
    student_logits = hs[valid] @ ws.T
    padded = torch.cat([student_logits, torch.zeros(n, extra)], dim=-1)
    zero_padded = generalized_jsd(padded, ht[valid] @ wt.T, beta=0.5)
    tolerance = fused_tolerance(hs, ws, ht, wt, 1.0, n, vocab=V + extra)  # covers the shared-id comparison too
    assert_within(zero_padded, theirs, tolerance, "Liger = JSD against zero-padded student logits")
    shared = chunked_distillation_loss(hs[valid], ws, ht[valid], wt, None, get_divergence("jsd", beta=0.5)).loss
    truncated = generalized_jsd(student_logits, ht[valid] @ wt[:V].T, beta=0.5)
    assert_within(shared, truncated, tolerance, "llmkd = JSD over the shared ids")
    assert abs(shared - theirs).item() > tolerance
