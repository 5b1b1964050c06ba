"""Held-out evaluation of a quickstart model: exact match by greedy generation, and perplexity on completions."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .task import PROMPT_LENGTH


@torch.no_grad()
def exact_match(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 256, max_new_tokens: int = 5) -> float:
    """Fraction of ``rows`` whose greedy completion (up to ``</s>``) equals the reference completion exactly."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        encoded = tokenizer([row["prompt"] for row in batch], return_tensors="pt", padding=True)
        generated = model.generate(
            **encoded.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(text == row["completion"] for text, row in zip(texts, batch, strict=True))
    model.train(was_training)
    return correct / max(len(rows), 1)


@torch.no_grad()
def completion_perplexity(model, tokenizer, rows: list[dict[str, str]], batch_size: int = 256) -> float:
    """``exp`` of the mean negative log-likelihood of the completion tokens (and the closing ``</s>``) given the
    prompt, teacher-forced, over all ``rows``."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        texts = [row["prompt"] + row["completion"] + tokenizer.eos_token for row in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right").to(model.device)
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
        labels[:, :PROMPT_LENGTH] = IGNORE_INDEX
        logits = model(**encoded).logits[:, :-1].float()  # (B, T-1, V)
        targets = labels[:, 1:]  # (B, T-1)
        total_nll += F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
        total_tokens += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return math.exp(total_nll / max(total_tokens, 1))
