"""Loads the data of llmkd's offline lm-eval tasks from eval/data/, found relative to this file, so the task YAMLs
work from any working directory (lm-eval's own ``dataset_path: json`` needs absolute ``data_files`` paths)."""

from __future__ import annotations

import os

import datasets

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def load_jsonl(data_file: str, split: str = "test", **_metadata) -> datasets.DatasetDict:
    """``{split: the rows of eval/data/<data_file>}``. lm-eval passes the task's metadata as keyword arguments too;
    they are ignored."""
    path = os.path.join(DATA_DIR, data_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: regenerate llmkd's evaluation data with "
                                "`python scripts/make_eval_tasks.py`.")
    return datasets.load_dataset("json", data_files={split: path})
