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


# ------------------------------------------------------------------------------------ sampling with generate
@pytest.fixture(scope="module")
def tiny():
    from utils import make_tokenizer, tiny_llama

    tokenizer = make_tokenizer()
    return tiny_llama(len(tokenizer), seed=3), tokenizer


def _prompts(tokenizer):
    rows = [tokenizer("what is one add two")["input_ids"], tokenizer("the cat")["input_ids"]]
    width = max(len(r) for r in rows)
    batch = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    return left_padded_prompts(batch, torch.tensor([len(r) for r in rows]), tokenizer.pad_token_id)


def test_sampling_is_set_by_its_seed_and_leaves_the_global_rng_alone(tiny):
    from llmkd.generation import SamplingSettings, sample_completions

    model, tokenizer = tiny
    prompt_ids, prompt_mask = _prompts(tokenizer)
    settings = SamplingSettings(max_completion_length=12)
    kwargs = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.train()
    torch.manual_seed(123)
    first = sample_completions(model, prompt_ids, prompt_mask, settings, seed=7, **kwargs)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    again = sample_completions(model, prompt_ids, prompt_mask, settings, seed=7, **kwargs)
    assert torch.equal(first, again) and torch.equal(torch.rand(3), after_first)  # global RNG untouched
    other = sample_completions(model, prompt_ids, prompt_mask, settings, seed=8, **kwargs)
    assert not torch.equal(first, other)  # 12 tokens of a 320-token random model: equal with negligible chance
    assert model.training  # restored after sampling in eval mode


def test_top_k_one_samples_the_greedy_completion(tiny):
    from llmkd.generation import SamplingSettings, sample_completions

    model, tokenizer = tiny
    prompt_ids, prompt_mask = _prompts(tokenizer)
    sampled = sample_completions(model, prompt_ids, prompt_mask, SamplingSettings(max_completion_length=8, top_k=1),
                                 seed=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    greedy = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=False, max_new_tokens=8,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(sampled, greedy[:, prompt_ids.shape[1]:])


@pytest.mark.parametrize("field, value, message", [
    ("max_completion_length", 0, "max_completion_length must be >= 1"), ("temperature", 0.0, "temperature must be"),
    ("top_p", 0.0, "top_p must be in"), ("top_k", -1, "top_k must be >= 0"), ("min_p", 2.0, "min_p must be in"),
])
def test_bad_sampling_settings_are_refused(field, value, message):
    from llmkd.generation import SamplingSettings

    with pytest.raises(ValueError, match=message):
        SamplingSettings(**{field: value})
