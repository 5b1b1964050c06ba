"""lm-eval on an in-memory model: ``HFLM(pretrained=<model object>)`` + ``simple_evaluate`` with a ``TaskManager``
that knows llmkd's offline tasks."""

from __future__ import annotations

import logging
import math
from typing import Any

from .tasks import EvaluationError, task_manager

logger = logging.getLogger(__name__)


def _metric_name(key: str) -> str | None:
    """lm-eval result keys are ``metric,filter``; ``none`` is the unfiltered score. Standard errors are dropped."""
    metric, _, filter_name = key.partition(",")
    if metric.endswith("_stderr") or not filter_name:
        return None
    return metric if filter_name == "none" else f"{metric} ({filter_name})"


def lm_eval_scores(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {"metrics": {metric: value}, "higher_is_better": {metric: bool}, "samples": n}}`` from the dict
    ``simple_evaluate`` returns (group aggregates included as tasks of their own)."""
    scores: dict[str, dict[str, Any]] = {}
    for task, values in raw["results"].items():
        metrics = {}
        for key, value in values.items():
            name = _metric_name(key)
            if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[name] = float(value)
        if not metrics:
            continue
        better = raw.get("higher_is_better", {}).get(task, {})
        samples = raw.get("n-samples", {}).get(task, {})
        scores[task] = {
            "metrics": metrics,
            "higher_is_better": {m: bool(better.get(m.split(" (")[0], True)) for m in metrics},
            "samples": samples.get("effective") if isinstance(samples, dict) else None,
            "kind": "lm-eval",
        }
    return scores


def run_lm_eval(model, tokenizer, tasks: list[str], *, limit: int | float | None = None, batch_size: int = 16,
                device: str | None = None, include_path: str | None = None, seed: int = 0) -> dict[str, dict]:
    """Evaluate a causal LM object on lm-eval ``tasks`` (greedy, zero-shot as the task YAMLs say; ``limit`` examples
    per task). Returns :func:`lm_eval_scores` of the run.

    ``model``: a ``PreTrainedModel`` (kept on its device and put in eval mode); ``tokenizer``: its tokenizer.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if not tasks:
        raise EvaluationError("No lm-eval task to run: pass --tasks T1,T2 (e.g. llmkd_addition_exact_match).")
    manager = task_manager(tasks, include_path)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                  device=device or str(next(model.parameters()).device), trust_remote_code=False)
        raw = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    finally:
        model.train(was_training)
    scores = lm_eval_scores(raw)
    for task, entry in scores.items():
        bad = {m: v for m, v in entry["metrics"].items() if math.isnan(v)}
        if bad:
            logger.warning("lm-eval returned NaN for %s on %s", ", ".join(bad), task)
    return scores
