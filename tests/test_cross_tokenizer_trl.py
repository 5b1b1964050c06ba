"""llmkd's cross-tokenizer losses (llmkd/losses/cross_tokenizer.py) next to TRL's own GOLD implementation
(``trl.experimental.gold.gold_trainer.ULDLoss`` and ``GOLDTrainer.generalized_jsd_loss``, trl 1.16), run on the
same inputs. Each test states what agrees and, where the two differ by design, the relation that holds instead.

Where they agree:

- Grouping. TRL's ``_align_by_byte_offsets`` (``use_extended_uld=True``) closes a group where both sides' tokens
  end at the same byte; llmkd's :func:`~llmkd.cross_tokenizer.align_tokens` gives the same spans (on an ASCII
  text, where bytes are characters).
- ULD. TRL with ``uld_token_merge_strategy="observed"`` merges a group as llmkd merges a span (the first token's
  distribution times the probabilities of the later tokens) and compares the sorted, zero-padded vectors by L1:
  with ``top_k`` >= both vocabularies, llmkd's sum over spans divided by the number of spans is TRL's loss of
  the sequence.
- Hybrid, outside the shared vocabulary: the same sorted L1 of the unshared probabilities; and the same default
  weights ``|matched| / V_t`` and ``1 - |matched| / V_t``.
- JSD's ``beta``: the same convention on both sides (``m = beta p + (1 - beta) q``, ``beta KL(p||m) + (1 - beta)
  KL(q||m)``, ``beta = 0`` forward KL(p||q), ``beta = 1`` reverse KL(q||p)): TRL's ``beta`` is llmkd's
  ``get_divergence("jsd", beta=beta)`` unchanged.

Where they differ, by design:

- Truncation: llmkd's ULD sums the top ``top_k`` ranks of the sorted L1 only (no sort over a whole vocabulary);
  that is a prefix of TRL's sum of non-negative terms, so it is at most TRL's and grows with ``top_k``.
- Positions. TRL's "observed" slices the logits at the answer tokens' *own* positions (``logits[start + k]``, which
  in a causal LM predict token ``k + 1``) and reads each later token's probability there; "bayesian" slices one
  position earlier (``probs[k]`` predicts ``token_ids[k]``) but merges a group at its *last* position. llmkd's
  rows are the causal ones (row ``n`` predicts ``labels[n]``) with the observed merge (first row of the span):
  llmkd equals TRL's "observed" fed logits shifted one position right, and TRL's "bayesian" on 1:1 groups only.
- Normalisation: TRL divides a sequence's sum by its number of groups and averages over sequences; llmkd returns
  the sum over spans (its engine divides by the step's student token count).
- Hybrid, on the shared vocabulary: TRL passes the raw (unrenormalised) probabilities of the matched tokens to
  ``generalized_jsd_loss(logits_are_probs=True)``, which takes their log without a softmax; llmkd applies its
  token loss to the logits restricted to the shared columns, i.e. the shared distribution renormalised. llmkd's
  shared part equals TRL's formula on the renormalised probabilities; TRL's own value is a "divergence" between
  sub-probability vectors, which at ``beta`` 0 or 1 (a KL) can be negative; llmkd's is a divergence (>= 0).
- Hybrid on multi-token groups: TRL applies the matched/unmatched split to every group, llmkd only to 1:1 spans
  (the others get ULD), as its docstring states; the tests compare 1:1 groups only.
- The vocabulary map: TRL pairs raw ``get_vocab()`` piece strings (so ``Ġthe`` and ``▁the`` never pair, and
  special tokens do); llmkd's :func:`~llmkd.cross_tokenizer.shared_vocabulary` pairs decoded strings and leaves
  special tokens out.

Tolerances: TRL runs in float64 here, on logits that are float32 values; llmkd computes in float32. A value that
sums ``terms`` float32-rounded terms whose absolute values add up to ``magnitude`` is within ``terms * eps32 *
magnitude`` of the exact sum (Higham, Accuracy and Stability of Numerical Algorithms, section 4.2; eps32 =
2^-24); each term itself carries a few roundings (log-softmax, exp, a product of span probabilities, the JSD's
logs), which the factor 4 of :func:`float32_bound` covers.
"""

from __future__ import annotations

import dataclasses
import os
import types

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import; the API is pinned by trl

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from trl.experimental.gold.gold_config import GOLDConfig
from trl.experimental.gold.gold_trainer import GOLDTrainer
from trl.experimental.gold.gold_trainer import ULDLoss as TRLULDLoss

from llmkd.cross_tokenizer import align_tokens, shared_vocabulary, token_strings
from llmkd.losses import AlignedTeacher, DenseTargets, HybridLoss, ULDLoss, get_divergence
from test_cross_tokenizer import metaspace_tokenizer
from utils import make_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

EPS32 = 2.0**-24  # float32 unit roundoff
IGNORE = -100
V_S, V_T = 13, 17  # the ULD tests' vocabularies
FULL = max(V_S, V_T)  # a top_k that keeps every rank: llmkd's ULD untruncated

# One answer text ("abcdefghijkl", ASCII: byte offsets are character offsets) under two tokenizations; the common
# token ends are 3, 5, 9, 12, so four spans: 1:2, 1:1, 1:2 and 2:1 (student:teacher tokens).
TEXT = "abcdefghijkl"
STUDENT_OFFSETS = [(0, 3), (3, 5), (5, 9), (9, 10), (10, 12)]
TEACHER_OFFSETS = [(0, 2), (2, 3), (3, 5), (5, 7), (7, 9), (9, 12)]
STUDENT_SPANS = [0, 1, 2, 3, 3]
TEACHER_SPANS = [0, 0, 1, 2, 2, 3]
# the same text with every span 1:1 (the sides' token ends are the same)
ONE_TO_ONE_OFFSETS = [(0, 3), (3, 5), (5, 9), (9, 12)]


def float32_bound(terms: int, magnitude: float) -> float:
    """The a-priori float32 error of llmkd's value against the float64 reference (module docstring)."""
    return 4 * terms * EPS32 * magnitude


def trl_config(**overrides) -> types.SimpleNamespace:
    """The attributes ``ULDLoss.__init__`` reads (GOLDConfig is a TrainingArguments: a SimpleNamespace avoids its
    output directory and device set-up): ULD only, no cross-entropy, temperatures 1, EOS kept, extended ULD with
    the "observed" merge, no hybrid."""
    values = {
        "uld_crossentropy_weight": 0.0, "uld_distillation_weight": 1.0, "uld_student_temperature": 1.0,
        "uld_teacher_temperature": 1.0, "uld_skip_student_eos": False, "uld_skip_teacher_eos": False,
        "use_extended_uld": True, "uld_token_merge_strategy": "observed", "uld_use_hybrid_loss": False,
        "uld_hybrid_matched_weight": None, "uld_hybrid_unmatched_weight": None, "beta": 0.5,
    }
    unknown = set(overrides) - set(values)
    assert not unknown, unknown
    values.update(overrides)
    fields = {field.name for field in dataclasses.fields(GOLDConfig)}
    assert set(values) <= fields, set(values) - fields  # the names are GOLDConfig's (catches a rename in TRL)
    return types.SimpleNamespace(**values)


def make_sequence(offsets, prompt: int, vocab: int, generator: torch.Generator, scale: float = 2.0) -> dict:
    """One side of one sequence as TRL takes it: ``prompt`` prompt positions (label -100) then the answer tokens
    with their byte offsets; random token ids and logits (float32 values held in float64)."""
    length = prompt + len(offsets)
    ids = torch.randint(0, vocab, (length,), generator=generator)
    labels = ids.clone()
    labels[:prompt] = IGNORE
    byte_offsets = torch.zeros(length, 2, dtype=torch.long)
    byte_offsets[prompt:] = torch.tensor(offsets)
    logits = (scale * torch.randn(length, vocab, generator=generator)).double()
    return {"logits": logits, "labels": labels, "ids": ids, "offsets": byte_offsets, "prompt": prompt,
            "n": len(offsets)}


def stacked(sequences: list[dict], key: str, value) -> torch.Tensor:
    """The batch of one field, right-padded with ``value`` (TRL's layout)."""
    width = max(s[key].shape[0] for s in sequences)
    rows = []
    for s in sequences:
        pad = s[key].new_full((width - s[key].shape[0], *s[key].shape[1:]), value)
        rows.append(torch.cat([s[key], pad]))
    return torch.stack(rows)


def run_trl(loss_fn: TRLULDLoss, students: list[dict], teachers: list[dict], shift_logits: bool = False):
    """TRL's loss of a batch. ``shift_logits``: feed it logits moved one position right (position ``p`` gets the
    logit of ``p - 1``), which puts the causal row predicting answer token ``k`` at answer position ``k``."""
    def logits(sides):
        batch = stacked(sides, "logits", 0.0)
        return torch.cat([torch.zeros_like(batch[:, :1]), batch[:, :-1]], dim=1) if shift_logits else batch

    return loss_fn(
        student_logits=logits(students), teacher_logits=logits(teachers),
        student_labels=stacked(students, "labels", IGNORE), teacher_labels=stacked(teachers, "labels", IGNORE),
        student_input_ids=stacked(students, "ids", 0), teacher_input_ids=stacked(teachers, "ids", 0),
        student_byte_offsets=stacked(students, "offsets", 0), teacher_byte_offsets=stacked(teachers, "offsets", 0),
    )


def llmkd_rows(sequence: dict, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows (n, V), labels (n,))`` of a sequence's answer as llmkd takes them: ``labels[n]`` is the n-th answer
    token and ``rows[n]`` the logit at position ``prompt + n - shift``: ``shift=0`` is the slice TRL's "observed"
    reads (the logit at the token's own position), ``shift=1`` the causal row that predicts ``labels[n]`` (llmkd's
    convention for a real model's logits; TRL's "bayesian" slice)."""
    p, n = sequence["prompt"], sequence["n"]
    return sequence["logits"][p - shift:p - shift + n], sequence["ids"][p:p + n]


def run_llmkd(loss, students, teachers, student_spans, teacher_spans, shift: int = 0, shared=None) -> torch.Tensor:
    """llmkd's loss (the sum over all spans) of the sequences' answers, spans numbered globally in text order."""
    rows_s, labels_s, rows_t, labels_t, spans_s, spans_t = [], [], [], [], [], []
    offset = 0
    for student, teacher, s_spans, t_spans in zip(students, teachers, student_spans, teacher_spans):
        for rows, labels, spans, sequence, local in ((rows_s, labels_s, spans_s, student, s_spans),
                                                     (rows_t, labels_t, spans_t, teacher, t_spans)):
            row, label = llmkd_rows(sequence, shift)
            rows.append(row)
            labels.append(label)
            spans.append(torch.tensor(local) + offset)
        offset += max(s_spans) + 1
    teacher_rows = torch.cat(rows_t)
    targets = AlignedTeacher(DenseTargets(teacher_rows), torch.cat(spans_s), torch.cat(spans_t), torch.cat(labels_t),
                             teacher_rows.shape[1], shared=shared)
    student_rows = torch.cat(rows_s)
    chunk = targets.chunk(0, student_rows.shape[0], student_rows.shape[1])
    return loss(student_rows, chunk, torch.cat(labels_s))


def spans_of(groups: list[list[int]]) -> list[int]:
    """TRL's alignment groups (token indices per group) as llmkd's span ids per token."""
    spans = {}
    for span, group in enumerate(groups):
        for token in group:
            spans[token] = span
    return [spans[i] for i in range(len(spans))]


def uld_inputs(seed: int, student_offsets=STUDENT_OFFSETS, teacher_offsets=TEACHER_OFFSETS):
    generator = torch.Generator().manual_seed(seed)
    # different prompt lengths on the two sides: the answer slices must be found from each side's labels
    return make_sequence(student_offsets, 3, V_S, generator), make_sequence(teacher_offsets, 5, V_T, generator)


# ----------------------------------------------------------------------------------------------------------------
# Grouping and ULD
# ----------------------------------------------------------------------------------------------------------------
def test_trl_byte_offset_groups_are_llmkd_spans():
    """TRL's byte-offset groups and llmkd's aligned spans are the same partition of the text (the precondition
    of every comparison below)."""
    student_groups, teacher_groups = TRLULDLoss._align_by_byte_offsets(STUDENT_OFFSETS, TEACHER_OFFSETS)
    alignment = align_tokens(TEXT, STUDENT_OFFSETS, TEACHER_OFFSETS)
    assert alignment.num_spans == len(student_groups) == len(teacher_groups) == 4
    assert spans_of(student_groups) == alignment.student_spans.tolist() == STUDENT_SPANS
    assert spans_of(teacher_groups) == alignment.teacher_spans.tolist() == TEACHER_SPANS
    assert alignment.dropped_spans == 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_uld_observed_equals_llmkd_sum_over_spans(seed, temperature):
    """Agreement: TRL's extended ULD with the "observed" merge (both temperatures ``T``) on one sequence is
    llmkd's ``ULDLoss(top_k >= both vocabularies, temperature=T)`` summed over the spans, divided by the number of
    spans, when llmkd is given the rows TRL reads (``logits[start + k]``, with ``token_ids[k]`` the token whose
    probability is read there: ``llmkd_rows(shift=0)``)."""
    student, teacher = uld_inputs(seed)
    trl = run_trl(TRLULDLoss(trl_config(uld_student_temperature=temperature, uld_teacher_temperature=temperature)),
                  [student], [teacher])
    ours = run_llmkd(ULDLoss(top_k=FULL, temperature=temperature), [student], [teacher], [STUDENT_SPANS],
                     [TEACHER_SPANS])
    num_spans = 4
    assert ours.dtype == torch.float32 and trl.dtype == torch.float64
    # per span: V_S + V_T sorted entries, each side's entries adding up to at most 1
    assert float(ours) / num_spans == pytest.approx(float(trl), abs=float32_bound(V_S + V_T, 2.0))
    assert float(trl) > 0.05  # the inputs exercise the loss


def test_uld_top_k_truncation_is_a_prefix_of_trls_sum():
    """By design: llmkd's ``top_k`` keeps the first ``top_k`` ranks of each span's sorted L1, a partial sum of
    TRL's non-negative terms. So llmkd's value is at most TRL's, non-decreasing in ``top_k``, strictly smaller
    when ranks with mass are cut, and equal once ``top_k`` covers both vocabularies (the shorter side is
    zero-padded on both)."""
    student, teacher = uld_inputs(2)
    trl = float(run_trl(TRLULDLoss(trl_config()), [student], [teacher]))
    tolerance = float32_bound(V_S + V_T, 2.0)
    values = [float(run_llmkd(ULDLoss(top_k=k), [student], [teacher], [STUDENT_SPANS], [TEACHER_SPANS])) / 4
              for k in range(1, FULL + 3)]
    assert all(value <= trl + tolerance for value in values)
    assert all(b >= a - tolerance for a, b in zip(values, values[1:]))
    assert values[0] < trl - 0.05  # top_k=1: the largest rank only
    for k in (V_T, V_T + 1, V_T + 2):  # k >= both vocabularies: nothing is cut
        assert values[k - 1] == pytest.approx(trl, abs=tolerance)
    assert values[V_S - 1] < trl - 1e-4  # k = V_S < V_T: the teacher's smallest ranks are cut


def test_uld_positions_llmkd_is_observed_merge_at_causal_rows():
    """By design (positions): llmkd's rows are the causal ones (``llmkd_rows(shift=1)``: row n predicts answer
    token n). Fed those, llmkd equals TRL's "observed" fed the logits shifted one position right (so its slice
    holds the causal rows), and equals TRL's "bayesian" where every group is 1:1 (its slice is the causal one
    and a 1:1 group has no merge). On multi-token groups "bayesian" merges at the group's last token, and
    "observed" on the unshifted logits reads the rows one position later: both differ from llmkd."""
    tolerance = float32_bound(V_S + V_T, 2.0)
    student, teacher = uld_inputs(3)
    ours = float(run_llmkd(ULDLoss(top_k=FULL), [student], [teacher], [STUDENT_SPANS], [TEACHER_SPANS],
                           shift=1)) / 4
    observed = TRLULDLoss(trl_config())
    bayesian = TRLULDLoss(trl_config(uld_token_merge_strategy="bayesian"))
    assert ours == pytest.approx(float(run_trl(observed, [student], [teacher], shift_logits=True)), abs=tolerance)
    assert abs(ours - float(run_trl(observed, [student], [teacher]))) > 1e-3
    assert abs(ours - float(run_trl(bayesian, [student], [teacher]))) > 1e-3

    student, teacher = uld_inputs(4, ONE_TO_ONE_OFFSETS, ONE_TO_ONE_OFFSETS)
    spans = [0, 1, 2, 3]
    ours = float(run_llmkd(ULDLoss(top_k=FULL), [student], [teacher], [spans], [spans], shift=1)) / 4
    assert ours == pytest.approx(float(run_trl(bayesian, [student], [teacher])), abs=tolerance)
    assert abs(ours - float(run_trl(observed, [student], [teacher]))) > 1e-3


def test_uld_batch_normalisation():
    """By design (normalisation): on a batch of two sequences with 4 and 2 spans, TRL's value is the mean over
    the sequences of each one's sum divided by its own group count; llmkd's value is the sum over all spans of the
    batch (each sequence's llmkd sum, added), which its engine divides by the step's student token count. The two
    per-span averages differ when the sequences' span counts differ."""
    generator = torch.Generator().manual_seed(5)
    short_student, short_teacher = [(0, 2), (2, 5)], [(0, 1), (1, 2), (2, 5)]  # spans 1:2 and 1:1
    students = [make_sequence(STUDENT_OFFSETS, 3, V_S, generator), make_sequence(short_student, 2, V_S, generator)]
    teachers = [make_sequence(TEACHER_OFFSETS, 5, V_T, generator), make_sequence(short_teacher, 4, V_T, generator)]
    student_spans, teacher_spans = [STUDENT_SPANS, [0, 1]], [TEACHER_SPANS, [0, 0, 1]]
    loss = ULDLoss(top_k=FULL)
    each = [float(run_llmkd(loss, [s], [t], [ss], [ts])) for s, t, ss, ts in
            zip(students, teachers, student_spans, teacher_spans)]
    joint = float(run_llmkd(loss, students, teachers, student_spans, teacher_spans))
    trl = float(run_trl(TRLULDLoss(trl_config()), students, teachers))
    tolerance = float32_bound(6 * (V_S + V_T), 2.0)
    assert joint == pytest.approx(sum(each), abs=tolerance)
    assert trl == pytest.approx((each[0] / 4 + each[1] / 2) / 2, abs=tolerance)
    assert abs(trl - joint / 6) > 1e-3  # the per-span mean over the batch is not TRL's mean of per-sequence means


# ----------------------------------------------------------------------------------------------------------------
# Hybrid
# ----------------------------------------------------------------------------------------------------------------
# Two word-level vocabularies sharing five raw piece strings ("<unk>", "a", "b", "c", "e"), in different orders.
STUDENT_VOCAB = ["<unk>", "a", "b", "c", "d", "e", "f", "g", "h"]
TEACHER_VOCAB = ["<unk>", "x", "c", "a", "y", "e", "z", "b", "w", "v", "u"]


def word_level(vocab: list[str]) -> PreTrainedTokenizerFast:
    model = models.WordLevel({piece: i for i, piece in enumerate(vocab)}, unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), unk_token="<unk>")


@pytest.fixture(scope="module")
def word_tokenizers():
    return word_level(STUDENT_VOCAB), word_level(TEACHER_VOCAB)


def hybrid_inputs(seed: int):
    """One sequence whose five spans are all 1:1 (same token ends on both sides)."""
    generator = torch.Generator().manual_seed(seed)
    offsets = [(0, 1), (1, 3), (3, 4), (4, 6), (6, 7)]
    student = make_sequence(offsets, 2, len(STUDENT_VOCAB), generator)
    teacher = make_sequence(offsets, 4, len(TEACHER_VOCAB), generator)
    return student, teacher, [0, 1, 2, 3, 4]


def trl_pairs(loss_fn: TRLULDLoss) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's matched tokens as llmkd's ``shared`` pair: the teacher ids (sorted, as TRL indexes them) and the
    student ids its mapping gives them."""
    teacher_ids = torch.tensor(sorted(loss_fn._teacher_matched_ids))
    return loss_fn.mapping_tensor[teacher_ids], teacher_ids


def renormalised_matched_jsd(sequence_s, sequence_t, pairs, beta, temperature):
    """TRL's own matched-token formula (``generalized_jsd_loss(logits_are_probs=True)``, batchmean over the groups)
    on the matched probabilities renormalised to sum to 1 on each side (float64)."""
    (rows_s, _), (rows_t, _) = llmkd_rows(sequence_s, 0), llmkd_rows(sequence_t, 0)
    q = torch.softmax(rows_s / temperature, -1)[:, pairs[0]]
    p = torch.softmax(rows_t / temperature, -1)[:, pairs[1]]
    return GOLDTrainer.generalized_jsd_loss(q / q.sum(-1, keepdim=True), p / p.sum(-1, keepdim=True), labels=None,
                                            beta=beta, temperature=1.0, reduction="batchmean", logits_are_probs=True)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_hybrid_on_one_to_one_groups(word_tokenizers, beta, temperature):
    """On 1:1 groups, with llmkd given TRL's own matched pairs and ``shared_loss = get_divergence("jsd",
    temperature=T, beta=beta, scale_by_t2=False)`` (TRL's ``beta`` unchanged; no ``T^2``, since TRL's matched part
    takes the already softened probabilities):

    - agreement: TRL's default weights are llmkd's (``|matched| / V_t = 5/11`` and ``6/11``), and the unshared
      parts are equal (llmkd with ``shared_weight=0, rest_weight=1``, divided by the span count, is TRL's
      ``last_unmatched_loss``);
    - by design: llmkd's shared part (``shared_weight=1, rest_weight=0``, per span) is TRL's matched formula on
      the *renormalised* matched probabilities, not TRL's ``last_matched_loss`` (raw probabilities); so llmkd's
      default hybrid per span is ``w * (renormalised) + (1 - w) * last_unmatched_loss``, while TRL's total is
      ``w * last_matched_loss + (1 - w) * last_unmatched_loss``; a ``top_k`` below the unshared vocabularies
      truncates the unshared part (smaller than TRL's, growing with ``top_k``)."""
    student_tok, teacher_tok = word_tokenizers
    trl_fn = TRLULDLoss(trl_config(uld_use_hybrid_loss=True, beta=beta, uld_student_temperature=temperature,
                                   uld_teacher_temperature=temperature),
                        student_tokenizer=student_tok, teacher_tokenizer=teacher_tok)
    pairs = trl_pairs(trl_fn)
    assert pairs[1].tolist() == [0, 2, 3, 5, 7] and pairs[0].tolist() == [0, 3, 1, 5, 2]  # <unk>, c, a, e, b
    student, teacher, spans = hybrid_inputs(6)
    num_spans, weight = len(spans), 5 / len(TEACHER_VOCAB)

    trl = float(run_trl(trl_fn, [student], [teacher]))
    matched, unmatched = float(trl_fn.last_matched_loss), float(trl_fn.last_unmatched_loss)
    assert trl == pytest.approx(weight * matched + (1 - weight) * unmatched, rel=1e-12)  # TRL's weights

    divergence = get_divergence("jsd", temperature=temperature, beta=beta, scale_by_t2=False)

    def ours(top_k=len(TEACHER_VOCAB), **weights):
        loss = HybridLoss(divergence, top_k=top_k, temperature=temperature, **weights)
        return float(run_llmkd(loss, [student], [teacher], [spans], [spans], shared=pairs)) / num_spans

    assert HybridLoss(divergence).weights(5, len(TEACHER_VOCAB)) == pytest.approx((weight, 1 - weight), rel=1e-12)
    renormalised = float(renormalised_matched_jsd(student, teacher, pairs, beta, temperature))
    # unshared: V_s + V_t sorted entries of mass <= 1 a side; shared: 5 JSD terms, each a few logs of
    # magnitude <= |log 1e-8| (TRL's clamp) weighted by probabilities <= 1
    rest_tolerance, shared_tolerance = float32_bound(20, 2.0), float32_bound(4 * 5, 2 * 18.5)
    assert ours(shared_weight=0.0, rest_weight=1.0) == pytest.approx(unmatched, abs=rest_tolerance)
    assert ours(shared_weight=1.0, rest_weight=0.0) == pytest.approx(renormalised, abs=shared_tolerance)
    assert ours() == pytest.approx(weight * renormalised + (1 - weight) * unmatched,
                                   abs=rest_tolerance + shared_tolerance)
    assert abs(renormalised - matched) > 1e-3  # TRL's raw-probability value is another number
    # by design, as for ULD: a top_k below the unshared vocabularies (4 and 6 tokens) keeps a prefix of TRL's sum
    truncated = [ours(top_k=k, shared_weight=0.0, rest_weight=1.0) for k in (1, 2, 3)]
    assert truncated[0] < truncated[1] < truncated[2] < unmatched - 1e-4
    assert unmatched > 0.05 and renormalised > 1e-3  # the inputs exercise both parts


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_hybrid_trl_raw_matched_kl_can_be_negative(word_tokenizers, beta):
    """By design (why llmkd renormalises): at ``beta`` 0 or 1 TRL's matched part is a KL between the raw matched
    probabilities, sub-probability vectors of masses ``P`` (teacher) and ``Q`` (student). Here the teacher's
    matched logits are the student's plus a constant ``c``, so the renormalised matched distributions are equal
    and TRL's value is ``P log(P / Q)`` (``beta=0``, forward KL(p||q)) or ``Q log(Q / P)`` (``beta=1``, reverse
    KL(q||p)) per group: negative when the weighting side has the smaller mass (``c = -3`` resp. ``+3``). llmkd's
    shared part, the KL between the renormalised distributions, is 0 (float32 rounding), as TRL's formula on
    them is."""
    student_tok, teacher_tok = word_tokenizers
    trl_fn = TRLULDLoss(trl_config(uld_use_hybrid_loss=True, beta=beta), student_tokenizer=student_tok,
                        teacher_tokenizer=teacher_tok)
    pairs = trl_pairs(trl_fn)
    student, teacher, spans = hybrid_inputs(7)
    shift = -3.0 if beta == 0.0 else 3.0
    (student_rows, _), (teacher_rows, _) = llmkd_rows(student, 0), llmkd_rows(teacher, 0)
    teacher_rows[:, pairs[1]] = student_rows[:, pairs[0]] + shift  # a view: writes the teacher's answer logits
    trl = float(run_trl(trl_fn, [student], [teacher]))
    loss = HybridLoss(get_divergence("jsd", beta=beta), top_k=len(TEACHER_VOCAB), shared_weight=1.0, rest_weight=0.0)
    ours = float(run_llmkd(loss, [student], [teacher], [spans], [spans], shared=pairs)) / len(spans)

    mass_p = torch.softmax(teacher_rows, -1)[:, pairs[1]].sum(-1)
    mass_q = torch.softmax(student_rows, -1)[:, pairs[0]].sum(-1)
    weighting, other = (mass_p, mass_q) if beta == 0.0 else (mass_q, mass_p)
    expected = float((weighting * torch.log(weighting / other)).mean())
    assert float(trl_fn.last_matched_loss) == pytest.approx(expected, rel=1e-9)
    weight = len(pairs[1]) / len(TEACHER_VOCAB)
    assert expected < -0.02 and trl < (1 - weight) * float(trl_fn.last_unmatched_loss)  # it lowers TRL's total
    renormalised = float(renormalised_matched_jsd(student, teacher, pairs, beta, 1.0))
    assert abs(renormalised) < 1e-12
    assert ours == pytest.approx(0.0, abs=float32_bound(4 * 5, 2 * 18.5))


# ----------------------------------------------------------------------------------------------------------------
# The vocabulary map
# ----------------------------------------------------------------------------------------------------------------
def test_vocabulary_map_trl_raw_pieces_vs_llmkd_decoded_strings():
    """By design: between a byte-level BPE (``Ġ`` marks a space) and a SentencePiece-style Metaspace BPE (``▁``),
    TRL's map (equal raw ``get_vocab()`` strings) pairs no space-prefixed word, while llmkd's (equal decoded
    strings) pairs ``Ġthe`` with ``▁the``. TRL also pairs the special tokens (equal strings such as ``</s>``),
    which llmkd leaves out; every other pair of TRL's is one of llmkd's (pieces without a marker decode to
    themselves)."""
    student, teacher = make_tokenizer(320), metaspace_tokenizer(200)
    trl_fn = TRLULDLoss(trl_config(uld_use_hybrid_loss=True), student_tokenizer=student, teacher_tokenizer=teacher)
    trl_map = {(s, t) for t, s in trl_fn._vocab_mapping.items()}
    ours = set(zip(*(ids.tolist() for ids in shared_vocabulary(student, teacher))))

    the = (student.convert_tokens_to_ids("Ġthe"), teacher.convert_tokens_to_ids("▁the"))
    assert student.convert_ids_to_tokens(the[0]) == "Ġthe" and teacher.convert_ids_to_tokens(the[1]) == "▁the"
    assert the in ours and the not in trl_map
    assert the[1] not in trl_fn._vocab_mapping  # TRL has no partner for "▁the" at all

    strings = token_strings(student)
    spaced = {pair for pair in ours if strings[pair[0]].startswith(" ")}
    assert len(spaced) >= 10 and not spaced & trl_map  # " cat", " the", " dog", ...: llmkd's only

    specials = {(student.convert_tokens_to_ids(x), teacher.convert_tokens_to_ids(x)) for x in ("<pad>", "</s>")}
    assert specials <= trl_map and not specials & ours
    special_ids = set(student.all_special_ids)
    assert {pair for pair in trl_map if pair[0] not in special_ids} <= ours
