"""Where datasets come from: a local file, a folder saved with ``save_to_disk``, or a Hub dataset name."""

from __future__ import annotations

import os

import datasets

from ..paths import looks_like_path, missing_path_error

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def load_dataset_splits(args) -> tuple[datasets.Dataset | None, datasets.Dataset | None]:
    """(train, eval) datasets for ``args.dataset_name`` / ``dataset_config`` / ``dataset_*_split``.

    A local file is read with the matching ``datasets`` builder (its only split is "train" unless the name is a
    dict of files); a folder written by ``save_to_disk`` is loaded as is; anything else is a Hub dataset.
    """
    source = args.dataset_name
    if source is None:
        return None, None
    loaded = _load(source, args.dataset_config)
    if isinstance(loaded, datasets.Dataset):
        return loaded, None
    train = _split(loaded, args.dataset_train_split, source)
    evaluation = _split(loaded, args.dataset_eval_split, source) if args.dataset_eval_split else None
    return train, evaluation


def _load(source: str, config: str | None):
    if not os.path.exists(source) and looks_like_path(source):
        raise missing_path_error("dataset_name", source, (os.getcwd(),))
    if os.path.isfile(source):
        extension = os.path.splitext(source)[1].lower()
        if extension not in _FILE_BUILDERS:
            raise ValueError(
                f"Cannot read dataset file {source!r}: extension {extension!r} is not one of {sorted(_FILE_BUILDERS)}."
            )
        if _has_no_rows(source, extension):
            raise ValueError(f"The dataset is empty (0 rows; the file {source!r} holds no rows). Check dataset_name, "
                             "or the step that writes this file.")
        return datasets.load_dataset(_FILE_BUILDERS[extension], data_files={"train": source})
    if os.path.isdir(source) and (
        os.path.exists(os.path.join(source, "dataset_dict.json"))
        or os.path.exists(os.path.join(source, "dataset_info.json"))
    ):
        return datasets.load_from_disk(source)
    try:
        return datasets.load_dataset(source, config)
    except Exception as error:  # datasets raises many types here
        raise ValueError(
            f"Could not load dataset {source!r}: {error}\nGive a local .json/.jsonl/.csv/.parquet file, a folder "
            "saved with Dataset.save_to_disk, or a reachable Hub dataset name."
        ) from error


def _split(loaded, split: str, source: str):
    if split not in loaded:
        raise ValueError(
            f"Dataset {source!r} has no split {split!r}; its splits are {sorted(loaded)}. Set dataset_train_split / "
            "dataset_eval_split."
        )
    return loaded[split]


def _has_no_rows(path: str, extension: str) -> bool:
    """An empty (or whitespace-only) text file: the datasets builders fail on it with a bare StopIteration."""
    if extension not in (".json", ".jsonl", ".csv"):
        return os.path.getsize(path) == 0
    with open(path, "rb") as handle:
        return not any(line.strip() for line in handle)
