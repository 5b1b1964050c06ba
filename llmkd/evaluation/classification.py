"""Evaluation of sequence-classifier students (SinKD classifiers, DHO, ...) with ``evaluate`` metrics.

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
        for batch in batches:
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


def _num_labels(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "num_labels", 2) or 2)


def evaluate_classifier(model, tokenizer, task: ClassificationTask, *, limit: int | None = None,
                        batch_size: int = 64, max_length: int | None = 128) -> dict:
    """Accuracy and F1 of a sequence classifier on ``task``'s rows (the first ``limit`` of them)."""
    from transformers import DataCollatorWithPadding

    from ..data.classification import prepare_classification_dataset

    if not task.data_file or not os.path.isfile(task.data_file):
        raise EvaluationError(f"Classification task {task.name!r}: data file {task.data_file!r} does not exist "
                              "(regenerate eval/data with `python scripts/make_eval_tasks.py`).")
    suffix = task.data_file.rsplit(".", 1)[-1]
    builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[suffix]
    rows = datasets.load_dataset(builder, data_files={"test": task.data_file})["test"]
    if limit is not None:
        rows = rows.select(range(min(int(limit), len(rows))))
    num_labels = _num_labels(model)
    prepared = prepare_classification_dataset(rows, tokenizer, max_length=max_length, num_labels=num_labels)
    if "token_type_ids" in prepared.column_names and "token_type_ids" not in _forward_parameters(model):
        prepared = prepared.remove_columns("token_type_ids")
    collate = DataCollatorWithPadding(tokenizer)
    batches = (collate([prepared[i] for i in range(start, min(start + batch_size, len(prepared)))])
               for start in range(0, len(prepared), batch_size))
    predictions, references = predict_batches(model, batches)
    return {"metrics": classification_scores(predictions, references, num_labels, task.metrics),
            "higher_is_better": {m: True for m in task.metrics}, "samples": len(references),
            "kind": "classification"}


def _forward_parameters(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)
