"""Cross-tokenizer losses (llmkd/losses/cross_tokenizer.py) against naive references written from the formulas of
docs/ALGORITHMS.md section 6, in values and gradients: through the chunked engine (span-preserving chunks of
several sizes) and its dense reference.

Tolerances: the references run in float64, llmkd in float32. Each loss is a sum of at most ``terms`` float32
operations of magnitude at most ``scale``, so the float32 result is within ``terms * eps32 * scale`` of the exact
value (standard summation bound, eps32 = 2^-24 relative rounding); :func:`bound` states it.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmkd.losses import (
    AlignedTeacher,
    DenseTargets,
    DistillationObjective,
    HybridLoss,
    OutputHead,
    ProjectedTeacher,
    SpanLikelihoodLoss,
    ULDLoss,
    chunked_loss,
    dense_loss,
    get_divergence,
)
from llmkd.losses.cross_tokenizer import binary_kl

EPS32 = 2.0**-24


def bound(terms: int, scale: float = 1.0) -> float:
    return terms * EPS32 * scale


def random_batch(seed: int, *, vocab_s=37, vocab_t=50, hidden=16, spans=18, shared="subset"):
    """N student rows and N_t teacher rows over ``spans`` spans of 1-3 tokens a side, with student rows in no
    span between them; hidden states and heads for both models; a shared vocabulary of 12 pairs (``shared`` =
    "subset"), every student token paired with a teacher token in shuffled order ("complete"), or one vocabulary
    under the same ids with every span 1:1 ("identical": the selections the loss makes are all the identity)."""
    generator = torch.Generator().manual_seed(seed)
    if shared == "identical":
        vocab_t = vocab_s

    def randint(low, high):
        return int(torch.randint(low, high, (1,), generator=generator))

    student_spans, teacher_spans = [], []
    for span in range(spans):
        if shared == "identical":
            student_spans.append(span)
            teacher_spans.append(span)
            continue
        if randint(0, 3) == 0:
            student_spans.append(-1)  # an unaligned student token (CE only)
        student_spans += [span] * randint(1, 4)
        teacher_spans += [span] * randint(1, 4)
    student_spans, teacher_spans = torch.tensor(student_spans), torch.tensor(teacher_spans)
    n, n_t = len(student_spans), len(teacher_spans)
    return {
        "student_hidden": torch.randn(n, hidden, generator=generator),
        "student_weight": torch.randn(vocab_s, hidden, generator=generator) * 0.5,
        "teacher_hidden": torch.randn(n_t, hidden, generator=generator),
        "teacher_weight": torch.randn(vocab_t, hidden, generator=generator) * 0.5,
        "labels": torch.randint(0, vocab_s, (n,), generator=generator),
        "teacher_labels": torch.randint(0, vocab_t, (n_t,), generator=generator),
        "student_spans": student_spans,
        "teacher_spans": teacher_spans,
        "shared": {
            "subset": lambda: (torch.randperm(vocab_s, generator=generator)[:12],
                               torch.randperm(vocab_t, generator=generator)[:12]),
            "complete": lambda: (torch.arange(vocab_s), torch.randperm(vocab_t, generator=generator)[:vocab_s]),
            "identical": lambda: (torch.arange(vocab_s), torch.arange(vocab_s)),
        }[shared](),
    }


def span_rows(spans, span):
    return [i for i, s in enumerate(spans.tolist()) if s == span]


def merged(log_probs, rows, labels):
    """The span's distribution from the definition: the first row's probabilities times the later tokens'."""
    scale = sum(log_probs[r, labels[r]] for r in rows[1:]) if len(rows) > 1 else 0.0
    return (log_probs[rows[0]] + scale).exp()


def sorted_l1(q, p, k):
    q = torch.sort(q, descending=True).values[:k]
    p = torch.sort(p, descending=True).values[:k]
    q = torch.cat([q, q.new_zeros(k - len(q))])
    p = torch.cat([p, p.new_zeros(k - len(p))])
    return (q - p).abs().sum()


def naive_loss(kind, student_logits, teacher_logits, batch, *, temperature, top_k, shared_loss=None):
    """The loss summed over spans, span by span (float64 autograd)."""
    log_q = torch.log_softmax(student_logits / temperature, -1)
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    total = student_logits.new_zeros(())
    num_spans = int(batch["teacher_spans"].max()) + 1
    for span in range(num_spans):
        s_rows, t_rows = span_rows(batch["student_spans"], span), span_rows(batch["teacher_spans"], span)
        if kind == "span":
            lq = sum(log_q[r, batch["labels"][r]] for r in s_rows)
            lp = sum(log_p[r, batch["teacher_labels"][r]] for r in t_rows)
            ceiling = math.log1p(-1e-6)
            lq, lp = torch.clamp(lq, max=ceiling), torch.clamp(lp, max=ceiling)
            p, q = lp.exp(), lq.exp()
            total = total + p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
            continue
        q = merged(log_q, s_rows, batch["labels"])
        p = merged(log_p, t_rows, batch["teacher_labels"])
        if kind == "uld" or len(s_rows) != 1 or len(t_rows) != 1:  # (hybrid*: ULD on the spans not 1:1)
            total = total + sorted_l1(q, p, top_k)
            continue
        shared_s, shared_t = batch["shared"]
        keep_s = torch.ones(len(q), dtype=torch.bool)
        keep_s[shared_s] = False
        keep_t = torch.ones(len(p), dtype=torch.bool)
        keep_t[shared_t] = False
        w_shared = len(shared_s) / teacher_logits.shape[1]
        divergence = shared_loss(student_logits[s_rows[0]][shared_s][None], teacher_logits[t_rows[0]][shared_t][None])
        total = total + w_shared * divergence.sum() + (1 - w_shared) * sorted_l1(q[keep_s], p[keep_t], top_k)
    return total


def loss_object(kind, temperature, top_k, shared_loss):
    if kind == "uld":
        return ULDLoss(top_k=top_k, temperature=temperature)
    if kind.startswith("hybrid"):
        return HybridLoss(shared_loss, top_k=top_k, temperature=temperature)
    return SpanLikelihoodLoss(temperature=temperature)


# hybrid: JSD on the shared vocabulary (autograd over the shared block); hybrid_fkl: forward KL (its closed form)
KINDS = ["uld", "hybrid", "hybrid_fkl", "span"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature,top_k", [(1.0, 8), (2.0, 64)])
@pytest.mark.parametrize("chunk_size", [1, 5, None])
def test_engine_matches_naive_reference(kind, temperature, top_k, chunk_size):
    check_against_naive(random_batch(0), kind, temperature, top_k, chunk_size)


@pytest.mark.parametrize("kind", ["hybrid", "hybrid_fkl"])
@pytest.mark.parametrize("shared", ["complete", "identical"])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_hybrid_with_a_complete_shared_vocabulary(kind, shared, chunk_size):
    """The hybrid skips the selections that are the identity (a complete shared vocabulary, every row a 1:1 span):
    the same values and gradients, and the teacher's logits are not overwritten by the closed form."""
    batch = random_batch(1, shared=shared)
    check_against_naive(batch, kind, 1.0, 8, chunk_size)
    check_against_naive(batch, kind, 2.0, 64, chunk_size)


def check_against_naive(batch, kind, temperature, top_k, chunk_size):
    shared_loss = (get_divergence("fkl", temperature=temperature) if kind == "hybrid_fkl" else
                   get_divergence("jsd", temperature=temperature, beta=0.5))
    token_loss = loss_object(kind, temperature, top_k, shared_loss)
    objective = DistillationObjective(token_loss, kd_weight=0.7, ce_weight=0.3)
    n = batch["student_hidden"].shape[0]
    normalizer = float(n + 3)

    def engine(function, **kwargs):
        hidden = batch["student_hidden"].clone().requires_grad_(True)
        weight = batch["student_weight"].clone().requires_grad_(True)
        teacher = ProjectedTeacher(batch["teacher_hidden"], OutputHead(batch["teacher_weight"]))
        targets = AlignedTeacher(teacher, batch["student_spans"], batch["teacher_spans"], batch["teacher_labels"],
                                 batch["teacher_weight"].shape[0], shared=batch["shared"])
        result = function(hidden, OutputHead(weight), targets, batch["labels"], objective, normalizer=normalizer,
                          **kwargs)
        result.loss.backward()
        return result, hidden.grad, weight.grad

    hidden = batch["student_hidden"].double().requires_grad_(True)
    weight = batch["student_weight"].double().requires_grad_(True)
    student_logits = hidden @ weight.T
    teacher_logits = batch["teacher_hidden"].double() @ batch["teacher_weight"].double().T
    kd = naive_loss(kind, student_logits, teacher_logits, batch, temperature=temperature, top_k=top_k,
                    shared_loss=shared_loss)
    ce = torch.nn.functional.cross_entropy(student_logits, batch["labels"], reduction="sum")
    teacher_ce = torch.nn.functional.cross_entropy(teacher_logits, batch["teacher_labels"], reduction="sum")
    reference = (0.7 * kd + 0.3 * ce) / normalizer
    reference.backward()

    terms = n * (batch["student_weight"].shape[0] + batch["teacher_weight"].shape[0])
    scale = float(kd.detach().abs() + ce.detach().abs()) / normalizer + 1.0
    for result, grad_hidden, grad_weight in (engine(chunked_loss, chunk_size=chunk_size), engine(dense_loss)):
        assert result.num_tokens == n
        assert float(result.loss.detach()) == pytest.approx(float(reference), abs=bound(terms, scale))
        assert float(result.kd_sum) == pytest.approx(float(kd), abs=bound(terms, float(kd.abs()) + 1.0))
        assert float(result.ce_sum) == pytest.approx(float(ce), abs=bound(terms, float(ce) + 1.0))
        assert float(result.teacher_ce_sum) == pytest.approx(float(teacher_ce), abs=bound(terms, float(teacher_ce) + 1))
        torch.testing.assert_close(grad_hidden.double(), hidden.grad, rtol=0, atol=bound(terms, 10.0))
        torch.testing.assert_close(grad_weight.double(), weight.grad, rtol=0, atol=bound(terms, 10.0))
    assert float(kd) > 0.01  # the inputs do exercise the loss


def test_chunks_never_split_a_span():
    batch = random_batch(1)
    teacher = DenseTargets(torch.randn(len(batch["teacher_spans"]), 50))
    targets = AlignedTeacher(teacher, batch["student_spans"], batch["teacher_spans"], batch["teacher_labels"], 50)
    spans = batch["student_spans"].tolist()
    for chunk_size in (1, 2, 3, 7, 1000):
        bounds = targets.chunk_bounds(chunk_size)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(spans)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        for start, end in bounds[1:]:
            assert spans[start] < 0 or spans[start] != spans[start - 1]
        if chunk_size >= 3:  # spans hold at most 3 student rows: a chunk never exceeds the size
            assert max(end - start for start, end in bounds) <= chunk_size


def test_chunk_gets_the_teacher_rows_of_its_spans():
    batch = random_batch(2)
    teacher_logits = torch.randn(len(batch["teacher_spans"]), 50)
    targets = AlignedTeacher(DenseTargets(teacher_logits), batch["student_spans"], batch["teacher_spans"],
                             batch["teacher_labels"], 50)
    for start, end in targets.chunk_bounds(4):
        chunk = targets.chunk(start, end, 37)
        spans = [s for s in batch["student_spans"][start:end].tolist() if s >= 0]
        rows = [i for i, s in enumerate(batch["teacher_spans"].tolist()) if spans and spans[0] <= s <= spans[-1]]
        torch.testing.assert_close(chunk.teacher_logits, teacher_logits[rows], rtol=0, atol=0)
        assert chunk.num_spans == (spans[-1] - spans[0] + 1 if spans else 0)


def test_identical_tokenizations_give_zero_and_uld_is_a_distance():
    logits = torch.randn(6, 20)
    spans = torch.arange(6)
    labels = torch.randint(0, 20, (6,))
    targets = AlignedTeacher(DenseTargets(logits), spans, spans, labels, 20,
                             shared=(torch.arange(20), torch.arange(20)))
    chunk = targets.chunk(0, 6, 20)
    for loss in (ULDLoss(top_k=20), HybridLoss(get_divergence("fkl")), SpanLikelihoodLoss()):
        assert float(loss(logits, chunk, labels)) == pytest.approx(0.0, abs=bound(6 * 20))
    # a permutation of the vocabulary changes no sorted probability: ULD cannot tell it apart
    permuted = logits[:, torch.randperm(20)]
    assert float(ULDLoss(top_k=20)(permuted, chunk, labels)) == pytest.approx(0.0, abs=bound(6 * 20))
    assert float(ULDLoss(top_k=20)(logits * 2, chunk, labels)) > 0.01


def test_binary_kl_limits():
    log_p = torch.log(torch.tensor([0.3, 1e-9, 0.999]))
    kl = binary_kl(log_p, log_p)
    torch.testing.assert_close(kl, torch.zeros(3), rtol=0, atol=1e-6)
    p, q = 0.3, 0.6
    expected = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert float(binary_kl(torch.log(torch.tensor(p)), torch.log(torch.tensor(q)))) == pytest.approx(expected, 1e-5)
    # a student span probability of exactly 1 is clamped: the loss stays finite
    assert torch.isfinite(binary_kl(torch.log(torch.tensor(0.5)), torch.tensor(0.0)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        ULDLoss(top_k=0)
    with pytest.raises(ValueError, match="temperature"):
        SpanLikelihoodLoss(temperature=0)
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match="non-decreasing"):
        AlignedTeacher(DenseTargets(logits), torch.tensor([0, 1, 2]), torch.tensor([1, 0, 2]), torch.zeros(3), 10)
    with pytest.raises(ValueError, match="span list"):
        AlignedTeacher(DenseTargets(logits), torch.tensor([0, 1]), torch.tensor([0, 1]), torch.zeros(2), 10)
    targets = AlignedTeacher(DenseTargets(logits), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]),
                             torch.zeros(3), 10)
    with pytest.raises(TypeError, match="another vocabulary"):
        targets.chunk(0, 3, 10).logits()
    with pytest.raises(ValueError, match="shared vocabulary"):
        HybridLoss(get_divergence("fkl"))(logits, targets.chunk(0, 3, 10), torch.zeros(3, dtype=torch.long))
