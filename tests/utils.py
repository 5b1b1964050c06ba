"""Tiny, offline building blocks for the tests: a locally trained tokenizer, tiny Llama configs, generated data."""

from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
    "{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the cat dog sat on mat red blue green one two three four five add sum is what".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained here on generated text, with a chat template."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": False, **overrides,
    })
    return LlamaForCausalLM(config)


def tiny_bert_classifier(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, num_labels: int = 2,
                         **overrides) -> BertForSequenceClassification:
    """A BERT sequence classifier with no dropout (so that forward passes are deterministic)."""
    torch.manual_seed(seed)
    config = BertConfig(**{
        "vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 4,
        "intermediate_size": 2 * hidden, "max_position_embeddings": 128, "num_labels": num_labels,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0, **overrides,
    })
    return BertForSequenceClassification(config)


def tiny_llama_classifier(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, num_labels: int = 2,
                          pad_token_id: int = 0) -> LlamaForSequenceClassification:
    """A decoder-based sequence classifier (scores the last non-pad token)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, num_labels=num_labels,
        pad_token_id=pad_token_id,
    )
    return LlamaForSequenceClassification(config)


def classification_rows(n: int = 32, seed: int = 0) -> list[dict]:
    """GLUE-style single-sentence rows: label 1 when the sentence mentions an animal, else 0."""
    rng = random.Random(seed)
    words = "the sat on mat red blue green one two three".split()
    rows = []
    for _ in range(n):
        sentence = [rng.choice(words) for _ in range(rng.randint(3, 8))]
        label = rng.random() < 0.5
        if label:
            sentence.insert(rng.randrange(len(sentence) + 1), rng.choice(["cat", "dog"]))
        rows.append({"sentence": " ".join(sentence), "label": int(label), "idx": len(rows)})
    return rows


def prompt_completion_rows(n: int = 32, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        names = ["one", "two", "three", "four", "five", "the"]
        rows.append({"prompt": f"what is {names[a]} add {names[b]}", "completion": f" sum is {names[(a + b) % 6]}"})
    return rows


def write_local_run(folder) -> dict[str, str]:
    """Save a tiny student, a tiny teacher (each with the tokenizer) and a prompt/completion jsonl under ``folder``;
    return the recipe fields that name them."""
    import json
    from pathlib import Path

    folder = Path(folder)
    tokenizer = make_tokenizer()
    for name, hidden, seed in (("student", 32, 1), ("teacher", 48, 2)):
        tiny_llama(len(tokenizer), hidden=hidden, seed=seed).save_pretrained(str(folder / name))
        tokenizer.save_pretrained(str(folder / name))
    data = folder / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in prompt_completion_rows(16)))
    return {"model_name_or_path": str(folder / "student"), "teacher_model_name_or_path": str(folder / "teacher"),
            "dataset_name": str(data)}


def fixed_completions(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, eos_token_id: int,
                      vocab_size: int, max_new_tokens: int) -> torch.Tensor:
    """``(B, max_new_tokens)``: a completion that is a pure function of each (left-padded) prompt, standing in for a
    sampler when a test needs the same samples whatever the batch layout: ``1 + (sum of the prompt's ids) % 6``
    tokens (at most ``max_new_tokens``), the last one EOS when it fits, then padding with EOS."""
    rows = []
    for ids, mask in zip(prompt_ids.tolist(), prompt_mask.tolist()):
        prompt = [token for token, keep in zip(ids, mask) if keep]
        total = sum(prompt)
        length = min(1 + total % 6, max_new_tokens)
        first = len(SPECIAL_TOKENS)
        tokens = [first + (total * 7 + 3 * k) % (vocab_size - first) for k in range(length)]
        if length < max_new_tokens or total % 2 == 0:
            tokens[-1] = eos_token_id
        rows.append(tokens + [eos_token_id] * (max_new_tokens - length))
    return torch.tensor(rows, dtype=torch.long, device=prompt_ids.device)
