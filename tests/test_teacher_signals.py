"""Teacher signals (llmkd.teacher_signals): the trainer consumes any of them the same way, the online teacher runs
once per step on both paths, and a new kind of signal plugs in without touching the trainer or the losses."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from utils import make_tokenizer, prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer
from llmkd.losses import DenseTargets
from llmkd.teacher_signals import OnlineTeacher, TeacherSignal
from llmkd.teacher_signals.base import ready

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tokenizer()
    student = tiny_llama(len(tokenizer), hidden=32, layers=2, seed=1)
    teacher = tiny_llama(len(tokenizer) + 5, hidden=48, layers=2, seed=2)  # a padded head: aligned to the tokenizer
    return tokenizer, student, teacher, Dataset.from_list(prompt_completion_rows(16))


def trainer_for(tmp_path, setup, **overrides):
    tokenizer, student, teacher, dataset = setup
    args = DistillConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, report_to="none",
                         save_strategy="no", loss_chunk_size=7, max_length=64, disable_tqdm=True, temperature=1.5,
                         kd_ratio=0.6, **overrides)
    return DistillTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=args,
                          train_dataset=dataset, processing_class=tokenizer)


def batch_of(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(4)])


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "dense"])
def test_the_online_teacher_runs_once_per_step(tmp_path, setup, chunked):
    trainer = trainer_for(tmp_path, setup, use_chunked_loss=chunked)
    assert isinstance(trainer.teacher_signal, OnlineTeacher) and trainer.teacher is trainer.teacher_signal.model
    calls = []
    handle = trainer.teacher.register_forward_hook(lambda *_: calls.append(1))
    try:
        trainer.compute_loss(trainer.model, batch_of(trainer))
    finally:
        handle.remove()
    assert len(calls) == 1


class FixedLogitsTeacher(TeacherSignal):
    """A teacher known only by the logits it gives every batch: an example of a new kind of signal (the shape a
    served teacher or a precomputed one would take)."""

    def __init__(self, logits_of, vocab_size):
        self.logits_of, self.vocab_size, self.calls = logits_of, vocab_size, 0

    def token_targets(self, model_inputs, valid, *, dense=False):
        self.calls += 1
        return ready(DenseTargets(self.logits_of(model_inputs)[:, :-1][valid]))


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "dense"])
def test_a_new_kind_of_signal_plugs_in_without_changing_the_trainer(tmp_path, setup, chunked):
    trainer = trainer_for(tmp_path, setup, use_chunked_loss=chunked)
    batch = batch_of(trainer)
    online = trainer.compute_loss(trainer.model, dict(batch))
    teacher = trainer.teacher

    @torch.no_grad()
    def logits_of(model_inputs):
        inputs = {k: v for k, v in model_inputs.items() if k != "use_cache"}
        return teacher(**inputs).logits.float()

    trainer.teacher_signal = FixedLogitsTeacher(logits_of, trainer.vocab_size)
    other = trainer.compute_loss(trainer.model, dict(batch))
    assert trainer.teacher_signal.calls == 1
    # the same teacher, given as logits instead of hidden states and a head: the same loss
    assert other.item() == pytest.approx(online.item(), rel=1e-5)
    # and a different teacher gives a different loss (the signal's targets are what the loss uses)
    trainer.teacher_signal = FixedLogitsTeacher(lambda m: 2.0 * logits_of(m), trainer.vocab_size)
    assert abs(trainer.compute_loss(trainer.model, dict(batch)).item() - online.item()) > 1e-3


def test_the_interface_refuses_what_a_signal_does_not_give():
    with pytest.raises(NotImplementedError):
        TeacherSignal().token_targets({}, torch.zeros(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="sequence classifiers need a live teacher"):
        TeacherSignal().example_logits({})
