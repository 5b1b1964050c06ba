"""Turning a dataset in one of TRL's layouts into ``input_ids`` / ``attention_mask`` / ``labels`` rows.

Accepted layouts (the column names decide; see :func:`detect_format`), following TRL's dataset conventions:

- ``messages``: a conversation, a list of ``{"role", "content"}`` dicts, rendered with the chat template;
- ``prompt`` + ``completion``: two strings, or two conversations (lists of ``{"role", "content"}`` dicts);
- ``text``: one string, every token trained on;
- ``input_ids`` (and optionally ``attention_mask``, ``labels``): already tokenized, used as given.

Labels follow the Hugging Face convention, unshifted: ``labels[i] == input_ids[i]`` where position ``i`` is
trained on and ``-100`` elsewhere; the model (or the loss) shifts them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import datasets
from transformers import ProcessorMixin
from transformers.utils import logging
from trl.data_utils import common_prefix_length

from ..constants import IGNORE_INDEX

logger = logging.get_logger(__name__)

DATA_FORMATS = ("messages", "prompt_completion", "text", "tokenized")

_LAYOUTS_HELP = (
    "Accepted layouts (TRL conventions): a 'messages' column (list of {'role', 'content'} dicts); 'prompt' and "
    "'completion' columns (strings, or lists of {'role', 'content'} dicts); a 'text' column (strings); or an "
    "'input_ids' column (token ids, optionally with 'attention_mask' and 'labels')."
)
_REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "tokenized": ("input_ids",),
}
# Chat templates that mark assistant text with {% generation %} let transformers compute the assistant mask itself.
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def detect_format(column_names: Sequence[str]) -> str:
    """Name the layout of a dataset from its column names: one of :data:`DATA_FORMATS`.

    Checked in this order: ``"messages"``; ``"prompt"`` and ``"completion"`` (``"prompt_completion"``);
    ``"text"``; ``"input_ids"`` (``"tokenized"``). Raises ``ValueError`` when none matches, saying which columns
    were found and how to rename them.
    """
    columns = set(column_names)
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if "prompt" in columns and not columns & {"text", "input_ids"}:
        hint = ""
        if {"chosen", "rejected"} <= columns:
            hint = (
                " The columns 'prompt', 'chosen', 'rejected' are a preference dataset: use it with "
                "PreferenceDistillTrainer, or keep the preferred answer with dataset.rename_column('chosen', "
                "'completion')."
            )
        raise ValueError(
            f"The dataset has a 'prompt' column but no 'completion' column (columns found: {sorted(columns)}). "
            "Distillation on prompt/completion data needs both: add the answers as a 'completion' column, e.g. "
            f"dataset.rename_column('<answer column>', 'completion').{hint} {_LAYOUTS_HELP}"
        )
    if "text" in columns:
        return "text"
    if "input_ids" in columns:
        return "tokenized"
    raise ValueError(
        f"Cannot tell the dataset's layout from its columns {sorted(columns)}. {_LAYOUTS_HELP} Rename your columns "
        "to one of these, e.g. dataset.rename_column('conversations', 'messages') or "
        "dataset.rename_column('content', 'text')."
    )


def tokenize_example(
    example: Mapping,
    tokenizer,
    *,
    data_format: str,
    max_length: int | None,
    completion_only_loss: bool = True,
    with_prompt_length: bool = False,
) -> dict[str, list[int]]:
    """Tokenize one row into ``input_ids``, ``attention_mask`` and unshifted ``labels``, each a ``list[int]`` of
    length ``T <= max_length``.

    Per layout:

    - ``prompt_completion`` with strings: ``tokenizer(prompt + completion)``, plus the tokenizer's eos when it has
      one and the ids do not already end with it. With ``completion_only_loss`` the prompt's tokens (the common
      prefix of ``tokenizer(prompt)`` and ``tokenizer(prompt + completion)``) get label ``-100``.
    - ``prompt_completion`` with conversations: the chat template renders ``prompt + completion``; the prompt alone
      is rendered with ``add_generation_prompt=True`` to find where the completion starts. No eos is appended:
      the template ends the assistant turn itself.
    - ``messages``: the chat template renders the conversation. With ``completion_only_loss`` only the tokens of
      assistant turns (their content and whatever the template closes them with, e.g. an end-of-turn token) are
      trained on; the role headers and every other turn get ``-100``. The assistant spans come from the
      template's ``{% generation %}`` markers when it has them, else from rendering prefixes of the conversation
      (raises ``ValueError`` when the template renders a prefix inconsistently with the whole conversation).
    - ``text``: ``tokenizer(text)`` plus eos (as above); every token trained on.
    - ``tokenized``: ``input_ids`` as given; ``attention_mask`` as given or all ones; ``labels`` as given or a
      copy of ``input_ids``.

    The tokenizer's bos is present exactly when the tokenizer itself adds it (``tokenizer(text)``) or the chat
    template writes it; it is never added twice.

    Truncation: right truncation, the first ``max_length`` tokens are kept (``None`` keeps everything). A prompt
    longer than ``max_length`` therefore leaves no trainable token; :func:`prepare_dataset` drops such rows.

    Args:
        example: one row, a mapping from column name to value.
        tokenizer: a ``PreTrainedTokenizerBase`` (a processor is accepted; its tokenizer is used).
        data_format: one of :data:`DATA_FORMATS`, usually from :func:`detect_format`.
        max_length: the longest sequence kept, or ``None``.
        completion_only_loss: train only on completions / assistant turns (ignored by ``text`` and
            ``tokenized``).
        with_prompt_length: also return the prompt's length in tokens under
            :data:`PROMPT_LENGTH` (what on-policy distillation generates from; clipped to the
            truncated row; a row without a prompt raises ``ValueError``).
    """
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format must be one of {DATA_FORMATS}, got {data_format!r}.")
    if max_length is not None and max_length <= 0:
        raise ValueError(f"max_length must be a positive number of tokens or None, got {max_length}.")
    _require_columns(example, data_format)
    tokenizer, chat_template = _text_tokenizer(tokenizer)

    if data_format == "tokenized":
        input_ids = [int(t) for t in example["input_ids"]]
        attention_mask = example.get("attention_mask")
        attention_mask = [1] * len(input_ids) if attention_mask is None else [int(m) for m in attention_mask]
        labels = example.get("labels")
        labels = list(input_ids) if labels is None else [int(t) for t in labels]
        for name, values in (("attention_mask", attention_mask), ("labels", labels)):
            if len(values) != len(input_ids):
                raise ValueError(
                    f"The row's '{name}' has {len(values)} entries but its 'input_ids' has {len(input_ids)}: "
                    f"they must align token for token. Fix the dataset or drop the '{name}' column."
                )
    elif data_format == "text":
        input_ids = _append_eos(_encode(tokenizer, _as_text(example["text"], "text")), tokenizer)
        attention_mask, labels = [1] * len(input_ids), list(input_ids)
    elif data_format == "prompt_completion":
        input_ids, labels = _tokenize_prompt_completion(
            example["prompt"], example["completion"], tokenizer, chat_template, completion_only_loss
        )
        attention_mask = [1] * len(input_ids)
    else:
        input_ids, labels = _tokenize_messages(example["messages"], tokenizer, chat_template, completion_only_loss)
        attention_mask = [1] * len(input_ids)

    row = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_prompt_length:
        row[PROMPT_LENGTH] = prompt_length(example, tokenizer, chat_template, data_format, input_ids, labels)
    if max_length is not None:
        for key in ("input_ids", "attention_mask", "labels"):
            row[key] = row[key][:max_length]
        if with_prompt_length:
            row[PROMPT_LENGTH] = min(row[PROMPT_LENGTH], max_length)
    return row


def prepare_dataset(
    dataset,
    tokenizer,
    *,
    max_length: int | None = 1024,
    completion_only_loss: bool = True,
    num_proc: int | None = None,
    extra_columns: tuple[str, ...] = (),
    with_prompt_length: bool = False,
) -> datasets.Dataset:
    """Tokenize a dataset for distillation: detect its layout, apply :func:`tokenize_example` to every row, and drop
    the rows with no trainable token.

    Args:
        dataset: a ``datasets.Dataset``, or a list of dicts (one per row).
        tokenizer: the student's tokenizer (or processor).
        max_length: the longest sequence kept (right truncation), or ``None``.
        completion_only_loss: train only on completions / assistant turns.
        num_proc: processes for ``Dataset.map`` / ``Dataset.filter``.
        extra_columns: original columns to keep beside the new ones (e.g. ``"images"`` for a vision-language
            student); every other original column is removed.
        with_prompt_length: add the column :data:`PROMPT_LENGTH`, each row's prompt length in
            tokens (on-policy distillation; :func:`prompt_length`).

    Returns:
        a ``datasets.Dataset`` with columns ``input_ids``, ``attention_mask``, ``labels`` (each a list of ``T_i``
        ints per row, ``T_i <= max_length``) and ``extra_columns``.

    Raises:
        ValueError: the layout is unknown, a column is missing, or the dataset is empty before or after dropping.
    """
    if isinstance(dataset, datasets.DatasetDict):
        raise TypeError(
            f"prepare_dataset takes one split, got a DatasetDict with splits {list(dataset)}: pass e.g. "
            "dataset['train']."
        )
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(row, Mapping) for row in dataset):
            raise TypeError("A list given as dataset must hold one dict per row, e.g. [{'text': '...'}, ...].")
        dataset = datasets.Dataset.from_list([dict(row) for row in dataset])
    elif not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"prepare_dataset takes a datasets.Dataset or a list of dicts, got {type(dataset).__name__}. For an "
            "IterableDataset, materialize it first, e.g. datasets.Dataset.from_generator(lambda: iter(stream))."
        )
    if len(dataset) == 0:
        raise ValueError(
            f"The dataset is empty (0 rows; columns {dataset.column_names}): nothing to train on. Check the split "
            "name and any filtering done before prepare_dataset."
        )

    data_format = detect_format(dataset.column_names)
    missing = [c for c in extra_columns if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"extra_columns names column(s) {missing} that the dataset does not have (columns present: "
            f"{dataset.column_names}). Remove them from extra_columns or add them to the dataset."
        )
    remove_columns = [c for c in dataset.column_names if c not in extra_columns]
    tokenized = dataset.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs={
            "tokenizer": tokenizer,
            "data_format": data_format,
            "max_length": max_length,
            "completion_only_loss": completion_only_loss,
            "with_prompt_length": with_prompt_length,
        },
        remove_columns=remove_columns,
        num_proc=num_proc,
        desc=f"Tokenizing ({data_format})",
    )
    kept = tokenized.filter(
        _has_trainable_tokens, batched=True, input_columns=["labels"], num_proc=num_proc, desc="Dropping empty rows"
    )
    dropped = len(tokenized) - len(kept)
    reason = (
        f"their labels have no trainable token (label != {IGNORE_INDEX}): the prompt fills max_length={max_length}, "
        "the completion is empty, or (messages) the conversation has no assistant turn"
    )
    if len(kept) == 0:
        raise ValueError(
            f"All {len(tokenized)} rows of the '{data_format}' dataset were dropped because {reason}. Raise "
            "max_length, shorten the prompts, or set completion_only_loss=False to train on every token."
        )
    if dropped:
        logger.warning(f"Dropped {dropped} of {len(tokenized)} rows because {reason}.")
    return kept


#: The column of prepared rows that holds the prompt's length (``int``), added by ``prepare_dataset`` when asked.
PROMPT_LENGTH = "llmkd_prompt_length"

NO_PROMPT_HELP = (
    "On-policy distillation (lmbda > 0) and sequence-level KD (seq_kd) generate completions from each row's prompt: "
    "give the data 'prompt' and 'completion' columns, or 'messages' conversations with an assistant turn after the "
    "prompt turns, or set lmbda: 0 and seq_kd: false to distil on the dataset's own text."
)


def prompt_length(example: Mapping, tokenizer, chat_template, data_format: str, input_ids: list[int],
                  labels: list[int]) -> int:
    """The number of leading ``input_ids`` that form the row's prompt (``>= 1``), counted in the row's own tokens
    (the common prefix of the prompt's tokens and the row's), so that ``input_ids[:length]`` is what a model
    continues. The prompt, per layout: ``prompt_completion``, the prompt (a conversation rendered with the
    generation prompt); ``messages``, every turn before the last assistant turn (rendered likewise);
    ``tokenized``, the tokens before the first trained label. A ``text`` row has none: ``ValueError``."""
    if data_format == "text":
        raise ValueError(f"A 'text' row has no prompt. {NO_PROMPT_HELP}")
    if data_format == "tokenized":
        length = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    elif data_format == "prompt_completion":
        prompt = example["prompt"]
        if _is_conversation(prompt):
            template = _resolve_template(tokenizer, chat_template, "prompt/completion")
            prompt_ids = _render_ids(tokenizer, template, prompt, add_generation_prompt=True)
        else:
            prompt_ids = _encode(tokenizer, prompt)
        length = common_prefix_length(prompt_ids, input_ids)
    else:
        messages = list(example["messages"])
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise ValueError("The conversation has no turn before its last assistant turn to generate from "
                             f"(roles: {[m['role'] for m in messages]}). {NO_PROMPT_HELP}")
        template = _resolve_template(tokenizer, chat_template, "messages")
        prompt_ids = _render_ids(tokenizer, template, messages[:last], add_generation_prompt=True)
        length = common_prefix_length(prompt_ids, input_ids)
    if length == 0:
        raise ValueError(f"The row's prompt is empty (no token before its completion). {NO_PROMPT_HELP}")
    return length


def _tokenize_row(example: dict, index: int, **kwargs) -> dict[str, list[int]]:
    try:
        return tokenize_example(example, **kwargs)
    except ValueError as error:
        raise ValueError(f"Row {index}: {error}") from error


def _has_trainable_tokens(labels: list[list[int]]) -> list[bool]:
    return [any(label != IGNORE_INDEX for label in row) for row in labels]


def _require_columns(example: Mapping, data_format: str) -> None:
    for column in _REQUIRED_COLUMNS[data_format]:
        if example.get(column) is None:
            seen = "has the value None" if column in example else "is missing"
            raise ValueError(
                f"The '{data_format}' layout needs a '{column}' column, which {seen} (columns present: "
                f"{sorted(example)}). Add or rename it, e.g. dataset.rename_column('<your column>', '{column}'), "
                f"or drop the rows where it is empty. {_LAYOUTS_HELP}"
            )


def _text_tokenizer(tokenizer):
    """The tokenizer that turns text into ids and the chat template to use with it (a processor's own template
    wins, as transformers' processors do)."""
    if isinstance(tokenizer, ProcessorMixin):
        template = getattr(tokenizer, "chat_template", None)
        inner = tokenizer.tokenizer
        return inner, template or getattr(inner, "chat_template", None)
    return tokenizer, getattr(tokenizer, "chat_template", None)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _append_eos(ids: list[int], tokenizer) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


def _as_text(value, column: str) -> str:
    if not isinstance(value, str):
        raise ValueError(
            f"The '{column}' column must hold strings here, got {type(value).__name__}: {str(value)[:80]!r}. A "
            "conversation belongs in a 'messages' column, or in both 'prompt' and 'completion'."
        )
    return value


def _is_conversation(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(m, Mapping) and "role" in m for m in value)


def _resolve_template(tokenizer, chat_template, layout: str) -> str:
    if not chat_template:
        raise ValueError(
            f"The {layout} rows are conversations, which need a chat template, but the tokenizer has none "
            "(tokenizer.chat_template is None). Set one, e.g. tokenizer.chat_template = '<jinja template>', or "
            "use a chat model's tokenizer."
        )
    # A tokenizer may hold several named templates; transformers picks the default one.
    return chat_template if isinstance(chat_template, str) else tokenizer.get_chat_template(chat_template)


def _render(tokenizer, chat_template: str, messages, *, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=chat_template, add_generation_prompt=add_generation_prompt, tokenize=False
    )


def _render_ids(tokenizer, chat_template: str, messages, *, add_generation_prompt: bool = False) -> list[int]:
    ids = tokenizer.apply_chat_template(
        list(messages), chat_template=chat_template, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return [int(t) for t in ids]


def _tokenize_prompt_completion(prompt, completion, tokenizer, chat_template, completion_only_loss):
    prompt_is_chat, completion_is_chat = _is_conversation(prompt), _is_conversation(completion)
    if prompt_is_chat != completion_is_chat:
        raise ValueError(
            "'prompt' and 'completion' must both be strings or both be conversations (lists of {'role', "
            f"'content'}} dicts); got a {type(prompt).__name__} prompt and a {type(completion).__name__} "
            "completion. Convert one to the other's form."
        )
    if prompt_is_chat:
        chat_template = _resolve_template(tokenizer, chat_template, "prompt/completion")
        prompt_ids = _render_ids(tokenizer, chat_template, prompt, add_generation_prompt=True)
        input_ids = _render_ids(tokenizer, chat_template, list(prompt) + list(completion))
    else:
        prompt, completion = _as_text(prompt, "prompt"), _as_text(completion, "completion")
        prompt_ids = _encode(tokenizer, prompt)
        input_ids = _append_eos(_encode(tokenizer, prompt + completion), tokenizer)
    if not completion_only_loss:
        return input_ids, list(input_ids)
    # Tokens can merge across the prompt/completion boundary (or a template renders the prompt alone differently):
    # the completion starts where the two tokenizations diverge, as in TRL's SFTTrainer.
    prompt_len = common_prefix_length(prompt_ids, input_ids)
    if prompt_len < len(prompt_ids):
        logger.warning_once(
            "The tokenized prompt is not a prefix of the tokenized prompt + completion (tokens merge across the "
            "boundary, or the chat template renders the prompt alone differently); the completion's labels start "
            f"where they diverge, after {prompt_len} of the prompt's {len(prompt_ids)} tokens. End prompts on a "
            "token boundary (e.g. start completions with a space) to avoid it. Shown once."
        )
    return input_ids, [IGNORE_INDEX] * prompt_len + input_ids[prompt_len:]


def _tokenize_messages(messages, tokenizer, chat_template, completion_only_loss):
    if not _is_conversation(messages) or len(messages) == 0:
        raise ValueError(
            "The 'messages' column must hold a non-empty list of {'role', 'content'} dicts, got "
            f"{str(messages)[:120]!r}. Convert e.g. ShareGPT's {{'from', 'value'}} turns with "
            "trl.data_utils.maybe_convert_to_chatml."
        )
    chat_template = _resolve_template(tokenizer, chat_template, "messages")
    messages = list(messages)
    if not completion_only_loss:
        input_ids = _render_ids(tokenizer, chat_template, messages)
        return input_ids, list(input_ids)
    if _GENERATION_BLOCK.search(chat_template):
        encoding = tokenizer.apply_chat_template(
            messages, chat_template=chat_template, return_dict=True, return_assistant_tokens_mask=True
        )
        input_ids = list(encoding["input_ids"])
        mask = encoding["assistant_masks"]
        return input_ids, [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask, strict=True)]

    spans = _assistant_char_spans(messages, tokenizer, chat_template)
    encoding = tokenizer.apply_chat_template(messages, chat_template=chat_template, return_dict=True)
    input_ids = list(encoding["input_ids"])
    if encoding.encodings is not None:  # a fast tokenizer knows which characters each token covers
        offsets = encoding.encodings[0].offsets
        trained = [any(s < end and e > start for start, end in spans) for s, e in offsets]
    else:
        text = _render(tokenizer, chat_template, messages)
        trained = [False] * len(input_ids)
        for start, end in spans:
            first = _prefix_length(tokenizer, text[:start], input_ids)
            last = _prefix_length(tokenizer, text[:end], input_ids)
            trained[first:last] = [True] * (last - first)
    return input_ids, [t if keep else IGNORE_INDEX for t, keep in zip(input_ids, trained, strict=True)]


def _assistant_char_spans(messages, tokenizer, chat_template) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the rendered conversation that belong to assistant turns: from the end
    of the conversation before the turn rendered with the generation prompt, to the end of the conversation up to
    and including the turn."""
    text = _render(tokenizer, chat_template, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # An empty conversation cannot be rendered: a leading assistant turn is trained from its first character.
        before = _render(tokenizer, chat_template, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, chat_template, messages[: i + 1])
        for prefix, what in ((before, "before"), (through, "up to and including")):
            if not text.startswith(prefix):
                raise ValueError(
                    f"The chat template does not render the conversation {what} assistant turn {i} as a prefix of "
                    f"the whole conversation (prefix renders as {prefix[-80:]!r}), so the assistant tokens cannot "
                    "be located. Set completion_only_loss=False to train on every token, or use a chat template "
                    "that marks assistant text with {% generation %} ... {% endgeneration %}."
                )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return spans


def _prefix_length(tokenizer, text_prefix: str, input_ids: list[int]) -> int:
    """How many of ``input_ids`` the rendered ``text_prefix`` accounts for (tokenizers without character offsets)."""
    ids = list(tokenizer(text_prefix, add_special_tokens=False)["input_ids"]) if text_prefix else []
    if ids != input_ids[: len(ids)]:
        raise ValueError(
            "The chat template's rendering of a prefix of the conversation does not tokenize to a prefix of the "
            "whole conversation's tokens, so the assistant tokens cannot be located. Set completion_only_loss=False "
            "to train on every token, or use a fast tokenizer."
        )
    return len(ids)
