"""DHOConfig.separate_forwards: one student forward over the concatenated labeled and unlabeled batches (default,
as the official ImageNet scripts) or one forward per batch (as the official train_others.py).

- Without BatchNorm (a LayerNorm ViT) both give the same loss and gradients, and the trainer's gradient
  accumulation still equals one large batch.
- With BatchNorm (a tiny ResNet in train mode) they differ; each equals the DHO loss written here from the formula on
  its own forwards (values, gradients, BatchNorm running statistics), and the running statistics are updated twice
  per step with separate forwards, once without.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_dho_support import (
    clip_processor,
    image_dataset,
    student_processor,
    tiny_resnet_config,
    tiny_student,
    tiny_vit_config,
    zero_shot_teacher,
)

from llmkd import DHOConfig, DHOTrainer
from llmkd.recipes import RecipeError, load_config

pytestmark = pytest.mark.usefixtures("single_thread")
LAM, T = 0.3, 2.0  # ce_weight away from 0.5 so that a swapped CE/KD weight would show


@pytest.fixture(scope="module")
def teacher():
    return zero_shot_teacher()


@pytest.fixture(scope="module")
def train_split():
    return image_dataset(64, seed=0)


def make_trainer(tmp_path, teacher, train_split, backbone_config, separate_forwards, **overrides) -> DHOTrainer:
    values = dict(output_dir=str(tmp_path / "run"), labeled="25%", per_device_train_batch_size=8, max_steps=1,
                  learning_rate=1e-2, logging_steps=1, save_strategy="no", eval_strategy="no", use_cpu=True,
                  report_to="none", disable_tqdm=True, seed=0, dataloader_num_workers=0, ce_weight=LAM,
                  temperature=T, separate_forwards=separate_forwards)
    values.update(overrides)
    return DHOTrainer(model=tiny_student(backbone_config, seed=3), teacher_model=teacher, args=DHOConfig(**values),
                      train_dataset=train_split, processing_class=student_processor(),
                      teacher_processing_class=clip_processor())


def float64_batch(trainer) -> dict:
    """The trainer's first paired batch (precomputed teacher logits), pixels in float64 for a float64 student."""
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"pixel_values", "labels", "teacher_logits", "unlabeled_pixel_values",
            "unlabeled_teacher_logits"} <= set(batch)
    return {k: v.double() if k.endswith("pixel_values") else v for k, v in batch.items()}


def trainer_loss_and_gradients(trainer, batch):
    """The trainer's loss on ``batch`` with its float64 student in train mode, and every parameter's gradient."""
    model = trainer.model.double().train()
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def reference_loss(model, batch, separate_forwards: bool) -> torch.Tensor:
    """The DHO loss from the formula, on the student's own forwards (one per batch, or one over both):
    ``lam * mean CE(h_ce(z_l), y) + (1 - lam) * T^2 * [mean KL(p_t || q_kd) on x_l + the same on x_u]``."""
    x_l, x_u = batch["pixel_values"], batch["unlabeled_pixel_values"]
    if separate_forwards:
        labeled, unlabeled = model(pixel_values=x_l), model(pixel_values=x_u)
        ce_l, kd_l, kd_u = labeled.ce_logits, labeled.kd_logits, unlabeled.kd_logits
    else:
        both = model(pixel_values=torch.cat([x_l, x_u]))
        size = x_l.shape[0]
        ce_l, kd_l, kd_u = both.ce_logits[:size], both.kd_logits[:size], both.kd_logits[size:]

    def mean_kl(student, teacher):  # KL(p_t || q) per example, both softened by T, then the mean
        p = torch.softmax(teacher.double() / T, dim=-1)
        return (p * (torch.log(p) - torch.log_softmax(student / T, dim=-1))).sum(-1).mean()

    ce = -torch.log_softmax(ce_l, dim=-1).gather(1, batch["labels"].long()[:, None]).mean()
    return LAM * ce + (1 - LAM) * T**2 * (mean_kl(kd_l, batch["teacher_logits"]) +
                                          mean_kl(kd_u, batch["unlabeled_teacher_logits"]))


def batchnorm_buffers(model) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers() if name.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


def test_without_batchnorm_one_and_two_forwards_give_the_same_loss_and_gradients(tmp_path, teacher, train_split):
    results = []
    batch = None
    for separate in (False, True):
        trainer = make_trainer(tmp_path, teacher, train_split, tiny_vit_config(), separate)
        batch = float64_batch(trainer) if batch is None else batch  # the very same batch for both
        results.append(trainer_loss_and_gradients(trainer, batch))
    (loss_one, grads_one), (loss_two, grads_two) = results
    assert grads_one.keys() == grads_two.keys() and any(k.startswith("backbone.") for k in grads_one)
    assert {"ce_head.weight", "kd_head.weight"} <= grads_one.keys()
    # The backbones run in float64 on the same examples, in a batch of 16 or two of 8: reordered float64 sums differ
    # by ~1e-15 relative. dho_loss casts the logits to float32, where values that close round to the same float32
    # number (or, at a rounding boundary, to neighbours one ulp = 2^-23 ~ 1.2e-7 relative apart), and the rest of the
    # loss and of its gradient is the same float32 arithmetic on the same numbers: 1e-6 bounds a few such ulps.
    torch.testing.assert_close(loss_one, loss_two, rtol=1e-6, atol=0)
    for name in grads_one:
        torch.testing.assert_close(grads_one[name], grads_two[name], rtol=1e-6, atol=1e-9, msg=name)


def test_with_batchnorm_each_option_is_the_formula_on_its_own_forwards(tmp_path, teacher, train_split):
    losses, gradients, batch = {}, {}, None
    for separate in (False, True):
        trainer = make_trainer(tmp_path, teacher, train_split, tiny_resnet_config(), separate)
        batch = float64_batch(trainer) if batch is None else batch
        reference_model = copy.deepcopy(trainer.model).double().train()
        before = batchnorm_buffers(reference_model)
        assert before, "the ResNet student must have BatchNorm layers"
        loss, grads = trainer_loss_and_gradients(trainer, batch)

        expected = reference_loss(reference_model, batch, separate)
        expected.backward()
        # float64 logits on both sides; dho_loss evaluates the formula in float32 (logits cast to float32, ~10
        # operations on values of order 1 over 4 classes and 8 examples): a relative error of a few 1e-7 at most.
        # Its float32 gradient with respect to the logits carries that relative error linearly into every parameter
        # gradient through the float64 backbone, so an entry is off by at most ~1e-6 x the largest gradient entry.
        torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=0)
        largest = max(p.grad.abs().max() for p in reference_model.parameters()).item()
        for name, parameter in reference_model.named_parameters():
            torch.testing.assert_close(grads[name].double(), parameter.grad, rtol=0, atol=1e-6 * largest, msg=name)
        # the same BatchNorm updates, in the same order (labeled then unlabeled) with separate forwards
        after, reference_after = batchnorm_buffers(trainer.model), batchnorm_buffers(reference_model)
        for name, value in after.items():
            torch.testing.assert_close(value, reference_after[name], rtol=1e-12, atol=0, msg=name)
            if name.endswith("num_batches_tracked"):
                assert int(value - before[name]) == (2 if separate else 1), name
        losses[separate] = loss.item()
        gradients[separate] = torch.cat([g.flatten() for g in grads.values()])
    # BatchNorm couples the labeled and unlabeled images in one forward: the loss and the gradient differ far beyond
    # the 1e-6 rounding bound of the LayerNorm test (the fresh heads' logits are small, so the loss moves little)
    assert abs(losses[True] - losses[False]) > 1e-4 * abs(losses[False]), losses
    change = (gradients[True] - gradients[False]).norm() / gradients[False].norm()
    assert change > 1e-2, change


def test_separate_forwards_return_both_outputs(tmp_path, teacher, train_split):
    trainer = make_trainer(tmp_path, teacher, train_split, tiny_resnet_config(), True)
    batch = next(iter(trainer.get_train_dataloader()))
    _, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    labeled, unlabeled = outputs
    assert labeled.ce_logits.shape == unlabeled.kd_logits.shape == (8, 4)


@pytest.mark.parametrize("separate", [False, True])
def test_batchnorm_running_statistics_are_updated_once_or_twice_per_step(tmp_path, teacher, train_split, separate):
    trainer = make_trainer(tmp_path, teacher, train_split, tiny_resnet_config(), separate, max_steps=3)
    trainer.train()
    counts = {name: int(b) for name, b in trainer.model.named_buffers() if name.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {3 * (2 if separate else 1)}, counts
    assert trainer.state.log_history[0]["kd_unlabeled_loss"] > 0


def test_separate_forwards_keep_gradient_accumulation_equal_to_one_large_batch(tmp_path, teacher, train_split):
    """A ViT student with SGD: one step of batch 8 in one forward == one step of 2 x 4 accumulated with two
    forwards each (the num_items_in_batch normalisation is the same for both options)."""
    weights = []
    for batch, steps, separate in ((8, 1, False), (4, 2, True)):
        trainer = make_trainer(tmp_path, teacher, train_split, tiny_vit_config(), separate,
                               per_device_train_batch_size=batch, gradient_accumulation_steps=steps, optim="sgd",
                               learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0)
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.train()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert any(not torch.equal(weights[0][k], initial[k]) for k in initial)
    for key in weights[0]:
        # float32 sums over 8 examples in other groupings (4 + 4 vs 8, other batch shapes inside the ViT): a few
        # float32 ulps of each gradient entry, times the learning rate 0.5, far below these bounds
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6, msg=key)


def test_separate_forwards_is_a_recipe_key(tmp_path):
    recipe = tmp_path / "dho.yaml"
    recipe.write_text("method: dho\noutput_dir: out\nseparate_forwards: true\n")
    method, config = load_config(str(recipe))
    assert method == "dho" and config.separate_forwards is True
    _, config = load_config(str(recipe), ["--separate_forwards", "false"])
    assert config.separate_forwards is False
    assert DHOConfig(output_dir="out").separate_forwards is False  # default: one forward
    recipe.write_text("method: dho\noutput_dir: out\nseparate_forward: true\n")
    with pytest.raises(RecipeError, match="Unknown key 'separate_forward'.*Did you mean 'separate_forwards'"):
        load_config(str(recipe))
