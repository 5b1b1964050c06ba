"""DHOTrainer end to end on tiny models: the loss falls and the weights change; alpha/beta are searched on the
validation split only, stored, kept by the best checkpoint and survive save/load; precomputed and online teacher
logits give the same loss; gradient accumulation equals one large batch; the single-head baseline; the tiny recipe
through the CLI; bad input fails clearly."""

from __future__ import annotations

import json
import os

import datasets
import pytest
import torch
from test_dho_support import (
    CLASS_NAMES,
    clip_processor,
    image_dataset,
    student_processor,
    tiny_student,
    tiny_vit_config,
    zero_shot_teacher,
)
from transformers import AutoModelForImageClassification

import llmkd.trainers.dho as dho_module
from llmkd import DHOConfig, DHOTrainer, DualHeadModel
from llmkd.models.dual_head import InferenceWeights, combine_head_predictions

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def teacher():
    return zero_shot_teacher()


@pytest.fixture(scope="module")
def splits():
    return {"train": image_dataset(64, seed=0), "validation": image_dataset(24, seed=1),
            "test": image_dataset(24, seed=2)}


def config(tmp_path, **overrides) -> DHOConfig:
    values = dict(output_dir=str(tmp_path / "run"), labeled="25%", per_device_train_batch_size=8,
                  per_device_eval_batch_size=16, num_train_epochs=1, learning_rate=1e-2, logging_steps=1,
                  save_strategy="no", eval_strategy="no", use_cpu=True, report_to="none", disable_tqdm=True,
                  seed=0, dataloader_num_workers=0)
    values.update(overrides)
    return DHOConfig(**values)


def make_trainer(tmp_path, teacher, splits, student=None, **overrides) -> DHOTrainer:
    return DHOTrainer(model=student if student is not None else tiny_student(seed=1), teacher_model=teacher,
                      args=config(tmp_path, **overrides), train_dataset=splits["train"],
                      eval_dataset=splits["validation"], processing_class=student_processor(),
                      teacher_processing_class=clip_processor())


def head_logits(model, dataset):
    """Both heads' logits on ``dataset``, computed here (independently of the trainer)."""
    pixels = student_processor()([image.convert("RGB") for image in dataset["image"]],
                                 return_tensors="pt")["pixel_values"]
    model.eval()
    with torch.no_grad():
        out = model(pixel_values=pixels)
    return out.ce_logits, out.kd_logits, torch.tensor(dataset["label"])


def test_training_lowers_the_loss_changes_the_weights_and_keeps_the_best_alpha_beta(tmp_path, teacher, splits):
    trainer = make_trainer(tmp_path, teacher, splits, num_train_epochs=4, eval_strategy="epoch",
                           save_strategy="epoch", load_best_model_at_end=True, save_total_limit=2)
    model = trainer.model
    assert len(trainer.labeled_dataset) == 16 and len(trainer.unlabeled_dataset) == 48
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()

    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 24  # 48 items per epoch / batch 8 x 4 epochs
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert {"ce_loss", "kd_labeled_loss", "kd_unlabeled_loss"} <= set(trainer.state.log_history[0])
    after = model.state_dict()
    for prefix in ("backbone.", "ce_head.", "kd_head."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher.state_dict().items())

    # the best checkpoint's alpha/beta came back with its weights
    best = trainer.state.best_model_checkpoint
    saved = json.loads(open(os.path.join(best, "config.json")).read())
    assert (model.config.alpha, model.config.beta) == (saved["alpha"], saved["beta"])
    evaluations = [log for log in trainer.state.log_history if "eval_accuracy" in log]
    best_eval = max(evaluations, key=lambda log: log["eval_accuracy"])  # first best: later ties do not replace it
    assert (saved["alpha"], saved["beta"]) == (best_eval["eval_alpha"], best_eval["eval_beta"])

    # save / load: the saved student predicts exactly as the trained one, with the same alpha/beta
    trainer.save_model(str(tmp_path / "final"))
    loaded = AutoModelForImageClassification.from_pretrained(str(tmp_path / "final"))
    assert type(loaded) is DualHeadModel and (loaded.config.alpha, loaded.config.beta) == (saved["alpha"],
                                                                                             saved["beta"])
    pixels = student_processor()([i.convert("RGB") for i in splits["test"]["image"]], return_tensors="pt")[
        "pixel_values"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def near_ties(probs: torch.Tensor, gap: float = 1e-5) -> int:
    """Rows whose two largest entries are within ``gap``: their argmax may differ between two float32 evaluations of
    the same model in other batch shapes (the logits then differ by ~1e-7)."""
    top2 = probs.topk(2, dim=-1).values
    return int(((top2[:, 0] - top2[:, 1]) < gap).sum())


def test_alpha_beta_search_sees_only_the_validation_split(tmp_path, teacher, splits, monkeypatch):
    seen = []

    def spy(ce_logits, kd_logits, labels, *args, **kwargs):
        seen.append((ce_logits.clone(), kd_logits.clone(), labels.clone()))
        return search_inference_weights(ce_logits, kd_logits, labels, *args, **kwargs)

    search_inference_weights = dho_module.search_inference_weights
    monkeypatch.setattr(dho_module, "search_inference_weights", spy)
    trainer = make_trainer(tmp_path, teacher, splits, max_steps=6)
    trainer.train()
    metrics = trainer.evaluate()
    assert len(seen) == 1 and seen[0][2].tolist() == splits["validation"]["label"]

    # the searched logits are the model's on the validation split (recomputed in one batch: float32 noise only)...
    ce, kd, labels = head_logits(trainer.model, splits["validation"])
    torch.testing.assert_close(seen[0][0], ce, rtol=1e-5, atol=1e-5 * ce.abs().max().item())
    torch.testing.assert_close(seen[0][1], kd, rtol=1e-5, atol=1e-5 * kd.abs().max().item())
    # ... and the stored weights are the search's result on exactly those logits (the grid's argmax and tie-break are
    # discrete: searching the recomputed logits could flip a near-tie, so the same tensors are searched again)
    expected = search_inference_weights(*seen[0])
    assert (trainer.model.config.alpha, trainer.model.config.beta) == (expected.alpha, expected.beta)
    assert (metrics["eval_alpha"], metrics["eval_beta"]) == (expected.alpha, expected.beta)
    assert metrics["eval_accuracy"] == pytest.approx(expected.accuracy)

    # a test split is scored with the stored weights and never searched
    test_metrics = trainer.evaluate(splits["test"], metric_key_prefix="test")
    assert len(seen) == 1
    assert (trainer.model.config.alpha, trainer.model.config.beta) == (expected.alpha, expected.beta)
    ce_t, kd_t, labels_t = head_logits(trainer.model, splits["test"])
    combined = combine_head_predictions(ce_t, kd_t, expected.alpha, expected.beta)
    accuracy = (combined.argmax(-1) == labels_t).double().mean().item()
    # recomputed in other batches: only rows with a near-tie can change their prediction
    assert test_metrics["test_accuracy"] == pytest.approx(accuracy, abs=near_ties(combined) / len(labels_t) + 1e-12)


def test_the_best_checkpoint_brings_back_its_own_alpha_beta(tmp_path, teacher, splits, monkeypatch):
    """The weights never change (learning rate 0); the first evaluation stores the best grid point, later ones the
    worst. The best checkpoint is the first, and after training the model holds ITS alpha/beta, not the last
    evaluation's."""
    real_search = dho_module.search_inference_weights
    calls = []

    def first_best_then_worst(ce_logits, kd_logits, labels, alphas, betas):
        found = real_search(ce_logits, kd_logits, labels, alphas, betas)
        calls.append(found)
        if len(calls) == 1:
            return found
        i, j = divmod(int(found.accuracies.argmin()), found.accuracies.shape[1])
        return InferenceWeights(alpha=alphas[i], beta=betas[j], accuracy=float(found.accuracies.min()), nll=0.0,
                                accuracies=found.accuracies)

    monkeypatch.setattr(dho_module, "search_inference_weights", first_best_then_worst)
    trainer = make_trainer(tmp_path, teacher, splits, num_train_epochs=3, learning_rate=0.0, eval_strategy="epoch",
                           save_strategy="epoch", load_best_model_at_end=True)
    trainer.train()
    assert len(calls) == 3 and calls[0].accuracies.min() < calls[0].accuracies.max()
    evaluations = [log for log in trainer.state.log_history if "eval_accuracy" in log]
    assert evaluations[0]["eval_accuracy"] > evaluations[-1]["eval_accuracy"]
    assert (evaluations[-1]["eval_alpha"], evaluations[-1]["eval_beta"]) != (calls[0].alpha, calls[0].beta)
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-6")  # the first epoch's
    assert (trainer.model.config.alpha, trainer.model.config.beta) == (calls[0].alpha, calls[0].beta)


def test_a_resumed_run_starts_from_its_checkpoints_alpha_beta(tmp_path, teacher, splits):
    first = make_trainer(tmp_path, teacher, splits, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = json.loads((checkpoint / "config.json").read_text())
    saved["alpha"], saved["beta"] = 0.65, 1.75  # as if that checkpoint's evaluation had chosen them
    (checkpoint / "config.json").write_text(json.dumps(saved))
    resumed = make_trainer(tmp_path, teacher, splits, max_steps=3)
    assert (resumed.model.config.alpha, resumed.model.config.beta) == (0.4, 0.5)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert (resumed.model.config.alpha, resumed.model.config.beta) == (0.65, 1.75)


def test_precomputed_and_online_teacher_logits_give_the_same_loss(tmp_path, teacher, splits):
    losses = []
    for precompute in (True, False):
        trainer = make_trainer(tmp_path, teacher, splits, precompute_teacher_logits=precompute)
        batch = next(iter(trainer.get_train_dataloader()))
        assert ("teacher_logits" in batch) == precompute and ("teacher_pixel_values" in batch) == (not precompute)
        trainer.model.eval()  # BatchNorm in eval mode: the same function of the inputs in both runs
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_any_image_classifier_can_be_the_teacher_by_name(tmp_path, splits):
    """A ViT image classifier saved with its image processor, named in the config: loaded with
    AutoModelForImageClassification, its logits on its own pixels precomputed for every labeled/unlabeled row."""
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    vit_config = tiny_vit_config()
    vit_config.num_labels = len(CLASS_NAMES)
    classifier = ViTForImageClassification(vit_config).eval()
    classifier.save_pretrained(tmp_path / "classifier")
    clip_processor().save_pretrained(tmp_path / "classifier")
    trainer = DHOTrainer(model=tiny_student(), args=config(tmp_path, teacher_model_name_or_path=str(
        tmp_path / "classifier")), train_dataset=splits["train"], processing_class=student_processor())
    # the labeled + unlabeled rows' teacher logits are the classifier's logits on the 64 train images (any order)
    pixels = clip_processor()([i.convert("RGB") for i in splits["train"]["image"]], return_tensors="pt")[
        "pixel_values"]
    with torch.no_grad():
        expected = classifier(pixel_values=pixels).logits
    cached = torch.cat([torch.from_numpy(trainer.labeled_dataset.logits),
                        torch.from_numpy(trainer.unlabeled_dataset.logits)])
    order = lambda rows: rows[torch.argsort(rows[:, 0])]  # noqa: E731 - sort rows by their first logit
    assert cached.shape == expected.shape
    torch.testing.assert_close(order(cached), order(expected), rtol=1e-5, atol=1e-5)
    trainer.args.max_steps = 2
    trainer.train()
    assert trainer.state.log_history[0]["kd_unlabeled_loss"] > 0


def test_gradient_accumulation_equals_one_large_batch(tmp_path, teacher, splits):
    """A ViT student (no BatchNorm): 1 step of batch 8 == 1 step of 2 x 4 accumulated, with SGD."""
    weights = []
    for batch, steps in ((8, 1), (4, 2)):
        trainer = make_trainer(tmp_path, teacher, splits, student=tiny_student(tiny_vit_config(), seed=2),
                               per_device_train_batch_size=batch, gradient_accumulation_steps=steps, max_steps=1,
                               optim="sgd", learning_rate=0.5, lr_scheduler_type="constant", weight_decay=0.0)
        trainer.train()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    changed = [k for k in weights[0] if not torch.equal(weights[0][k], tiny_student(tiny_vit_config(),
                                                                                     seed=2).state_dict()[k])]
    assert changed
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-6)


def test_single_head_baseline_trains_only_the_ce_head(tmp_path, teacher, splits):
    trainer = make_trainer(tmp_path, teacher, splits, single_head=True, max_steps=4)
    kd_before = trainer.model.kd_head.weight.clone()
    ce_before = trainer.model.ce_head.weight.clone()
    trainer.train()
    assert torch.equal(trainer.model.kd_head.weight, kd_before)
    assert not torch.equal(trainer.model.ce_head.weight, ce_before)
    metrics = trainer.evaluate()
    assert (metrics["eval_alpha"], metrics["eval_beta"]) == (1.0, 1.0) and "eval_kd_head_accuracy" not in metrics
    assert metrics["eval_accuracy"] == metrics["eval_ce_head_accuracy"]


def test_tiny_recipe_through_the_cli(tmp_path):
    from llmkd.cli import main

    def map_caches():  # datasets' map() caches written next to on-disk data under recipes/
        return {os.path.join(root, name) for root, _, files in os.walk(os.path.join(ROOT, "recipes"))
                for name in files if name.startswith("cache-")}

    before = map_caches()  # other recipes' tests (MoE VLM) may have left some: only this run's count
    output = tmp_path / "cli"
    cwd = os.getcwd()
    os.chdir(ROOT)  # the recipe names its assets relative to the repository root
    try:
        assert main(["train", "--config", "recipes/dho/tiny.yaml", "--output_dir", str(output), "--max_steps", "6",
                     "--eval_strategy", "steps", "--eval_steps", "3", "--save_strategy", "steps", "--save_steps",
                     "3", "--disable_tqdm", "true"]) == 0
    finally:
        os.chdir(cwd)
    saved = json.loads((output / "config.json").read_text())
    assert saved["model_type"] == "llmkd_dual_head" and saved["id2label"]["7"] == "seven"
    assert os.path.isfile(output / "model.safetensors") and os.path.isfile(output / "preprocessor_config.json")
    model = AutoModelForImageClassification.from_pretrained(str(output))
    assert (model.config.alpha, model.config.beta) == (saved["alpha"], saved["beta"])
    assert map_caches() == before  # nothing written next to the recipe's data


def test_labeled_unlabeled_and_validation_rows(tmp_path, teacher, splits):
    """A count of labeled rows spread over the classes; -1 rows and unlabeled_dataset join the unlabeled set;
    validation_size holds stratified rows out of both."""
    train = splits["train"].cast_column("label", datasets.Value("int64"))
    train = train.map(lambda row, i: {"label": -1 if i >= 56 else row["label"]}, with_indices=True)
    extra = splits["test"].remove_columns("label")
    trainer = DHOTrainer(model=tiny_student(), teacher_model=teacher,
                         args=config(tmp_path, labeled="8", validation_size="8", class_names=CLASS_NAMES),
                         train_dataset=train, unlabeled_dataset=extra, processing_class=student_processor(),
                         teacher_processing_class=clip_processor())
    assert len(trainer.eval_dataset) == 8 and sorted(trainer.eval_dataset[:]["labels"].tolist()) == [0, 0, 1, 1, 2,
                                                                                                       2, 3, 3]
    labeled = trainer.labeled_dataset
    assert len(labeled) == 8 and sorted(int(labeled[i]["labels"]) for i in range(8)) == [0, 0, 1, 1, 2, 2, 3, 3]
    # 64 train rows - 8 validation - 8 labeled (the 8 rows labeled -1 are unlabeled) + 24 extra images
    assert len(trainer.unlabeled_dataset) == 64 - 8 - 8 + 24
    assert len(trainer.train_dataset) == 72 and "unlabeled_teacher_logits" in trainer.train_dataset[0]
    # a fixed labeled list: every other row labeled -1, labeled="100%"
    fixed = DHOTrainer(model=tiny_student(), teacher_model=teacher,
                       args=config(tmp_path, labeled="100%", class_names=CLASS_NAMES), train_dataset=train,
                       processing_class=student_processor(), teacher_processing_class=clip_processor())
    assert (len(fixed.labeled_dataset), len(fixed.unlabeled_dataset)) == (56, 8)
    with pytest.raises(ValueError, match=r"does not match the train split's columns: it lacks \['image'\]"):
        DHOTrainer(model=tiny_student(), teacher_model=teacher, args=config(tmp_path),
                   train_dataset=splits["train"], unlabeled_dataset=datasets.Dataset.from_dict({"picture": [[1, 2]]}),
                   processing_class=student_processor(), teacher_processing_class=clip_processor())


def test_bad_input_fails_clearly(tmp_path, teacher, splits):
    with pytest.raises(ValueError, match="No unlabeled data: labeled='100%'"):
        make_trainer(tmp_path, teacher, splits, labeled="100%")
    with pytest.raises(ValueError, match="asks for more rows than the 64 available"):
        make_trainer(tmp_path, teacher, splits, labeled="65")
    with pytest.raises(ValueError, match="neither a count"):
        config(tmp_path, labeled="ten%")
    with pytest.raises(ValueError, match="remove_unused_columns must be False"):
        config(tmp_path, remove_unused_columns=True)
    with pytest.raises(ValueError, match=r"ce_weight \(lam\) must be in \[0, 1\]"):
        config(tmp_path, ce_weight=1.5)

    plain = datasets.Dataset.from_dict({"image": splits["train"]["image"][:16],
                                        "label": [0, 1, 2, 7] * 4})  # int labels, 7 is not a class
    with pytest.raises(ValueError, match=r"labels \[7\] outside \[0, 4\)"):
        DHOTrainer(model=tiny_student(), teacher_model=teacher, args=config(tmp_path), train_dataset=plain,
                   processing_class=student_processor(), teacher_processing_class=clip_processor())
    bad_validation = splits["validation"].cast_column("label", datasets.Value("int64")).map(
        lambda row: {"label": row["label"] + 4})
    with pytest.raises(ValueError, match="validation split has labels"):
        DHOTrainer(model=tiny_student(), teacher_model=teacher, args=config(tmp_path),
                   train_dataset=splits["train"], eval_dataset=bad_validation, processing_class=student_processor(),
                   teacher_processing_class=clip_processor())

    with pytest.raises(ValueError, match="3 class names were given but the student has 4 classes"):
        DHOTrainer(model=tiny_student(), teacher_model=teacher, args=config(tmp_path, class_names=["a", "b", "c"]),
                   train_dataset=splits["train"], processing_class=student_processor(),
                   teacher_processing_class=clip_processor())
    with pytest.raises(ValueError, match="teacher scores 3 classes but the student has 4"):
        DHOTrainer(model=tiny_student(), teacher_model=tiny_student(num_labels=3), args=config(tmp_path),
                   train_dataset=splits["train"], processing_class=student_processor())
    with pytest.raises(ValueError, match="ONE validation split"):
        DHOTrainer(model=tiny_student(), teacher_model=teacher, args=config(tmp_path), train_dataset=splits["train"],
                   eval_dataset={"a": splits["validation"], "b": splits["test"]}, processing_class=student_processor(),
                   teacher_processing_class=clip_processor())
    with pytest.raises(ValueError, match="No teacher"):
        DHOTrainer(model=tiny_student(), args=config(tmp_path), train_dataset=splits["train"],
                   processing_class=student_processor())
    with pytest.raises(TypeError, match="must be a DualHeadModel"):
        DHOTrainer(model=torch.nn.Linear(2, 2), teacher_model=teacher, args=config(tmp_path),
                   train_dataset=splits["train"], processing_class=student_processor())
    with pytest.raises(ValueError, match="image processor as processing_class"):
        DHOTrainer(model=tiny_student(), teacher_model=teacher, args=config(tmp_path), train_dataset=splits["train"])
