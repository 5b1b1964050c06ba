"""PNG loss curves of the quickstart's two students (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
    return [step for step, _ in points], [value for _, value in points]


def plot_loss_curves(
    sft_history: list[dict], distilled_history: list[dict], output_dir: str, *, method: str
) -> list[str]:
    """Write ``training_loss.png`` (each student's training objective) and ``cross_entropy.png`` (both students'
    cross-entropy on the training labels, which is comparable between them, and the distilled student's divergence
    to the teacher, or for TAID to its interpolated target). ``*_history`` are ``trainer.state.log_history`` lists.
    Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(*_series(sft_history, "loss"), label="SFT student: cross-entropy")
    axes.plot(*_series(distilled_history, "loss"), label=f"distilled student ({method}): its objective")
    axes.set(xlabel="step", ylabel="training loss", yscale="log", title="Training loss")
    axes.legend()
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "training_loss.png"))
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(*_series(sft_history, "loss"), label="SFT student: cross-entropy")
    if any("ce_loss" in entry for entry in distilled_history):
        axes.plot(*_series(distilled_history, "ce_loss"), label="distilled student: cross-entropy")
    if any("kd_loss" in entry for entry in distilled_history):
        target = "TAID's moving target p_t" if method == "taid" else "teacher"
        axes.plot(*_series(distilled_history, "kd_loss"), "--", label=f"distilled student: divergence to {target}")
    axes.set(xlabel="step", ylabel="per-token loss on the training rows", yscale="log",
             title="Cross-entropy on the training labels")
    axes.legend()
    figure.tight_layout()
    paths.append(os.path.join(output_dir, "cross_entropy.png"))
    figure.savefig(paths[-1], dpi=100)
    plt.close(figure)
    return paths
