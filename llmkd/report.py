"""The training report: ``report.html`` and PNG plots in a run's output directory.

The curves come from ``trainer.state.log_history`` (one dict per logging step / evaluation):

- ``losses.png``: the training objective (``loss``) and the evaluation loss (``eval_loss``);
- one PNG per method curve: every numeric log key that is not a standard Trainer key (``kd_loss``, ``ce_loss``,
  ``teacher_ce_loss``, TAID's ``taid_t``, SinKD's ``sinkhorn_loss``, an MoE run's per-expert loads, ...). A key and
  its ``eval_`` twin share a plot; keys that differ only by a trailing number (``moe_load_expert_0``,
  ``moe_load_expert_1``, ...) share one plot with a line each;
- ``evaluation.png``: student (and teacher) scores of the end-of-training evaluation, when there is one.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from collections import OrderedDict
from typing import Any

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
PLOTS_DIR = "report"
HISTORY_FILE = "log_history.json"

#: Trainer bookkeeping: not plotted as method curves (the losses have their own plot)
STANDARD_KEYS = frozenset({
    "loss", "eval_loss", "epoch", "step", "learning_rate", "grad_norm", "total_flos", "train_loss", "train_runtime",
    "train_samples_per_second", "train_steps_per_second", "eval_runtime", "eval_samples_per_second",
    "eval_steps_per_second", "num_input_tokens_seen", "num_tokens", "train_tokens_per_second",
    "eval_model_preparation_time", "mean_token_accuracy", "eval_mean_token_accuracy", "entropy", "eval_entropy",
})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the log history."""
    points = [(entry.get("step", index), entry[key]) for index, entry in enumerate(history)
              if key in entry and _is_number(entry[key])]
    return [float(step) for step, _ in points], [float(value) for _, value in points]


def method_curves(history: list[dict]) -> "OrderedDict[str, list[str]]":
    """Plot name -> log keys drawn on it, for every numeric non-standard key (see the module docstring)."""
    keys: list[str] = []
    for entry in history:
        for key, value in entry.items():
            if key not in STANDARD_KEYS and key not in keys and _is_number(value):
                keys.append(key)
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for key in keys:
        base = key[len("eval_"):] if key.startswith("eval_") else key
        numbered = re.fullmatch(r"(.*?)_?(\d+)", base)
        name = f"{numbered.group(1)}_N" if numbered and numbered.group(1) else base
        groups.setdefault(name, []).append(key)
    return groups


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "curve"


def _new_axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.6))
    return plt, figure, axes


def _save(plt, figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _plot_lines(history: list[dict], keys: list[str], title: str, path: str, ylabel: str) -> str | None:
    plt, figure, axes = _new_axes()
    drawn = 0
    for key in keys:
        steps, values = series(history, key)
        if not values:
            continue
        style = "o--" if key.startswith("eval_") or len(values) == 1 else "-"
        axes.plot(steps, values, style, label=key, markersize=3)
        drawn += 1
    if not drawn:
        plt.close(figure)
        return None
    axes.set(xlabel="step", ylabel=ylabel, title=title)
    if len(keys) <= 12:
        axes.legend(fontsize=7)
    return _save(plt, figure, path)


def plot_evaluation(results: dict, path: str) -> str | None:
    """Student (and teacher) scores, one panel per task and metric so that each has its own scale (accuracies and
    perplexities side by side), titled with the retention ratio when there is a teacher."""
    from .evaluation.results import format_number, rows as result_rows

    table = result_rows(results)
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(table), 4)
    lines = (len(table) + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 2.6 * lines), squeeze=False)
    for index, row in enumerate(table):
        ax = axes[index // columns][index % columns]
        names, values, colours = ["student"], [row["student"]], ["tab:blue"]
        if row["teacher"] is not None:
            names.append("teacher")
            values.append(row["teacher"])
            colours.append("tab:orange")
        ax.bar(names, values, color=colours, width=0.6)
        arrow = "↑" if row["higher_is_better"] else "↓"
        title = f"{row['task']}\n{row['metric']} {arrow}"
        if row["teacher"] is not None:
            title += f"   retention {format_number(row['retention'])}"
        ax.set_title(title, fontsize=7)
        ax.tick_params(labelsize=7)
    for index in range(len(table), lines * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle("End-of-training evaluation", fontsize=9)
    return _save(plt, figure, path)


def write_plots(history: list[dict], output_dir: str, results: dict | None = None) -> list[str]:
    """Write the report's PNGs into ``output_dir/report/``; return their paths."""
    folder = os.path.join(output_dir, PLOTS_DIR)
    os.makedirs(folder, exist_ok=True)
    paths = []
    loss = _plot_lines(history, ["loss", "eval_loss"], "Training and evaluation loss",
                       os.path.join(folder, "losses.png"), "loss")
    if loss:
        paths.append(loss)
    for name, keys in method_curves(history).items():
        path = _plot_lines(history, keys, name, os.path.join(folder, f"{_file_name(name)}.png"), name)
        if path:
            paths.append(path)
    if results:
        path = plot_evaluation(results, os.path.join(folder, "evaluation.png"))
        if path:
            paths.append(path)
    return paths


def _summary_rows(summary: dict[str, Any]) -> str:
    cells = []
    for key, value in summary.items():
        if isinstance(value, dict):
            text = "<br>".join(f"{html.escape(str(k))} = {html.escape(str(v))}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            text = html.escape(", ".join(map(str, value)))
        else:
            text = html.escape(str(value))
        cells.append(f"<tr><th>{html.escape(str(key))}</th><td>{text}</td></tr>")
    return "\n".join(cells)


def _evaluation_html(results: dict) -> str:
    from .evaluation.results import format_number, rows as result_rows

    with_teacher = results.get("teacher") is not None
    header = ["task", "metric", "student"] + (["teacher", "retention"] if with_teacher else []) + ["n"]
    lines = ["<table class='scores'><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"]
    for row in result_rows(results):
        arrow = "&uarr;" if row["higher_is_better"] else "&darr;"
        cells = [html.escape(row["task"]), f"{html.escape(row['metric'])} {arrow}", format_number(row["student"])]
        if with_teacher:
            cells += [format_number(row["teacher"]), format_number(row["retention"])]
        cells.append("" if row["samples"] is None else str(row["samples"]))
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(lines) + "</table>"


def _last_values(history: list[dict]) -> dict[str, float]:
    last: dict[str, float] = {}
    for entry in history:
        for key, value in entry.items():
            if key not in ("epoch", "step") and _is_number(value):
                last[key] = float(value)
    return last


def write_report(output_dir: str, history: list[dict], *, results: dict | None = None,
                 summary: dict[str, Any] | None = None, title: str | None = None) -> str:
    """Write ``report.html``, its PNGs (``report/*.png``) and the raw ``log_history.json`` into ``output_dir``.

    ``history``: ``trainer.state.log_history``; ``results``: the end-of-training evaluation (:mod:`llmkd.evaluation`);
    ``summary``: what the run was (method, models, data, hyperparameters), shown as a table. Returns the HTML path.
    """
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, HISTORY_FILE), "w", encoding="utf-8") as handle:
        json.dump(history, handle, indent=1)
    plots = write_plots(history, output_dir, results)
    title = title or f"llmkd training report: {os.path.basename(os.path.abspath(output_dir))}"
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;}"
        "table{border-collapse:collapse;margin:1em 0;}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;}"
        "img{max-width:100%;border:1px solid #eee;margin:0.5em 0;}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if summary:
        parts += ["<h2>Run</h2>", f"<table>{_summary_rows(summary)}</table>"]
    if results:
        parts += ["<h2>Evaluation</h2>", _evaluation_html(results)]
    last = _last_values(history)
    if last:
        parts += ["<h2>Last logged values</h2>",
                  "<table>" + _summary_rows({k: f"{v:.6g}" for k, v in last.items()}) + "</table>"]
    parts.append("<h2>Curves</h2>")
    if not plots:
        parts.append("<p>Nothing was logged (no logging step was reached).</p>")
    for path in plots:
        relative = os.path.relpath(path, output_dir).replace(os.sep, "/")
        name = os.path.splitext(os.path.basename(path))[0]
        parts.append(f"<figure><img src='{html.escape(relative)}' alt='{html.escape(name)}'>"
                     f"<figcaption>{html.escape(name)}</figcaption></figure>")
    parts.append("</body></html>")
    report_path = os.path.join(output_dir, REPORT_FILE)
    with open(report_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts) + "\n")
    return report_path


def report_plots(output_dir: str) -> list[str]:
    """The PNGs of a written report, relative to ``output_dir`` (``report/*.png``), sorted."""
    folder = os.path.join(output_dir, PLOTS_DIR)
    if not os.path.isdir(folder):
        return []
    return sorted(f"{PLOTS_DIR}/{name}" for name in os.listdir(folder) if name.endswith(".png"))
