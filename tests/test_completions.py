"""Prompts out of a training batch and generated completions back into training rows, against a plain Python
construction of the same rows."""

from __future__ import annotations

import pytest
import torch

from llmkd.generation import completion_batch, left_padded_prompts

PAD, EOS = 0, 2


def naive_rows(prompts, generated, eos):
    rows = []
    for prompt, new in zip(prompts, generated):
        completion = []
        for token in new:
            completion.append(token)
            if token == eos:
                break
        rows.append((prompt, completion))
    width = max(len(p) + len(c) for p, c in rows)
    ids, mask, labels = [], [], []
    for prompt, completion in rows:
        pad = width - len(prompt) - len(completion)
        ids.append(prompt + completion + [PAD] * pad)
        mask.append([1] * (len(prompt) + len(completion)) + [0] * pad)
        labels.append([-100] * len(prompt) + completion + [-100] * pad)
    return ids, mask, labels, [len(c) for _, c in rows]


def test_prompts_are_left_padded_and_completions_become_rows():
    torch.manual_seed(0)
    batch = torch.tensor([[5, 6, 7, 8, 9, PAD], [11, 12, 13, 14, 15, 16], [21, 22, 23, PAD, PAD, PAD]])
    lengths = torch.tensor([3, 5, 1])
    prompt_ids, prompt_mask = left_padded_prompts(batch, lengths, PAD)
    assert prompt_ids.tolist() == [[PAD, PAD, 5, 6, 7], [11, 12, 13, 14, 15], [PAD, PAD, PAD, PAD, 21]]
    assert prompt_mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]]

    generated = torch.tensor([[30, EOS, 31, 32], [EOS, PAD, PAD, PAD], [40, 41, 42, 43]])
    out = completion_batch(prompt_ids, prompt_mask, generated, EOS, PAD)
    prompts = [[5, 6, 7], [11, 12, 13, 14, 15], [21]]
    ids, mask, labels, completion_lengths = naive_rows(prompts, generated.tolist(), EOS)
    assert out["input_ids"].tolist() == ids
    assert out["attention_mask"].tolist() == mask
    assert out["labels"].tolist() == labels
    assert out["completion_length"].tolist() == completion_lengths == [2, 1, 4]
    assert out["eos_only"].tolist() == [False, True, False]
    assert out["truncated"].tolist() == [False, False, True]


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_match_the_plain_construction(seed):
    generator = torch.Generator().manual_seed(seed)
    batch, width, new = 6, 9, 7
    input_ids = torch.randint(3, 50, (batch, width), generator=generator)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    generated = torch.randint(2, 6, (batch, new), generator=generator)  # EOS (2) appears at random places
    prompt_ids, prompt_mask = left_padded_prompts(input_ids, lengths, PAD)
    out = completion_batch(prompt_ids, prompt_mask, generated, EOS, PAD)
    prompts = [input_ids[b, : lengths[b]].tolist() for b in range(batch)]
    ids, mask, labels, completion_lengths = naive_rows(prompts, generated.tolist(), EOS)
    assert out["input_ids"].tolist() == ids and out["labels"].tolist() == labels
    assert out["attention_mask"].tolist() == mask and out["completion_length"].tolist() == completion_lengths


def test_without_an_eos_every_completion_is_full_length():
    prompt_ids, prompt_mask = left_padded_prompts(torch.tensor([[7, 8]]), torch.tensor([2]), PAD)
    out = completion_batch(prompt_ids, prompt_mask, torch.tensor([[EOS, 9, 10]]), None, PAD)
    assert out["labels"].tolist() == [[-100, -100, EOS, 9, 10]] and out["truncated"].tolist() == [True]


def test_prompt_lengths_outside_the_batch_are_refused():
    with pytest.raises(ValueError, match=r"one length in \[1, 3\]"):
        left_padded_prompts(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 2]), PAD)
    with pytest.raises(ValueError, match=r"one length in \[1, 3\]"):
        left_padded_prompts(torch.zeros(2, 3, dtype=torch.long), torch.tensor([4, 2]), PAD)
