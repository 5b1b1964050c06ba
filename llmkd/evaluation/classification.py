"""Evaluation of classifier students (SinKD text classifiers, DHO image classifiers, ...) with ``evaluate`` metrics.

The metrics are ``evaluate.Metric`` modules computing scikit-learn's ``accuracy_score`` and ``f1_score``. They are
defined here rather than fetched with ``evaluate.load("accuracy")``: that call downloads a script from the Hub (no
network in CI, tests download nothing) and, before that, runs any ``accuracy/accuracy.py`` found in the working
directory.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable

import datasets
import evaluate
import torch
from tqdm.auto import tqdm

from .tasks import ClassificationTask, EvaluationError

_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


class Accuracy(evaluate.Metric):
    """Fraction of predictions equal to the references (scikit-learn ``accuracy_score``)."""

    def _info(self):
        return evaluate.MetricInfo(description=self.__doc__, citation="", inputs_description="int class ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references):
        from sklearn.metrics import accuracy_score

        return {"accuracy": float(accuracy_score(references, predictions))}


class F1(evaluate.Metric):
    """F1 of the positive class for two classes, the unweighted mean over classes (macro) for more
    (scikit-learn ``f1_score``)."""

    def _info(self):
        return evaluate.MetricInfo(description=self.__doc__, citation="", inputs_description="int class ids",
                                   features=_FEATURES)

    def _compute(self, predictions, references, num_labels: int = 2):
        from sklearn.metrics import f1_score

        average = "binary" if num_labels == 2 else "macro"
        return {"f1": float(f1_score(references, predictions, average=average,
                                     labels=list(range(num_labels)) if average == "macro" else None,
                                     zero_division=0))}


METRICS = {"accuracy": Accuracy, "f1": F1}


@torch.no_grad()
def predict_batches(model, batches: Iterable[dict]) -> tuple[list[int], list[int]]:
    """(predicted class ids, labels) of the argmax of ``model(**batch).logits`` ``(B, C)`` over ``batches`` (dicts
    with ``labels``; every other key is passed to the model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    predictions: list[int] = []
    references: list[int] = []
    try:
        for batch in tqdm(batches, desc="Scoring the classifier", unit="batch", leave=False):
            labels = batch["labels"]
            inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
                      if k != "labels"}
            logits = model(**inputs).logits  # (B, C)
            predictions.extend(logits.argmax(-1).tolist())
            references.extend(torch.as_tensor(labels).tolist())
    finally:
        model.train(was_training)
    return predictions, references


def classification_scores(predictions: list[int], references: list[int], num_labels: int,
                          metrics: tuple[str, ...] = ("accuracy", "f1")) -> dict[str, float]:
    scores: dict[str, float] = {}
    for name in metrics:
        if name not in METRICS:
            raise EvaluationError(f"Unknown classification metric {name!r}; llmkd has {sorted(METRICS)}.")
        module = METRICS[name]()
        kwargs = {"num_labels": num_labels} if name == "f1" else {}
        scores.update(module.compute(predictions=predictions, references=references, **kwargs))
    return scores


def model_kind(model) -> str:
    """``text_classification`` (a ``*ForSequenceClassification``), ``image_classification`` (a model whose forward
    takes ``pixel_values`` and no ``input_ids``: an image classifier, a DHO student, a CLIP zero-shot teacher) or
    ``causal_lm``."""
    from ..loading import detect_task

    if detect_task(model) == "sequence_classification":
        return "text_classification"
    parameters = _forward_parameters(model)
    if "pixel_values" in parameters and "input_ids" not in parameters:
        return "image_classification"
    return "causal_lm"


def load_rows(task: ClassificationTask, limit: int | None = None) -> datasets.Dataset:
    """The task's rows (the first ``limit``)."""
    path = task.data_path
    if os.path.isdir(path):
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            split = task.split or next((s for s in ("test", "validation") if s in loaded), None)
            if split not in loaded:
                raise EvaluationError(f"Classification task {task.name!r}: {path!r} has splits {sorted(loaded)}, "
                                      f"not {split!r}: name one as {path}:SPLIT.")
            loaded = loaded[split]
        rows = loaded
    elif os.path.isfile(path):
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[path.rsplit(".", 1)[-1]]
        rows = datasets.load_dataset(builder, data_files={"test": path})["test"]
    else:
        raise EvaluationError(f"Classification task {task.name!r}: {path!r} does not exist (llmkd's own data: "
                              "`python scripts/make_eval_tasks.py` regenerates eval/data).")
    if limit is not None:
        rows = rows.select(range(min(int(limit), len(rows))))
    return rows


def num_classes(model, rows: datasets.Dataset, label_column: str) -> int:
    """The number of classes: the dataset's ``ClassLabel`` when it has one, else the model's ``num_labels``
    (at least one more than the largest label)."""
    feature = rows.features.get(label_column) or rows.features.get("labels")
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    configured = int(getattr(getattr(model, "config", None), "num_labels", 2) or 2)
    column = label_column if label_column in rows.column_names else "labels"
    return max([configured] + [int(v) + 1 for v in rows[column]])


def evaluate_classifier(model, processing, task: ClassificationTask, *, limit: int | None = None,
                        batch_size: int = 64, max_length: int | None = 128) -> dict:
    """Accuracy and F1 of a text or image classifier on ``task``'s rows (the first ``limit`` of them).

    ``processing``: the tokenizer of a text classifier, the image processor of an image classifier."""
    from transformers import DataCollatorWithPadding

    from ..data.classification import prepare_classification_dataset

    rows = load_rows(task, limit)
    classes = num_classes(model, rows, task.label_column)
    image_model = model_kind(model) == "image_classification"
    if image_model != (task.image_column in rows.column_names):
        raise EvaluationError(
            f"Task {task.name!r} ({'images' if task.image_column in rows.column_names else 'text'}: columns "
            f"{rows.column_names}) does not fit the model, an {'image' if image_model else 'text'} classifier "
            f"({type(model).__name__}). Use llmkd_digits or a saved image dataset for image classifiers, "
            "llmkd_sentiment or GLUE-style rows for text classifiers.")
    if image_model:
        from ..data.images import ImageTransform

        transformed = rows.with_transform(ImageTransform(processing, image_column=task.image_column,
                                                         label_column=task.label_column))
        batches = (transformed[start : start + batch_size] for start in range(0, len(rows), batch_size))
    else:
        prepared = prepare_classification_dataset(rows, processing, max_length=max_length, num_labels=classes)
        if "token_type_ids" in prepared.column_names and "token_type_ids" not in _forward_parameters(model):
            prepared = prepared.remove_columns("token_type_ids")
        collate = DataCollatorWithPadding(processing)
        batches = (collate([prepared[i] for i in range(start, min(start + batch_size, len(prepared)))])
                   for start in range(0, len(prepared), batch_size))
    predictions, references = predict_batches(model, batches)
    return {"metrics": classification_scores(predictions, references, classes, task.metrics),
            "higher_is_better": {m: True for m in task.metrics}, "samples": len(references),
            "kind": "classification"}


def _forward_parameters(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)
