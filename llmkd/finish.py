"""Finishing a run: everything llmkd leaves in a run's output directory after training.

:func:`finish_run` ties the pieces together: the run summary and model card (:mod:`llmkd.hub`), the end-of-training
evaluation (:mod:`llmkd.evaluation`) and the training report (:mod:`llmkd.report`). It lives in a module of its own
so that the report and the hub do not import each other (the hub reads the report's plots; the report knows
nothing of the hub).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .evaluation import evaluate_after_training
from .hub import publish, run_summary, write_model_card, write_run_summary
from .report import write_report

logger = logging.getLogger(__name__)


def finish_run(trainer, method: str | None = None, *, push: bool = False) -> dict[str, Any]:
    """Everything a run leaves in its output directory after training (main process only), for any llmkd trainer
    (its ``args`` are read with getattr):

    1. ``llmkd_run.json``: what the run was (:func:`llmkd.hub.run_summary`);
    2. with ``eval_tasks``: the end-of-training evaluation (``results.json``, ``results.md``);
    3. with ``report`` (default True): ``report.html`` and its PNGs;
    4. the model card ``README.md``;
    5. with ``push``: :func:`llmkd.hub.publish` to ``hub_model_id`` (or the output folder's name) at
       ``hub_endpoint``, with ``hub_private_repo`` and ``hub_revision``.

    Returns ``{"results", "report", "card", "published"}`` (None for what was not done).
    """
    args = trainer.args
    output_dir = args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    summary = run_summary(args, method)
    write_run_summary(output_dir, summary)
    results = failure = None
    try:
        results = evaluate_after_training(trainer)
    except Exception as error:  # noqa: BLE001 - the report and card are still written, then the error is raised
        logger.error("The end-of-training evaluation failed (%s: %s); writing the report and card without it.",
                     type(error).__name__, error)
        failure = error
    report = None
    if getattr(args, "report", True):
        report = write_report(output_dir, trainer.state.log_history, results=results, summary=summary)
    repo_id = getattr(args, "hub_model_id", None) or os.path.basename(os.path.abspath(output_dir))
    card = write_model_card(output_dir, repo_id if push else None, summary=summary, results=results)
    if failure is not None:
        raise failure  # nothing is published from a run whose evaluation failed
    published = None
    if push:
        published = publish(output_dir, repo_id, private=getattr(args, "hub_private_repo", None),
                            revision=getattr(args, "hub_revision", None), endpoint=getattr(args, "hub_endpoint", None))
    return {"results": results, "report": report, "card": card, "published": published}
