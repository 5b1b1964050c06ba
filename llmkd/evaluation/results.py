"""Evaluation results of a student (and its teacher): retention ratios, the markdown table, results.json.

``results`` layout (what ``results.json`` holds)::

    {"student": {"model": PATH, "scores": {task: {"metrics": {metric: value}, "higher_is_better": {...},
                                                  "samples": n, "kind": "lm-eval" | "classification"}}},
     "teacher": {... the same ...} | None,
     "retention": {task: {metric: ratio | None}},
     "settings": {"tasks": [...], "limit": n | None, ...}}

The retention ratio says how much of the teacher's score the student keeps: ``student / teacher`` for a metric where
higher is better (accuracy, exact match), ``teacher / student`` where lower is better (bits per byte; for a
perplexity, the ratio of its logarithms, i.e. of the cross-entropies), so that 1.0 is "as good as the teacher" and
0.5 "half as good" for every metric; above 1 the student does better than the teacher on that metric. It is
undefined (None) when the denominator is 0.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"


def retention_ratio(student: float, teacher: float, higher_is_better: bool, metric: str = "") -> float | None:
    """``student / teacher`` (higher is better) or ``teacher / student`` (lower is better). A perplexity is the
    exponential of a cross-entropy, so its ratio is taken on the logarithms (the ratio of the cross-entropies,
    which is what bits per byte gives too): the ratio of the perplexities themselves grows exponentially with
    the gap and says nothing readable (a 3.7x cross-entropy gap is a 1666x perplexity ratio)."""
    if "perplexity" in metric and student > 0 and teacher > 0:
        student, teacher = math.log(student), math.log(teacher)
    numerator, denominator = (student, teacher) if higher_is_better else (teacher, student)
    if denominator == 0 or any(math.isnan(x) or math.isinf(x) for x in (student, teacher)):
        return None
    return numerator / denominator


def retention(student_scores: dict, teacher_scores: dict) -> dict[str, dict[str, float | None]]:
    """``{task: {metric: ratio}}`` for every (task, metric) both models were scored on."""
    table: dict[str, dict[str, float | None]] = {}
    for task, entry in student_scores.items():
        if task not in teacher_scores:
            continue
        teacher_metrics = teacher_scores[task]["metrics"]
        table[task] = {
            metric: retention_ratio(value, teacher_metrics[metric], entry["higher_is_better"].get(metric, True), metric)
            for metric, value in entry["metrics"].items() if metric in teacher_metrics
        }
    return table


def combine(student: dict, teacher: dict | None, settings: dict[str, Any]) -> dict:
    """The results dict from ``{"model": ..., "scores": ...}`` of the student and (optionally) the teacher."""
    return {"student": student, "teacher": teacher,
            "retention": retention(student["scores"], teacher["scores"]) if teacher else {},
            "settings": settings}


def format_number(value: float | None) -> str:
    """A score as shown in the tables and plots: ``n/a`` for None / NaN, 4 decimals, scientific from 1e4 up."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1e4:
        return f"{value:.3e}"
    return f"{value:.4f}"


def rows(results: dict) -> list[dict[str, Any]]:
    """One row per (task, metric): task, metric, student, teacher, retention, higher_is_better, samples."""
    out = []
    teacher_scores = (results.get("teacher") or {}).get("scores", {})
    for task, entry in results["student"]["scores"].items():
        for metric, value in entry["metrics"].items():
            teacher_value = teacher_scores.get(task, {}).get("metrics", {}).get(metric)
            out.append({"task": task, "metric": metric, "student": value, "teacher": teacher_value,
                        "retention": results.get("retention", {}).get(task, {}).get(metric),
                        "higher_is_better": entry["higher_is_better"].get(metric, True),
                        "samples": entry.get("samples")})
    return out


def markdown_table(results: dict) -> str:
    """A GitHub-flavoured markdown table of the scores (with teacher and retention columns when there is a
    teacher)."""
    with_teacher = results.get("teacher") is not None
    header = ["task", "metric", "student"] + (["teacher", "retention"] if with_teacher else []) + ["n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows(results):
        arrow = "↑" if row["higher_is_better"] else "↓"
        cells = [row["task"], f"{row['metric']} {arrow}", format_number(row["student"])]
        if with_teacher:
            cells += [format_number(row["teacher"]), format_number(row["retention"])]
        cells.append("" if row["samples"] is None else str(row["samples"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, output_dir: str) -> tuple[str, str]:
    """Write ``results.json`` and ``results.md`` into ``output_dir``; return their paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path = os.path.join(output_dir, RESULTS_FILE)
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    table_path = os.path.join(output_dir, TABLE_FILE)
    with open(table_path, "w", encoding="utf-8") as handle:
        handle.write(markdown_table(results))
    return json_path, table_path


def read_results(output_dir: str) -> dict | None:
    """The ``results.json`` of an evaluation in ``output_dir``, or None."""
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    return results if isinstance(results, dict) and "student" in results else None
