"""llmkd.data: layout detection, tokenization with unshifted labels, prepare_dataset, and the collator.

Expected ids are computed here independently of llmkd: conversations are rendered by hand (the test template is
simple) and tokenized with ``add_special_tokens=False``, the way a chat template's output is tokenized.
"""

import copy
import logging

import datasets
import numpy as np
import pytest
import torch
from tokenizers import processors
from transformers import BatchEncoding
from utils import CHAT_TEMPLATE, prompt_completion_rows

from llmkd.data import DATA_FORMATS, DistillDataCollator, detect_format, prepare_dataset, tokenize_example

IGNORE = -100
CONVERSATION = [
    {"role": "user", "content": "what is one add two"},
    {"role": "assistant", "content": "sum is three"},
    {"role": "user", "content": "the red cat"},
    {"role": "assistant", "content": "sat on the mat"},
]
# The same conversation rendered by hand with tests/utils.CHAT_TEMPLATE, piece by piece: (text, trained?).
CONVERSATION_PIECES = [
    ("<|user|>what is one add two", False),
    ("<|assistant|>", False),
    ("sum is three</s>", True),
    ("<|user|>the red cat", False),
    ("<|assistant|>", False),
    ("sat on the mat</s>", True),
]
GENERATION_TEMPLATE = (  # the test template with transformers' assistant markers
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{% generation %}{{ m['content'] }}</s>{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_from_pieces(tokenizer, pieces):
    ids, labels = [], []
    for text, trained in pieces:
        piece = encode(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    # The pieces are split at special tokens, so tokenizing them apart equals tokenizing the whole rendering.
    assert ids == encode(tokenizer, "".join(text for text, _ in pieces))
    return ids, labels


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The test tokenizer, made to add its bos itself (as Llama's does)."""
    tok = copy.deepcopy(tokenizer)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    return tok


# ---------------------------------------------------------------- detect_format


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["messages", "id"], "messages"),
        (["prompt", "completion"], "prompt_completion"),
        (["text", "source"], "text"),
        (["input_ids", "labels"], "tokenized"),
        (["messages", "text"], "messages"),
        (["prompt", "completion", "text"], "prompt_completion"),
        (["text", "input_ids"], "text"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected
    assert expected in DATA_FORMATS


def test_detect_format_unknown_columns_says_what_and_how():
    with pytest.raises(ValueError) as error:
        detect_format(["question", "answer"])
    message = str(error.value)
    assert "['answer', 'question']" in message
    for expected in ("'messages'", "'prompt'", "'completion'", "'text'", "'input_ids'", "rename_column", "TRL"):
        assert expected in message


def test_detect_format_prompt_without_completion():
    with pytest.raises(ValueError, match="'prompt' column but no 'completion' column") as error:
        detect_format(["prompt", "response"])
    assert "['prompt', 'response']" in str(error.value)
    with pytest.raises(ValueError, match="PreferenceDistillTrainer"):
        detect_format(["prompt", "chosen", "rejected"])


# ---------------------------------------------------------------- text and tokenized


def test_text_trains_every_token_and_appends_eos(tokenizer):
    out = tokenize_example({"text": "the cat sat on the mat"}, tokenizer, data_format="text", max_length=None)
    ids = tokenizer("the cat sat on the mat")["input_ids"] + [tokenizer.eos_token_id]
    assert out == {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
    # eos already there: not doubled
    again = tokenize_example({"text": "the cat</s>"}, tokenizer, data_format="text", max_length=None)
    assert again["input_ids"] == tokenizer("the cat")["input_ids"] + [tokenizer.eos_token_id]


def test_text_truncation_keeps_the_first_tokens(tokenizer):
    text = "one two three four five the cat sat on the mat"
    full = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert len(full) > 5
    out = tokenize_example({"text": text}, tokenizer, data_format="text", max_length=5)
    assert out == {"input_ids": full[:5], "attention_mask": [1] * 5, "labels": full[:5]}


def test_tokenized_rows_used_as_given(tokenizer):
    out = tokenize_example({"input_ids": [5, 6, 7, 8]}, tokenizer, data_format="tokenized", max_length=3)
    assert out == {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]}
    row = {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 0], "labels": [IGNORE, 6, IGNORE]}
    assert tokenize_example(row, tokenizer, data_format="tokenized", max_length=None) == row
    with pytest.raises(ValueError, match="'labels' has 2 entries but its 'input_ids' has 3"):
        tokenize_example(
            {"input_ids": [5, 6, 7], "labels": [5, 6]}, tokenizer, data_format="tokenized", max_length=None
        )


def test_bos_is_added_once_when_the_tokenizer_adds_it(tokenizer, bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    text = tokenize_example({"text": "the cat"}, bos_tokenizer, data_format="text", max_length=None)
    assert text["input_ids"] == [bos, *encode(tokenizer, "the cat"), tokenizer.eos_token_id]
    row = {"prompt": "what is one", "completion": " sum is one"}
    out = tokenize_example(row, bos_tokenizer, data_format="prompt_completion", max_length=None)
    prompt_len = 1 + len(encode(tokenizer, "what is one"))
    assert out["input_ids"] == [bos, *encode(tokenizer, "what is one sum is one"), tokenizer.eos_token_id]
    assert out["labels"] == [IGNORE] * prompt_len + out["input_ids"][prompt_len:]
    # a chat template's output is never given a second bos (this template writes none)
    chat = tokenize_example({"messages": CONVERSATION}, bos_tokenizer, data_format="messages", max_length=None)
    assert bos not in chat["input_ids"]
    # the tokenizer without a post-processor adds no bos
    plain = tokenize_example({"text": "the cat"}, tokenizer, data_format="text", max_length=None)
    assert bos not in plain["input_ids"]


# ---------------------------------------------------------------- prompt / completion


def test_prompt_completion_masks_the_prompt(tokenizer):
    row = {"prompt": "what is four add four", "completion": " sum is two"}
    prompt_ids = tokenizer("what is four add four")["input_ids"]
    ids = tokenizer("what is four add four sum is two")["input_ids"] + [tokenizer.eos_token_id]
    assert ids[: len(prompt_ids)] == prompt_ids
    out = tokenize_example(row, tokenizer, data_format="prompt_completion", max_length=None)
    assert out["input_ids"] == ids
    assert out["attention_mask"] == [1] * len(ids)
    assert out["labels"] == [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :]
    # the completion's own tokens are trained, eos included
    assert out["labels"][-1] == tokenizer.eos_token_id
    assert [t for t in out["labels"] if t != IGNORE] == encode(tokenizer, " sum is two") + [tokenizer.eos_token_id]

    everything = tokenize_example(
        row, tokenizer, data_format="prompt_completion", max_length=None, completion_only_loss=False
    )
    assert everything["input_ids"] == ids and everything["labels"] == ids


def test_prompt_completion_truncation(tokenizer):
    row = {"prompt": "what is four add four", "completion": " sum is two"}
    prompt_len = len(tokenizer("what is four add four")["input_ids"])
    ids = tokenizer("what is four add four sum is two")["input_ids"] + [tokenizer.eos_token_id]
    out = tokenize_example(row, tokenizer, data_format="prompt_completion", max_length=prompt_len + 1)
    assert out["input_ids"] == ids[: prompt_len + 1]
    assert out["labels"] == [IGNORE] * prompt_len + [ids[prompt_len]]
    short = tokenize_example(row, tokenizer, data_format="prompt_completion", max_length=prompt_len - 1)
    assert short["labels"] == [IGNORE] * (prompt_len - 1)


def test_conversational_prompt_completion(tokenizer):
    row = {"prompt": CONVERSATION[:1], "completion": CONVERSATION[1:2]}
    ids, labels = expected_from_pieces(tokenizer, CONVERSATION_PIECES[:3])
    out = tokenize_example(row, tokenizer, data_format="prompt_completion", max_length=None)
    assert out == {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    # the template closes the turn with </s>; no second eos is appended
    assert out["input_ids"].count(tokenizer.eos_token_id) == 1
    everything = tokenize_example(
        row, tokenizer, data_format="prompt_completion", max_length=None, completion_only_loss=False
    )
    assert everything["labels"] == ids


def test_prompt_completion_must_agree_in_kind(tokenizer):
    row = {"prompt": CONVERSATION[:1], "completion": "sum is three"}
    with pytest.raises(ValueError, match="both be strings or both be conversations"):
        tokenize_example(row, tokenizer, data_format="prompt_completion", max_length=None)


# ---------------------------------------------------------------- messages


def test_messages_trains_both_assistant_turns_only(tokenizer):
    ids, labels = expected_from_pieces(tokenizer, CONVERSATION_PIECES)
    out = tokenize_example({"messages": CONVERSATION}, tokenizer, data_format="messages", max_length=None)
    assert out == {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    trained = [t for t in out["labels"] if t != IGNORE]
    assert trained == encode(tokenizer, "sum is three</s>") + encode(tokenizer, "sat on the mat</s>")

    everything = tokenize_example(
        {"messages": CONVERSATION}, tokenizer, data_format="messages", max_length=None, completion_only_loss=False
    )
    assert everything["input_ids"] == ids and everything["labels"] == ids


def test_messages_with_generation_markers_match_prefix_rendering(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = GENERATION_TEMPLATE
    ids, labels = expected_from_pieces(tokenizer, CONVERSATION_PIECES)
    out = tokenize_example({"messages": CONVERSATION}, tok, data_format="messages", max_length=None)
    assert out["input_ids"] == ids and out["labels"] == labels


def test_messages_without_character_offsets(tokenizer):
    """Tokenizers without offsets (no fast backend) locate assistant turns by tokenizing rendered prefixes."""
    tok = copy.deepcopy(tokenizer)
    render = tok.apply_chat_template

    def render_without_offsets(*args, **kwargs):
        out = render(*args, **kwargs)
        return BatchEncoding(dict(out)) if isinstance(out, BatchEncoding) else out

    tok.apply_chat_template = render_without_offsets
    ids, labels = expected_from_pieces(tokenizer, CONVERSATION_PIECES)
    out = tokenize_example({"messages": CONVERSATION}, tok, data_format="messages", max_length=None)
    assert out["input_ids"] == ids and out["labels"] == labels


def test_messages_truncation(tokenizer):
    ids, labels = expected_from_pieces(tokenizer, CONVERSATION_PIECES)
    out = tokenize_example({"messages": CONVERSATION}, tokenizer, data_format="messages", max_length=9)
    assert out["input_ids"] == ids[:9] and out["labels"] == labels[:9]


def test_messages_inconsistent_template_is_a_clear_error(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "[{{ messages | length }}]" + CHAT_TEMPLATE  # every prefix renders a different header
    with pytest.raises(ValueError, match="completion_only_loss=False"):
        tokenize_example({"messages": CONVERSATION}, tok, data_format="messages", max_length=None)
    out = tokenize_example(
        {"messages": CONVERSATION}, tok, data_format="messages", max_length=None, completion_only_loss=False
    )
    assert out["labels"] == out["input_ids"] == encode(tokenizer, tok.apply_chat_template(CONVERSATION, tokenize=False))


def test_messages_without_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="need a chat template"):
        tokenize_example({"messages": CONVERSATION}, tok, data_format="messages", max_length=None)


def test_missing_column_in_a_row(tokenizer):
    with pytest.raises(ValueError) as error:
        tokenize_example({"prompt": "what is one"}, tokenizer, data_format="prompt_completion", max_length=None)
    message = str(error.value)
    assert "'completion' column, which is missing" in message and "['prompt']" in message
    assert "rename_column" in message


# ---------------------------------------------------------------- prepare_dataset


def test_prepare_dataset_from_list_and_dataset(tokenizer):
    rows = prompt_completion_rows(6)
    from_list = prepare_dataset(rows, tokenizer, max_length=64)
    from_dataset = prepare_dataset(datasets.Dataset.from_list(rows), tokenizer, max_length=64)
    assert isinstance(from_list, datasets.Dataset)
    assert from_list.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(from_list) == 6 and from_list[:] == from_dataset[:]
    for row, out in zip(rows, from_list):
        assert out == tokenize_example(row, tokenizer, data_format="prompt_completion", max_length=64)


def test_prepare_dataset_keeps_extra_columns_only(tokenizer):
    rows = [{"text": "the cat", "source": "a", "images": [1, 2]}, {"text": "the dog", "source": "b", "images": [3]}]
    out = prepare_dataset(rows, tokenizer, extra_columns=("images",))
    assert sorted(out.column_names) == ["attention_mask", "images", "input_ids", "labels"]
    assert out["images"] == [[1, 2], [3]]
    with pytest.raises(ValueError, match=r"\['pixels'\].*columns present"):
        prepare_dataset(rows, tokenizer, extra_columns=("pixels",))


def test_prepare_dataset_drops_rows_with_nothing_trainable(tokenizer, caplog):
    rows = [
        {"messages": CONVERSATION},
        {"messages": [{"role": "user", "content": "the red cat"}]},  # no assistant turn
        {"messages": CONVERSATION[:2]},
        {"messages": [{"role": "user", "content": "two"}]},
    ]
    with caplog.at_level(logging.WARNING, logger="llmkd.data.formatting"):
        out = prepare_dataset(rows, tokenizer)
    assert len(out) == 2
    assert out[0]["input_ids"] == expected_from_pieces(tokenizer, CONVERSATION_PIECES)[0]
    assert "Dropped 2 of 4 rows" in caplog.text


def test_prepare_dataset_empty_errors(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        prepare_dataset(datasets.Dataset.from_dict({"text": []}), tokenizer)
    rows = [{"prompt": "what is one add two", "completion": " sum is three"}] * 2
    with pytest.raises(ValueError, match=r"All 2 rows .* were dropped .*max_length=2.*completion_only_loss=False"):
        prepare_dataset(rows, tokenizer, max_length=2)


def test_prepare_dataset_layout_and_row_errors(tokenizer):
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\]"):
        prepare_dataset([{"question": "q", "answer": "a"}], tokenizer)
    rows = [{"prompt": "what is one", "completion": " one"}, {"prompt": "what is two", "completion": None}]
    with pytest.raises(ValueError, match="Row 1: .*'completion' column, which has the value None"):
        prepare_dataset(rows, tokenizer)
    with pytest.raises(TypeError, match="dataset\\['train'\\]"):
        prepare_dataset(datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}), tokenizer)


# ---------------------------------------------------------------- collator


FEATURES = [
    {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE, 6, 7]},
    {"input_ids": [8], "attention_mask": [1], "labels": [8]},
]


def test_collator_pads_right():
    batch = DistillDataCollator(pad_token_id=0)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_pads_left_to_a_multiple():
    batch = DistillDataCollator(pad_token_id=1, pad_to_multiple_of=4, padding_side="left")(FEATURES)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 1, 1, 8]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE, 8]]
    right = DistillDataCollator(pad_token_id=1, pad_to_multiple_of=8)(FEATURES)
    assert right["input_ids"].shape == (2, 8) and right["labels"][0, 3:].eq(IGNORE).all()


def test_collator_derives_labels_when_absent():
    features = [{"input_ids": [5, 6, 7]}, {"input_ids": torch.tensor([8, 9]), "attention_mask": [1, 1]}]
    batch = DistillDataCollator(pad_token_id=0)(features)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, IGNORE]]


def test_collator_stacks_numeric_fields_and_drops_strings():
    torch.manual_seed(0)
    pixels = [torch.randn(3, 8, 8), torch.randn(3, 8, 8)]
    features = [
        {**FEATURES[0], "pixel_values": pixels[0], "image_sizes": [8, 8], "weight": 0.5, "source": "a"},
        {**FEATURES[1], "pixel_values": pixels[1], "image_sizes": np.array([8, 8]), "weight": 1.0, "source": "b"},
    ]
    batch = DistillDataCollator(pad_token_id=0)(features)
    assert "source" not in batch
    assert batch["pixel_values"].shape == (2, 3, 8, 8) and batch["pixel_values"].dtype == torch.float32
    assert torch.equal(batch["pixel_values"], torch.stack(pixels))
    assert batch["image_sizes"].tolist() == [[8, 8], [8, 8]]
    assert batch["weight"].tolist() == [0.5, 1.0]


def test_collator_errors():
    with pytest.raises(ValueError, match="different shapes"):
        DistillDataCollator(pad_token_id=0)(
            [
                {**FEATURES[0], "pixel_values": torch.zeros(3, 8, 8)},
                {**FEATURES[1], "pixel_values": torch.zeros(3, 4, 4)},
            ]
        )
    with pytest.raises(ValueError, match="padding_side must be one of"):
        DistillDataCollator(pad_token_id=0, padding_side="center")
    with pytest.raises(ValueError, match="tokenizer.pad_token = tokenizer.eos_token"):
        DistillDataCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="'labels' has shape \\(2,\\)"):
        DistillDataCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [1, 2]}])


def test_prepare_then_collate(tokenizer):
    data = prepare_dataset(prompt_completion_rows(4), tokenizer, max_length=64)
    batch = DistillDataCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)(list(data))
    lengths = [len(row["input_ids"]) for row in data]
    assert batch["input_ids"].shape == (4, 8 * -(-max(lengths) // 8))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, row in enumerate(data):
        assert batch["labels"][i, : lengths[i]].tolist() == row["labels"]
        assert batch["labels"][i, lengths[i] :].eq(IGNORE).all()
