"""Image data for DHO (docs/ALGORITHMS.md section 4): the labeled / unlabeled split of a train split, on-the-fly image
processing with ``transformers`` image processors, precomputed teacher logits, and the paired dataset whose item
is one labeled and one unlabeled example (so every batch holds B labeled and B unlabeled images).

Rows are ``datasets`` rows with an image column (PIL images, or arrays ``(H, W)`` / ``(H, W, C)``) and a label
column (class ids; ``-1`` or None marks a row as unlabeled). Rows that already hold ``pixel_values`` are used as
they are.
"""

from __future__ import annotations

import logging
import math
import random
import re

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

UNLABELED = -1
logger = logging.getLogger(__name__)
_AMOUNT = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(%?)\s*$")


def parse_amount(value, total: int, what: str = "labeled") -> int:
    """A count (``128``, ``"128"``) or a percentage of ``total`` (``"1%"``, rounded, at least 1)."""
    match = _AMOUNT.match(str(value))
    if match is None:
        raise ValueError(f"{what}={value!r} is neither a count (e.g. 128) nor a percentage (e.g. '1%').")
    number, percent = float(match.group(1)), bool(match.group(2))
    if percent:
        if not 0 < number <= 100:
            raise ValueError(f"{what}={value!r}: a percentage must be in (0, 100].")
        return max(1, int(round(total * number / 100.0)))
    if number != int(number) or number < 1:
        raise ValueError(f"{what}={value!r}: a count must be a whole number >= 1.")
    if number > total:
        raise ValueError(f"{what}={value!r} asks for more rows than the {total} available; lower it or give a "
                         "percentage such as '10%'.")
    return int(number)


def row_labels(dataset, label_column: str) -> list[int]:
    """The labels of ``dataset`` as ints, ``-1`` for missing ones (read without decoding images)."""
    if label_column not in dataset.column_names:
        raise ValueError(f"The dataset has no label column {label_column!r}; its columns are "
                         f"{dataset.column_names}. Set label_column.")
    return [UNLABELED if label is None else int(label) for label in dataset[label_column]]


def check_labels(labels, num_labels: int, split: str, allow_unlabeled: bool) -> None:
    """Refuse labels outside ``[0, num_labels)`` (``-1`` allowed for unlabeled train rows)."""
    low = UNLABELED if allow_unlabeled else 0
    bad = sorted({label for label in labels if not low <= label < num_labels})
    if bad:
        unlabeled = " (-1 marks an unlabeled train row)" if allow_unlabeled else ""
        raise ValueError(
            f"The {split} split has labels {bad[:10]} outside [0, {num_labels}){unlabeled}: the model has "
            f"{num_labels} classes. Give the student num_labels / id2label covering every class, or fix the labels."
        )


def stratified_labeled_indices(labels, amount: int, seed: int) -> list[int]:
    """``amount`` indices of labeled rows (label >= 0), spread over classes as evenly as possible: classes are
    visited round-robin in a seeded order, each giving its rows in a seeded order; returned sorted."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        if label >= 0:
            by_class.setdefault(label, []).append(index)
    available = sum(len(v) for v in by_class.values())
    if amount > available:
        raise ValueError(f"Asked for {amount} labeled rows but the train split has only {available} rows with a "
                         "label.")
    rng = random.Random(seed)
    classes = sorted(by_class)
    rng.shuffle(classes)
    for indices in by_class.values():
        rng.shuffle(indices)
    chosen, depth = [], 0
    while len(chosen) < amount:
        for label in classes:
            if depth < len(by_class[label]) and len(chosen) < amount:
                chosen.append(by_class[label][depth])
        depth += 1
    return sorted(chosen)


def to_rgb(image):
    """A PIL RGB image from a PIL image or an array ``(H, W)`` / ``(H, W, C)`` (floats are taken in [0, 1])."""
    from PIL import Image

    if isinstance(image, dict) and ("bytes" in image or "path" in image):
        import io

        image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            array = np.clip(np.rint(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    return image.convert("RGB")


class ImageTransform:
    """A ``datasets.Dataset.with_transform`` function: ``image_column`` -> ``pixel_values`` (3, H, W) through the
    student's image processor (and ``teacher_pixel_values`` through the teacher's, when it is given), the label
    column -> ``labels``; ``teacher_logits`` pass through. Rows that already hold ``pixel_values`` keep them."""

    def __init__(self, image_processor, image_column: str = "image", label_column: str = "label",
                 teacher_image_processor=None):
        self.image_processor = image_processor
        self.teacher_image_processor = teacher_image_processor
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: dict) -> dict:
        out = {}
        if "pixel_values" in batch:
            out["pixel_values"] = torch.as_tensor(np.asarray(batch["pixel_values"]), dtype=torch.float32)
        else:
            if self.image_column not in batch:
                raise ValueError(f"The dataset has no image column {self.image_column!r} (nor pixel_values); its "
                                 f"columns are {sorted(batch)}. Set image_column.")
            images = [to_rgb(image) for image in batch[self.image_column]]
            out["pixel_values"] = self.image_processor(images, return_tensors="pt")["pixel_values"]
            if self.teacher_image_processor is not None:
                out["teacher_pixel_values"] = self.teacher_image_processor(images, return_tensors="pt")[
                    "pixel_values"]
        if self.label_column in batch:
            out["labels"] = torch.tensor([UNLABELED if v is None else int(v) for v in batch[self.label_column]])
        if "teacher_logits" in batch:
            out["teacher_logits"] = torch.as_tensor(np.asarray(batch["teacher_logits"]), dtype=torch.float32)
        return out


@torch.no_grad()
def compute_teacher_logits(teacher, dataset, image_processor, *, image_column: str = "image",
                           batch_size: int = 64, device=None, num_workers: int = 0,
                           desc: str = "teacher logits") -> np.ndarray:
    """Run the teacher once over ``dataset``: ``(N, C)`` float32 logits, in row order. Images are decoded and
    processed by ``num_workers`` DataLoader workers (0: in this process)."""
    parameter = next(teacher.parameters(), None)
    device = device or (parameter.device if parameter is not None else "cpu")
    transformed = dataset.with_transform(ImageTransform(image_processor, image_column=image_column,
                                                        label_column="\0none"))
    loader = torch.utils.data.DataLoader(transformed, batch_size=batch_size, num_workers=num_workers,
                                         shuffle=False)
    chunks = [teacher(pixel_values=batch["pixel_values"].to(device)).logits.float().cpu().numpy()
              for batch in tqdm(loader, desc=desc, unit="batch")]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


class WithTeacherLogits(torch.utils.data.Dataset):
    """The rows of ``dataset`` (dicts), each with ``teacher_logits`` ``(C,)`` from a precomputed ``(N, C)`` array
    (kept beside the dataset rather than added as a column, which would rewrite the whole dataset)."""

    def __init__(self, dataset, logits: np.ndarray):
        if len(dataset) != len(logits):
            raise ValueError(f"{len(logits)} rows of teacher logits for a dataset of {len(dataset)} rows.")
        self.dataset, self.logits = dataset, logits

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        row = dict(self.dataset[index])
        row["teacher_logits"] = torch.from_numpy(np.asarray(self.logits[index], dtype=np.float32))
        return row


def _cycled_order(length: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``length`` indices in ``[0, size)``: seeded permutations of ``range(size)`` one after another."""
    repeats = math.ceil(length / size)
    return np.concatenate([rng.permutation(size) for _ in range(repeats)])[:length]


class PairedDataset(torch.utils.data.Dataset):
    """Item ``i`` pairs a labeled example with an unlabeled one, so a batch of B items is a labeled batch and an
    unlabeled batch of B each. Its length is the larger set's size (an epoch sees every example of the larger set
    once); the smaller set is cycled in seeded permutations, as the official code cycles its labeled loader.

    Both datasets return ``pixel_values`` (3, H, W) [and ``teacher_logits`` (C,) / ``teacher_pixel_values``];
    the labeled one ``labels``. An item is ``{pixel_values, labels, [teacher_*], unlabeled_pixel_values,
    [unlabeled_teacher_*]}``.
    """

    def __init__(self, labeled, unlabeled, seed: int = 0):
        if len(labeled) == 0:
            raise ValueError("No labeled examples: DHO's CE head needs at least one labeled row.")
        if len(unlabeled) == 0:
            raise ValueError("No unlabeled examples: DHO distils on unlabeled images. Label fewer train rows "
                             "(labeled='1%'), give unlabeled_dataset=..., or mark rows unlabeled with label -1.")
        self.labeled, self.unlabeled = labeled, unlabeled
        length = max(len(labeled), len(unlabeled))
        rng = np.random.default_rng(seed)
        self.labeled_order = _cycled_order(length, len(labeled), rng)
        self.unlabeled_order = _cycled_order(length, len(unlabeled), rng)

    def __len__(self) -> int:
        return len(self.labeled_order)

    def __getitem__(self, index: int) -> dict:
        labeled = self.labeled[int(self.labeled_order[index])]
        unlabeled = self.unlabeled[int(self.unlabeled_order[index])]
        item = {key: value for key, value in labeled.items()}
        for key, value in unlabeled.items():
            if key != "labels":
                item["unlabeled_" + key] = value
        return item


def data_seed(args) -> int:
    """The seed of the data choices (labeled rows, held-out validation, pairing): ``data_seed``, else ``seed``."""
    return args.data_seed if args.data_seed is not None else args.seed


def hold_out_validation(train_dataset, args):
    """(train, validation): ``args.validation_size`` labeled rows (count or percentage, stratified, seeded by
    ``data_seed`` + 1) held out of ``train_dataset``."""
    labels = row_labels(train_dataset, args.label_column)
    size = parse_amount(args.validation_size, sum(label >= 0 for label in labels), "validation_size")
    held = set(stratified_labeled_indices(labels, size, data_seed(args) + 1))
    rest = [i for i in range(len(train_dataset)) if i not in held]
    return (train_dataset.select(rest, keep_in_memory=True),
            train_dataset.select(sorted(held), keep_in_memory=True))


def split_labeled_unlabeled(train_dataset, unlabeled_dataset, args, num_labels: int):
    """(labeled, unlabeled) datasets: ``args.labeled`` rows of ``train_dataset`` keep their labels (stratified, seeded
    by ``data_seed``); the other rows, rows labeled -1/None and ``unlabeled_dataset`` form the unlabeled set (image /
    ``pixel_values`` / ``teacher_logits`` columns only). Labels are checked against ``num_labels``."""
    labels = row_labels(train_dataset, args.label_column)
    check_labels(labels, num_labels, "train", allow_unlabeled=True)
    labeled_rows = sum(label != UNLABELED for label in labels)
    if labeled_rows == 0:
        raise ValueError("The train split has no labeled rows (every label is -1/None): DHO needs some labels.")
    amount = parse_amount(args.labeled, labeled_rows, "labeled")
    chosen = stratified_labeled_indices(labels, amount, data_seed(args))
    chosen_set = set(chosen)
    rest = [i for i in range(len(train_dataset)) if i not in chosen_set]
    keep = [c for c in (args.image_column, "pixel_values", "teacher_logits") if c in train_dataset.column_names]
    unlabeled = train_dataset.select(rest, keep_in_memory=True).select_columns(keep)
    if unlabeled_dataset is not None:
        missing = [c for c in keep if c not in unlabeled_dataset.column_names]
        if missing:
            raise ValueError(f"unlabeled_dataset does not match the train split's columns: it lacks {missing} "
                             f"(its columns are {unlabeled_dataset.column_names}).")
        extra = unlabeled_dataset.select_columns(keep)
        try:
            extra = extra.cast(unlabeled.features, keep_in_memory=True)
            unlabeled = datasets.concatenate_datasets([unlabeled, extra])
        except Exception as error:  # noqa: BLE001 - datasets raises several types here
            raise ValueError(f"unlabeled_dataset does not match the train split's columns/types ({keep}): "
                             f"{error}") from error
    # keep_in_memory: the (small) index mappings are not written as cache files next to the data
    labeled = train_dataset.select(chosen, keep_in_memory=True)
    logger.info("DHO data: %d labeled rows (labeled=%r), %d unlabeled rows.", len(labeled), args.labeled,
                len(unlabeled))
    if len(unlabeled) == 0:
        raise ValueError(f"No unlabeled data: labeled={args.labeled!r} keeps the labels of all {labeled_rows} "
                         "train rows. DHO distils on unlabeled images: label fewer rows (e.g. labeled='10%'), "
                         "pass unlabeled_dataset=..., or mark rows unlabeled with label -1.")
    return labeled, unlabeled


__all__ = [
    "ImageTransform", "PairedDataset", "UNLABELED", "WithTeacherLogits", "check_labels", "compute_teacher_logits",
    "data_seed", "hold_out_validation", "parse_amount", "row_labels", "split_labeled_unlabeled",
    "stratified_labeled_indices", "to_rgb",
]
