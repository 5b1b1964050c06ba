"""ABKD's alpha-beta divergence (docs/ALGORITHMS.md section 0.8) beyond what the registry-wide tests check
(tests/test_losses.py runs every divergence against tests/divergence_reference.py): its limits, its agreement
with the official code (ghwang-s/abkd, ``distillm/losses.py::ab_div``, transcribed below as a formula), its
float32 accuracy near the optimum, and its configuration through DistillConfig."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from divergence_reference import alpha_beta
from utils import make_tokenizer, prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer
from llmkd.losses import alpha_beta_divergence, forward_kl, get_divergence, reverse_kl
from llmkd.losses.divergences import alpha_beta_per_token

pytestmark = pytest.mark.usefixtures("single_thread")


def log_probs(seed, shape=(6, 11), scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(shape, generator=g, dtype=torch.float64) * scale, -1).to(dtype)


def official_ab_div(p, q, a, b):
    """The official ``ab_div``'s per-position value, transcribed as formulas (float64, no masking): the general
    case is the paper's equation; where a parameter is 0 it divides by that parameter, not by its square."""
    if a == 0 and b == 0:
        return 0.5 * ((torch.log(q) - torch.log(p)) ** 2).sum(-1)
    if a == 0:
        return (1 / b) * (q**b * torch.log(q**b / p**b) - q**b + p**b).sum(-1)
    if b == 0:
        return (1 / a) * (p**a * torch.log(p**a / q**a) - p**a + q**a).sum(-1)
    return -(p**a * q**b - a / (a + b) * p ** (a + b) - b / (a + b) * q ** (a + b)).sum(-1) / (a * b)


@pytest.mark.parametrize("a,b", [(0.2, 0.7), (0.5, 0.5), (1.0, 1.0), (0.1, 0.9), (1.5, 0.2), (0.0, 0.0)])
def test_equals_the_official_code_in_the_general_case(a, b):
    log_q, log_p = log_probs(1), log_probs(2)
    torch.testing.assert_close(alpha_beta_per_token(log_q, log_p, a, b),
                               official_ab_div(log_p.exp(), log_q.exp(), a, b), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("a,b", [(0.5, 0.0), (2.0, 0.0), (0.0, 0.3)])
def test_differs_from_the_official_code_at_a_zero_parameter_by_that_factor(a, b):
    """Documented departure: at b = 0 the limit of the paper's formula is 1/a^2 (...), the official code divides by
    a (and by b at a = 0). llmkd keeps the limit, so the loss is continuous in (a, b)."""
    log_q, log_p = log_probs(3), log_probs(4)
    ours = alpha_beta_per_token(log_q, log_p, a, b)
    official = official_ab_div(log_p.exp(), log_q.exp(), a, b)
    torch.testing.assert_close(ours * (a or b), official, rtol=1e-12, atol=1e-14)
    # the limit of the general formula as the zero parameter grows from 0: ours, not the official value
    eps = 1e-6
    near = alpha_beta_per_token(log_q, log_p, a or eps, b or eps)
    torch.testing.assert_close(near, ours, rtol=1e-4, atol=0)
    assert not torch.allclose(near, official, rtol=1e-2)


def test_forward_and_reverse_kl_are_its_corners():
    student = torch.randn(4, 5, 13, generator=torch.Generator().manual_seed(5))
    teacher = torch.randn(4, 5, 13, generator=torch.Generator().manual_seed(6))
    for temperature in (1.0, 2.0):
        fkl = forward_kl(student, teacher, temperature=temperature, reduction="none")
        rkl = reverse_kl(student, teacher, temperature=temperature, reduction="none")
        torch.testing.assert_close(alpha_beta_divergence(student, teacher, ab_alpha=1.0, ab_beta=0.0,
                                                         temperature=temperature, reduction="none"), fkl)
        torch.testing.assert_close(alpha_beta_divergence(student, teacher, ab_alpha=0.0, ab_beta=1.0,
                                                         temperature=temperature, reduction="none"), rkl)


@pytest.mark.parametrize("gap", [1e-2, 1e-3, 1e-4])
def test_float32_is_accurate_next_to_the_teacher(gap):
    """A student within ``gap`` (in logits) of its teacher: the float32 kernel agrees with float64 on the same
    float32 inputs to a relative 1e-3 (each term is computed as larger * (u expm1(d) - expm1(u d)) with
    d = log(smaller / larger), which loses no digits as d -> 0; the terms of the paper's formula are each O(1) and
    cancel to O(d^2), which in float32 leaves an error of order 1e-7 / d^2 relative: at gap 1e-3 over 100%)."""
    log_p = log_probs(7, (8, 50), dtype=torch.float32)
    g = torch.Generator().manual_seed(8)
    log_q = torch.log_softmax(log_p + gap * torch.randn(8, 50, generator=g), -1)
    ours = alpha_beta_per_token(log_q, log_p)
    exact = alpha_beta_per_token(log_q.double(), log_p.double())
    assert (exact > 0).all()
    torch.testing.assert_close(ours.double(), exact, rtol=1e-3, atol=0)
    naive = alpha_beta(log_p.exp(), log_q.exp())  # the formula itself, in float32
    if gap <= 1e-3:
        assert ((naive.double() - exact).abs() / exact).max() > 0.5


def test_gradient_points_from_student_to_teacher_and_vanishes_at_it():
    log_p = log_probs(9, (5, 7))
    z = torch.randn(5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(10), requires_grad=True)
    loss = alpha_beta_per_token(torch.log_softmax(z, -1), log_p).sum()
    (grad,) = torch.autograd.grad(loss, z)
    stepped = (z - 1e-3 * grad).detach()
    assert alpha_beta_per_token(torch.log_softmax(stepped, -1), log_p).sum() < loss
    at = log_p.clone().requires_grad_(True)
    (zero,) = torch.autograd.grad(alpha_beta_per_token(torch.log_softmax(at, -1), log_p).sum(), at)
    assert zero.abs().max() < 1e-12


@pytest.mark.parametrize("kwargs,match", [
    ({"ab_alpha": -0.1}, r"ab_alpha >= 0 and ab_beta >= 0, got ab_alpha=-0.1"),
    ({"ab_beta": float("nan")}, r"ab_alpha >= 0 and ab_beta >= 0"),
    ({"alpha_ab": 0.3}, r"'abkd' has no parameter 'alpha_ab'; its parameters \(with their defaults\) are: "
                        r"ab_alpha=0.2, ab_beta=0.7"),
])
def test_bad_parameters_are_refused_when_the_divergence_is_built(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_divergence("abkd", **kwargs)


def test_defaults_are_the_official_llm_setting():
    assert get_divergence("abkd").params == {"ab_alpha": 0.2, "ab_beta": 0.7}
    assert get_divergence("alpha_beta").name == "abkd"


# ----------------------------------------------------------------------------------------------------------------
# Through DistillConfig / DistillTrainer
# ----------------------------------------------------------------------------------------------------------------
def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=12,
                  learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                  loss_chunk_size=16, max_length=64, disable_tqdm=True, kd_ratio=1.0, divergence="abkd")
    values.update(overrides)
    return DistillConfig(**values)


def test_divergence_kwargs_reach_the_loss_and_the_student_learns(tmp_path):
    tokenizer = make_tokenizer()
    student, teacher = tiny_llama(len(tokenizer), hidden=32, layers=2, seed=1), tiny_llama(len(tokenizer), seed=2)
    dataset = Dataset.from_list(prompt_completion_rows(48))
    args = _config(tmp_path, divergence_kwargs='{"ab_alpha": 0.5, "ab_beta": 0.5}')  # as from the command line
    assert args.divergence_kwargs == {"ab_alpha": 0.5, "ab_beta": 0.5}
    trainer = DistillTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=args, train_dataset=dataset,
                             processing_class=tokenizer)
    assert trainer.divergence.params == {"ab_alpha": 0.5, "ab_beta": 0.5}
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        mask = batch["labels"][:, 1:] != -100
        expected = alpha_beta_divergence(s, t, mask, ab_alpha=0.5, ab_beta=0.5)
        other = alpha_beta_divergence(s, t, mask)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(other.item() - expected.item()) > 1e-3 * expected.item()  # the kwargs changed the loss
    trainer.train()
    kd = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert sum(kd[-3:]) / 3 < 0.7 * sum(kd[:3]) / 3, kd


@pytest.mark.parametrize("kwargs,match", [
    ({"divergence_kwargs": "{ab_alpha: 0.5"}, r"divergence_kwargs must be a JSON object"),
    ({"divergence_kwargs": '["ab_alpha"]'}, r"divergence_kwargs must map parameter names to values"),
    ({"divergence": "jsd", "divergence_kwargs": {"beta": 0.2}}, r"set jsd_beta .* or skew_alpha"),
])
def test_bad_divergence_kwargs_are_refused_by_the_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(tmp_path, **kwargs)


def test_a_parameter_the_divergence_does_not_take_is_refused_by_the_trainer(tmp_path):
    tokenizer = make_tokenizer()
    model = tiny_llama(len(tokenizer), hidden=32, layers=1, seed=1)
    args = _config(tmp_path, divergence="fkl", divergence_kwargs={"ab_alpha": 0.5})
    with pytest.raises(ValueError, match=r"'fkl' has no parameter 'ab_alpha'; its parameters .* are: none"):
        DistillTrainer(model=model, teacher_model=copy.deepcopy(model), args=args,
                       train_dataset=Dataset.from_list(prompt_completion_rows(8)), processing_class=tokenizer)
