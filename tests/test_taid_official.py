"""llmkd's TAID schedule against a transcription of the official code's update (SakanaAI/TAID, arXiv 2501.16937).

What the official code does (src/distil_losses/taid.py and src/model.py of SakanaAI/TAID, read for this test and
re-expressed below in our own code):
- its loss is the micro-batch's token mean of the cross-entropy ``-sum_v p_t log q`` (``forward_kl`` with
  ``teacher_probs = p_t``), computed with the current t; right after, in the same forward, t is updated from that
  loss, so the t of step n's loss is the one left by the update of step n - 1;
- the update's step index is Lightning's ``trainer.global_step`` at the time of the forward: the number of
  optimizer steps completed before it (0 at the first step); ``num_train_steps`` is the run's optimizer steps;
- its state starts at ``t = t_start``, ``momentum = 0``, ``prev_loss = inf``; the first call only stores the loss;
- later calls: relative change ``(prev - J) / (prev + 1e-15)``, momentum EMA with beta, ``dt = alpha *
  sigmoid(m) * (1 - t)``, the floor ``t_start + (t_end - t_start) * step / num_train_steps``,
  ``t = min(t_end, max(floor, t + dt))``; with ``disable_adaptive`` t is the floor (the momentum still moves).

The transcription runs in float64 here (the official buffers are float32; docs/TAID.md gives the measured effect).
A trainer-level test checks that TAIDTrainer, with one process and no gradient accumulation, feeds its schedule
exactly the official input, computed by hand from full logits, and follows the transcription's t.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from utils import prompt_completion_rows, tiny_llama

from llmkd import TAIDConfig, TAIDTrainer
from llmkd.losses import TAIDSchedule


class OfficialUpdate:
    """The official ``TAID.update_t`` re-expressed with torch 0-dim tensors of ``dtype`` (float32 in the official
    code's buffers; float64 for the exactness tests)."""

    def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, disable_adaptive=False, dtype=torch.float64):
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.disable_adaptive = disable_adaptive
        self.t = torch.tensor(t_start, dtype=dtype)
        self.prev_loss = torch.tensor(float("inf"), dtype=dtype)
        self.momentum = torch.zeros((), dtype=dtype)

    def __call__(self, loss: float, global_step: int, num_train_steps: int) -> None:
        loss = torch.tensor(loss, dtype=self.t.dtype)
        if torch.isinf(self.prev_loss):  # the first call: remember the loss, nothing else
            self.prev_loss = loss
            return
        change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * change
        push = self.alpha * torch.sigmoid(self.momentum) * (1 - self.t)
        floor = self.t_start + (self.t_end - self.t_start) * (global_step / num_train_steps)
        if self.disable_adaptive:
            new_t = floor
        else:
            new_t = min(self.t_end, max(floor, self.t + push))
        self.t = torch.as_tensor(new_t, dtype=self.t.dtype)
        self.prev_loss = loss


def official_run(losses, num_train_steps, **settings):
    """(t before each step's loss, t after each update, momentum after each update) of the official rule."""
    update = OfficialUpdate(**settings)
    used, ts, ms = [], [], []
    for step, loss in enumerate(losses):  # global_step of step n is n: the optimizer steps completed before it
        used.append(float(update.t))
        update(loss, step, num_train_steps)
        ts.append(float(update.t))
        ms.append(float(update.momentum))
    return used, ts, ms


def llmkd_run(losses, num_train_steps, step_offset=0, **settings):
    schedule = TAIDSchedule(**settings)
    ts, ms = [], []
    for step, loss in enumerate(losses):
        ts.append(schedule.update(loss, step + step_offset, num_train_steps))
        ms.append(schedule.momentum)
    return ts, ms


def noisy_decaying_losses(n=20000, seed=0, entropy=2.5):
    """A cross-entropy-like sequence: a target entropy plus a KL that decays with noise, then rises for a while.
    At the default alpha the adaptive push beats the floor only in runs long enough that the floor's slope
    (t_end - t_start) / n is below alpha * sigmoid(m) * (1 - t), hence 20000 steps (official runs are that long)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    steps = torch.arange(n, dtype=torch.float64)
    kl = 1.5 * torch.exp(-steps / (n / 6)) + 0.2
    kl = kl + 0.15 * ((steps > n * 0.45) & (steps < n * 0.55))  # the loss rises for a while
    return (entropy + kl * (1 + 0.08 * noise)).tolist()


# Both sides do the same float64 operations; only torch.sigmoid and 1 / (1 + exp(-m)) may round differently (an
# ulp or two). Neither recursion amplifies an error (m is an average with weight beta < 1; t + dt has slope
# 1 - alpha * sigmoid(m) <= 1 in t, and min/max are 1-Lipschitz), so after 20000 steps the gap is at most about
# 20000 * 2 ulp(1) ~ 1e-11.
FLOAT64_ATOL = 1e-11

SETTINGS = {
    "defaults": dict(t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99),
    "fast_capped": dict(t_start=0.2, t_end=0.8, alpha=5e-3, beta=0.9),
    "linear_only": dict(t_start=0.2, t_end=1.0, alpha=5e-4, beta=0.99, disable_adaptive=True),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_schedule_is_the_official_update_step_by_step(name):
    settings = SETTINGS[name]
    losses = noisy_decaying_losses()
    _, want_t, want_m = official_run(losses, len(losses), **settings)
    got_t, got_m = llmkd_run(losses, len(losses), **settings)
    assert got_t == pytest.approx(want_t, rel=0, abs=FLOAT64_ATOL)
    assert got_m == pytest.approx(want_m, rel=0, abs=FLOAT64_ATOL)
    floors = [TAIDSchedule(**settings).linear_floor(step, len(losses)) for step in range(len(losses))]
    if not settings.get("disable_adaptive"):
        # both branches of max(floor, t + dt) occur, and the cap too where t_end < 1: the comparison can fail
        # on each of them
        assert any(t > f + 1e-9 for t, f in zip(got_t, floors)) and any(t == f for t, f in zip(got_t, floors))
        if settings["t_end"] < 1.0:
            assert got_t[-1] == settings["t_end"]
    else:
        assert got_t[1:] == pytest.approx(floors[1:], rel=0, abs=1e-15)


def test_the_step_index_is_the_officials():
    """The official floor reads the optimizer steps completed before the step (0 at the first); one step ahead
    (what the Trainer's global_step is in on_step_end) leads the floor by (t_end - t_start) / max_steps."""
    losses = [2.0] * 50  # no relative change: t is the floor alone
    _, want_t, _ = official_run(losses, 50, alpha=5e-4, beta=0.99)
    got_t, _ = llmkd_run(losses, 50, alpha=5e-4, beta=0.99)
    ahead_t, _ = llmkd_run(losses, 50, step_offset=1, alpha=5e-4, beta=0.99)
    assert got_t == pytest.approx(want_t, rel=0, abs=1e-15)
    assert ahead_t[10] - want_t[10] == pytest.approx(0.6 / 50, abs=1e-6)  # the off-by-one this test guards


def test_first_step_and_order():
    """The first update only stores the loss: steps 0 and 1 both use t_start; step n uses the t of update n - 1."""
    losses = noisy_decaying_losses(n=40)
    used, after, _ = official_run(losses, 40, alpha=0.05, beta=0.5)
    assert used[0] == used[1] == pytest.approx(0.4) and after[0] == pytest.approx(0.4)
    assert used[1:] == after[:-1]
    schedule = TAIDSchedule(alpha=0.05, beta=0.5)
    for step, loss in enumerate(losses):
        assert schedule.t == pytest.approx(used[step], rel=0, abs=FLOAT64_ATOL)  # the t step `step` would use
        schedule.update(loss, step, 40)


def test_feeding_the_kl_is_a_different_schedule():
    """What the official schedule sees is KL + H(p_t): fed the KL alone, the relative changes are larger and t runs
    ahead (the reason schedule_loss defaults to the cross-entropy)."""
    losses = noisy_decaying_losses()
    kl = [loss - 2.5 for loss in losses]  # the same run's KL: the entropy term removed
    _, want_t, want_m = official_run(losses, len(losses), alpha=5e-4, beta=0.99)
    got_t, got_m = llmkd_run(kl, len(losses), alpha=5e-4, beta=0.99, schedule_loss="kl")
    assert max(abs(a - b) for a, b in zip(got_t, want_t)) > 1e-4
    assert max(abs(m) for m in got_m) > 3 * max(abs(m) for m in want_m)


# ------------------------------------------------------------------------------------------ the trainer level
@pytest.fixture(scope="module")
def models(tokenizer):
    return tiny_llama(len(tokenizer), hidden=32, seed=1), tiny_llama(len(tokenizer), hidden=48, seed=2)


def official_step_losses(student, teacher, inputs, t):
    """The official loss of one micro-batch from full logits, by hand, and the KL, both token means over the
    valid positions: p_t = softmax((1 - t) z_s + t z_t) in float32, CE = -sum p_t log q,
    KL = sum p_t (log p_t - log q)."""
    with torch.no_grad():
        s = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].float()
        z = teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1].float()
        mask = inputs["labels"][:, 1:] != -100
        log_p_t = torch.log_softmax((1 - t) * s + t * z, dim=-1)
        log_q = torch.log_softmax(s, dim=-1)
        cross_entropy = -(log_p_t.exp() * log_q).sum(-1)
        kl = (log_p_t.exp() * (log_p_t - log_q)).sum(-1)
    return cross_entropy[mask].mean().item(), kl[mask].mean().item()


@pytest.mark.parametrize("schedule_loss", ["cross_entropy", "kl"])
def test_the_trainer_feeds_the_official_input_and_follows_the_official_t(tmp_path, tokenizer, models,
                                                                           schedule_loss):
    student, teacher = (copy.deepcopy(m) for m in models)
    steps = 10
    args = TAIDConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                      max_steps=steps, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                      seed=0, disable_tqdm=True, t_start=0.4, alpha=0.3, beta=0.5, loss_chunk_size=16,
                      schedule_loss=schedule_loss)
    trainer = TAIDTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_list(prompt_completion_rows(48)), processing_class=tokenizer)
    by_hand, used_t, fed, after = [], [], [], []
    compute_loss = trainer.compute_loss

    def spying_compute_loss(model, inputs, *rest, **kwargs):
        if model.training:  # before the step's optimizer update: the weights and t this step's loss uses
            used_t.append(trainer.schedule.t)
            by_hand.append(official_step_losses(model, trainer.teacher, inputs, trainer.schedule.t))
        return compute_loss(model, inputs, *rest, **kwargs)

    update = trainer.schedule.update

    def spying_update(loss, step, max_steps):
        fed.append((loss, step, max_steps))
        after.append(update(loss, step, max_steps))
        return after[-1]

    trainer.compute_loss = spying_compute_loss
    trainer.schedule.update = spying_update
    trainer.train()

    assert [(step, total) for _, step, total in fed] == [(n, steps) for n in range(steps)]
    official_ce = [ce for ce, _ in by_hand]
    kl_by_hand = [kl for _, kl in by_hand]
    fed_losses = [loss for loss, _, _ in fed]
    # The CE: float32 both; the trainer's logits come from the same matmuls in chunks and its CE is KL + H summed
    # over the tokens; each is a float32 sum over V = 320 entries (pairwise, error ~ log2(V) eps ~ 1e-6 relative)
    # of a CE of a few nats, so 2e-5 relative leaves a tenfold margin.
    # The KL (about 2e-3 here) is a difference of O(10)-nat terms on the closed-form path (<p, y> - lse(y) -
    # <p, z> + lse(z)): its absolute error is a few eps * 10 ~ 5e-6 at most, which bounds its comparison.
    if schedule_loss == "cross_entropy":
        assert fed_losses == pytest.approx(official_ce, rel=2e-5)
    else:
        assert fed_losses == pytest.approx(kl_by_hand, rel=0, abs=5e-6)
    # the logs: kd_loss stays the KL, taid_ce is the official loss (both rounded to 6 decimals)
    logs = [e for e in trainer.state.log_history if "taid_ce" in e]
    assert [e["kd_loss"] for e in logs] == pytest.approx(kl_by_hand, rel=0, abs=5e-6)
    assert [e["taid_ce"] for e in logs] == pytest.approx(official_ce, rel=2e-5, abs=1e-6)

    # the t sequence: the transcription fed the trainer's own values agrees to float64 round-off
    settings = dict(t_start=0.4, alpha=0.3, beta=0.5)
    used_official, official_t, _ = official_run(fed_losses, steps, **settings)
    assert after == pytest.approx(official_t, rel=0, abs=1e-14)
    assert used_t == pytest.approx(used_official, rel=0, abs=1e-14)  # the t each step's loss used: the order
    # alpha = 0.3 makes the adaptive push beat the floor's 0.06 per step early on, and the floor win later: the
    # comparison covers both branches
    floors = [0.4 + 0.6 * n / steps for n in range(steps)]
    assert any(t > f + 1e-3 for t, f in zip(after, floors)) and after[-1] == pytest.approx(floors[-1])
    if schedule_loss == "cross_entropy":
        # fed the CE computed by hand it agrees within what their 2e-5 relative difference allows: each relative
        # change differs by at most 2 * 2e-5 * (1 + |change|) ~ 5e-5, so |m gap| <= 5e-5 and
        # |t gap| <= steps * alpha * max sigmoid' * |m gap| = 10 * 0.3 * 0.25 * 5e-5 ~ 4e-5
        _, by_hand_t, _ = official_run(official_ce, steps, **settings)
        assert after == pytest.approx(by_hand_t, rel=0, abs=4e-5)
