"""Classifier students are scored with evaluate modules (accuracy, F1): values re-derived from the predictions, on
llmkd's offline sentiment task, on a data file, and on the trainer's own evaluation split at the end of training."""

from __future__ import annotations

import json
import os

import pytest
import torch
from datasets import Dataset
from utils import classification_rows, make_tokenizer, tiny_bert_classifier

from llmkd import DistillConfig, DistillTrainer
from llmkd.evaluation import EvaluationError, evaluate_paths
from llmkd.evaluation.classification import F1, Accuracy, classification_scores, predict_batches
from llmkd.evaluation.run import score_clip_teacher
from llmkd.finish import finish_run


def f1_by_hand(predictions, references, label):
    tp = sum(p == label and r == label for p, r in zip(predictions, references))
    fp = sum(p == label and r != label for p, r in zip(predictions, references))
    fn = sum(p != label and r == label for p, r in zip(predictions, references))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def test_metric_modules_compute_accuracy_and_f1():
    predictions = [0, 1, 1, 2, 2, 0, 1, 2]
    references = [0, 1, 2, 2, 1, 0, 0, 2]
    assert Accuracy().compute(predictions=predictions, references=references) == {"accuracy": 5 / 8}
    macro = sum(f1_by_hand(predictions, references, c) for c in range(3)) / 3
    assert F1().compute(predictions=predictions, references=references, num_labels=3)["f1"] == pytest.approx(macro)
    binary_p, binary_r = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert classification_scores(binary_p, binary_r, 2) == {
        "accuracy": pytest.approx(3 / 5), "f1": pytest.approx(f1_by_hand(binary_p, binary_r, 1))}
    with pytest.raises(EvaluationError, match="Unknown classification metric 'auc'"):
        classification_scores(binary_p, binary_r, 2, ("auc",))


def _save_classifier(folder, tokenizer, seed, num_labels=2):
    model = tiny_bert_classifier(len(tokenizer), seed=seed, num_labels=num_labels)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return model


def _direct_predictions(model, tokenizer, sentences):
    model.eval()
    with torch.no_grad():
        encoded = tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=128)
        encoded.pop("token_type_ids", None)
        return model(**encoded).logits.argmax(-1).tolist()


def test_classifier_on_the_offline_sentiment_task_with_retention(tmp_path):
    tokenizer = make_tokenizer()
    student = _save_classifier(tmp_path / "student", tokenizer, seed=1)
    _save_classifier(tmp_path / "teacher", tokenizer, seed=2)
    results = evaluate_paths(str(tmp_path / "student"), "llmkd_sentiment", teacher=str(tmp_path / "teacher"),
                             limit=40, output_dir=str(tmp_path / "out"), batch_size=16)
    rows = [json.loads(line) for line in open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "eval",
                                                             "data", "sentiment_held_out.jsonl"))][:40]
    predictions = _direct_predictions(student, tokenizer, [r["sentence"] for r in rows])
    labels = [r["label"] for r in rows]
    scores = results["student"]["scores"]["llmkd_sentiment"]
    assert scores["samples"] == 40 and scores["kind"] == "classification"
    assert scores["metrics"]["accuracy"] == pytest.approx(sum(p == y for p, y in zip(predictions, labels)) / 40)
    assert scores["metrics"]["f1"] == pytest.approx(f1_by_hand(predictions, labels, 1))
    teacher = results["teacher"]["scores"]["llmkd_sentiment"]["metrics"]
    assert results["retention"]["llmkd_sentiment"]["accuracy"] == pytest.approx(
        scores["metrics"]["accuracy"] / teacher["accuracy"])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["retention"] == results["retention"]


def test_classifier_on_a_data_file_three_labels(tmp_path):
    tokenizer = make_tokenizer()
    model = _save_classifier(tmp_path / "model", tokenizer, seed=3, num_labels=3)
    rows = [{"sentence": r["sentence"], "label": i % 3} for i, r in enumerate(classification_rows(30, seed=4))]
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = evaluate_paths(str(tmp_path / "model"), str(data), output_dir=str(tmp_path / "out"))
    predictions = _direct_predictions(model, tokenizer, [r["sentence"] for r in rows])
    labels = [r["label"] for r in rows]
    metrics = results["student"]["scores"][str(data)]["metrics"]  # keyed by the task as given
    assert metrics["f1"] == pytest.approx(sum(f1_by_hand(predictions, labels, c) for c in range(3)) / 3)
    assert results["teacher"] is None and results["retention"] == {}
    with pytest.raises(EvaluationError, match="not a classification task"):
        evaluate_paths(str(tmp_path / "model"), "llmkd_addition_choice", output_dir=str(tmp_path / "out2"))


def test_end_of_training_classifier_evaluation_on_the_eval_split(tmp_path, single_thread):
    tokenizer = make_tokenizer()
    train, held_out = classification_rows(32, seed=0), classification_rows(24, seed=1)
    args = DistillConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        report_to="none", save_strategy="no", logging_steps=1, learning_rate=1e-3, use_cpu=True,
        eval_tasks="eval_dataset,llmkd_sentiment", eval_limit=16,
    )
    trainer = DistillTrainer(model=tiny_bert_classifier(len(tokenizer), seed=1),
                             teacher_model=tiny_bert_classifier(len(tokenizer), seed=2), args=args,
                             train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(held_out),
                             processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    done = finish_run(trainer)
    results = done["results"]
    student = results["student"]["scores"]
    # the trainer's own accuracy on the same split agrees with evaluate's
    assert student["eval_dataset"]["metrics"]["accuracy"] == pytest.approx(trainer.evaluate()["eval_accuracy"])
    assert student["eval_dataset"]["samples"] == 24 and student["llmkd_sentiment"]["samples"] == 16
    predictions, labels = predict_batches(trainer.model, iter(trainer.get_eval_dataloader()))
    assert student["eval_dataset"]["metrics"]["f1"] == pytest.approx(f1_by_hand(predictions, labels, 1))
    assert set(results["retention"]) == {"eval_dataset", "llmkd_sentiment"}
    for name in ("results.json", "results.md", "report.html", "README.md", "llmkd_run.json"):
        assert (tmp_path / "run" / name).is_file(), name


DHO_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "assets",
                          "dho-tiny")


def test_image_classifier_dho_student_and_clip_teacher(tmp_path):
    """A DHO student (image classifier) on llmkd_digits; its CLIP teacher scored as a zero-shot classifier over the
    dataset's class names; both checked against direct predictions."""
    from datasets import load_from_disk
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from llmkd.models.clip_teacher import CLIPZeroShotClassifier

    torch.manual_seed(0)
    student = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(
        os.path.join(DHO_ASSETS, "student")))
    student.save_pretrained(str(tmp_path / "student"))
    processor = AutoImageProcessor.from_pretrained(os.path.join(DHO_ASSETS, "student"))
    processor.save_pretrained(str(tmp_path / "student"))
    teacher_path = os.path.join(DHO_ASSETS, "teacher")
    results = evaluate_paths(str(tmp_path / "student"), "llmkd_digits", teacher=teacher_path, limit=48,
                             output_dir=str(tmp_path / "out"), batch_size=16)

    rows = load_from_disk(os.path.join(DHO_ASSETS, "digits"))["test"].select(range(48))
    labels = list(rows["label"])
    images = [image.convert("RGB") for image in rows["image"]]
    student.eval()
    with torch.no_grad():
        predicted = student(pixel_values=processor(images, return_tensors="pt")["pixel_values"]).logits.argmax(-1)
    teacher = CLIPZeroShotClassifier.from_pretrained(teacher_path, rows.features["label"].names)
    with torch.no_grad():
        teacher_pixels = AutoImageProcessor.from_pretrained(teacher_path)(images, return_tensors="pt")["pixel_values"]
        teacher_predicted = teacher(pixel_values=teacher_pixels).logits.argmax(-1)
    accuracy = results["student"]["scores"]["llmkd_digits"]["metrics"]["accuracy"]
    teacher_accuracy = results["teacher"]["scores"]["llmkd_digits"]["metrics"]["accuracy"]
    assert accuracy == pytest.approx(sum(p == y for p, y in zip(predicted.tolist(), labels)) / 48)
    assert teacher_accuracy == pytest.approx(sum(p == y for p, y in zip(teacher_predicted.tolist(), labels)) / 48)
    assert teacher_accuracy > 0.5  # the shipped zero-shot teacher knows the digits
    macro = sum(f1_by_hand(predicted.tolist(), labels, c) for c in range(10)) / 10
    assert results["student"]["scores"]["llmkd_digits"]["metrics"]["f1"] == pytest.approx(macro)
    assert results["retention"]["llmkd_digits"]["accuracy"] == pytest.approx(accuracy / teacher_accuracy)
    with pytest.raises(EvaluationError, match="does not fit the model, an image classifier"):
        evaluate_paths(str(tmp_path / "student"), "llmkd_sentiment", limit=4, output_dir=str(tmp_path / "out2"))
    with pytest.raises(EvaluationError, match="image classification tasks only"):
        score_clip_teacher(teacher_path, ["llmkd_addition_choice"], limit=4)


def test_failed_end_of_training_evaluation_still_leaves_report_and_card(tmp_path, single_thread):
    tokenizer = make_tokenizer()
    args = DistillConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=8,
                         report_to="none", save_strategy="no", use_cpu=True, eval_tasks="llmkd_addition_choice",
                         push_to_hub=False)
    trainer = DistillTrainer(model=tiny_bert_classifier(len(tokenizer), seed=1),
                             teacher_model=tiny_bert_classifier(len(tokenizer), seed=2), args=args,
                             train_dataset=Dataset.from_list(classification_rows(16)), processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    with pytest.raises(EvaluationError, match="not a classification task"):
        finish_run(trainer)
    assert (tmp_path / "run" / "report.html").is_file() and (tmp_path / "run" / "README.md").is_file()
    assert not (tmp_path / "run" / "results.json").exists()
