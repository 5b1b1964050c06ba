"""Sequence-classification data (GLUE-style rows) -> ``input_ids`` / ``attention_mask`` / ``labels``.

A row holds one text column, or a pair of text columns, and an integer label:

* single text: ``text`` or ``sentence`` (SST-2, CoLA);
* text pairs (tokenized as one pair, ``[CLS] a [SEP] b [SEP]`` for BERT): ``sentence1``/``sentence2`` (MRPC, RTE,
  STS-B), ``question``/``sentence`` (QNLI), ``question1``/``question2`` (QQP), ``premise``/``hypothesis`` (MNLI),
  ``text``/``text_pair``;
* the label: ``label`` or ``labels`` (an int class id; -1, as in GLUE's unlabeled test splits, is refused).
"""

from __future__ import annotations

from datasets import Dataset

PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("question1", "question2"),
    ("premise", "hypothesis"),
    ("text", "text_pair"),
)
SINGLE_COLUMNS = ("text", "sentence")
LABEL_COLUMNS = ("label", "labels")


def classification_columns(columns: list[str]) -> tuple[tuple[str, ...], str]:
    """The text column(s) and the label column of a classification dataset, or a ValueError that lists them."""
    label = next((c for c in LABEL_COLUMNS if c in columns), None)
    texts = next((pair for pair in PAIR_COLUMNS if all(c in columns for c in pair)), None)
    if texts is None:
        texts = next(((c,) for c in SINGLE_COLUMNS if c in columns), None)
    if texts is None or label is None:
        missing = "a label column ('label' or 'labels')" if texts is not None else (
            f"a text column ({', '.join(repr(c) for c in SINGLE_COLUMNS)}) or a text pair "
            f"({', '.join('/'.join(pair) for pair in PAIR_COLUMNS)})"
        )
        raise ValueError(
            f"The classification dataset has columns {columns} but needs {missing}. Rename your columns "
            "(dataset.rename_column) to one of these layouts."
        )
    return texts, label


def prepare_classification_dataset(dataset: Dataset, tokenizer, *, max_length: int | None = 128,
                                   num_labels: int | None = None, num_proc: int | None = None) -> Dataset:
    """Tokenize a classification dataset (already tokenized rows with ``input_ids`` and ``labels`` pass through).

    Returns a dataset with ``input_ids``, ``attention_mask`` (and ``token_type_ids`` if the tokenizer makes them)
    and ``labels`` (int); other columns are dropped. Labels outside ``[0, num_labels)`` are an error.
    """
    columns = list(dataset.column_names)
    if "input_ids" in columns and "labels" in columns:
        tokenized = dataset
    else:
        texts, label = classification_columns(columns)

        def tokenize(batch):
            encoded = tokenizer(*[batch[c] for c in texts], truncation=max_length is not None, max_length=max_length)
            encoded["labels"] = batch[label]
            return encoded

        tokenized = dataset.map(tokenize, batched=True, remove_columns=columns, num_proc=num_proc,
                                desc="Tokenizing classification data")
    labels = tokenized["labels"]
    if num_labels is not None and len(tokenized):
        bad = sorted({int(y) for y in labels if not 0 <= int(y) < num_labels})
        if bad:
            raise ValueError(
                f"Labels {bad[:10]} are outside [0, {num_labels}) (the models' num_labels). GLUE test splits carry "
                "-1 (no label): train and evaluate on labelled splits, or fix num_labels in the model config."
            )
    return tokenized
