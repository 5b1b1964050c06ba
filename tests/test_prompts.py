"""Each row's prompt boundary (llmkd.data.prompt_length): what on-policy distillation generates from."""

from __future__ import annotations

import pytest
from utils import make_tokenizer

from llmkd.data import PROMPT_LENGTH, prepare_dataset, tokenize_example


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_a_string_prompt_is_the_tokens_before_the_completion(tokenizer):
    row = tokenize_example({"prompt": "what is one add two", "completion": " three"}, tokenizer,
                           data_format="prompt_completion", max_length=None, with_prompt_length=True)
    n = row[PROMPT_LENGTH]
    assert row["input_ids"][:n] == tokenizer("what is one add two")["input_ids"]
    assert all(label == -100 for label in row["labels"][:n]) and row["labels"][n] != -100
    assert row["input_ids"][-1] == tokenizer.eos_token_id


def test_a_conversation_prompts_with_every_turn_before_the_last_assistant_turn(tokenizer):
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "three"}, {"role": "assistant", "content": "four"}]
    row = tokenize_example({"messages": messages}, tokenizer, data_format="messages", max_length=None,
                           with_prompt_length=True)
    expected = tokenizer.apply_chat_template(messages[:3], add_generation_prompt=True, return_dict=False)
    assert row["input_ids"][:row[PROMPT_LENGTH]] == list(expected)
    # the first assistant turn is trained on but lies inside the prompt: the prompt is not "until the first label"
    assert any(label != -100 for label in row["labels"][:row[PROMPT_LENGTH]])


def test_a_chat_prompt_completion_row_ends_its_prompt_with_the_generation_prompt(tokenizer):
    prompt = [{"role": "user", "content": "red cat"}]
    row = tokenize_example({"prompt": prompt, "completion": [{"role": "assistant", "content": "blue dog"}]},
                           tokenizer, data_format="prompt_completion", max_length=None, with_prompt_length=True)
    assert row["input_ids"][:row[PROMPT_LENGTH]] == list(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False))


def test_tokenized_rows_prompt_with_their_leading_untrained_tokens(tokenizer):
    row = tokenize_example({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}, tokenizer,
                           data_format="tokenized", max_length=None, with_prompt_length=True)
    assert row[PROMPT_LENGTH] == 2


@pytest.mark.parametrize("example, data_format, message", [
    ({"text": "the cat sat"}, "text", "'text' row has no prompt"),
    ({"input_ids": [5, 6], "labels": [5, 6]}, "tokenized", "prompt is empty"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "no turn before its last assistant"),
])
def test_a_row_without_a_prompt_is_refused_with_the_fix(tokenizer, example, data_format, message):
    with pytest.raises(ValueError, match=message) as error:
        tokenize_example(example, tokenizer, data_format=data_format, max_length=None, with_prompt_length=True)
    assert "lmbda: 0" in str(error.value) and "'prompt' and 'completion'" in str(error.value)


def test_prepare_dataset_adds_the_column_only_when_asked_and_clips_it_to_max_length(tokenizer):
    rows = [{"prompt": "the cat sat on the mat red blue", "completion": " one two"}] * 3
    assert PROMPT_LENGTH not in prepare_dataset(rows, tokenizer, max_length=None).column_names
    full = prepare_dataset(rows, tokenizer, max_length=None, with_prompt_length=True)
    n = full[0][PROMPT_LENGTH]
    short = prepare_dataset(rows, tokenizer, max_length=n, completion_only_loss=False, with_prompt_length=True)
    assert short[0][PROMPT_LENGTH] == n == len(short[0]["input_ids"])
    clipped = prepare_dataset(rows, tokenizer, max_length=n - 1, completion_only_loss=False, with_prompt_length=True)
    assert clipped[0][PROMPT_LENGTH] == n - 1
    with pytest.raises(ValueError, match="Row 0: A 'text' row has no prompt"):
        prepare_dataset([{"text": "the cat"}], tokenizer, with_prompt_length=True)
