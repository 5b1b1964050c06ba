"""The cached quantities of teacher logits: top-k ids and log-probabilities, and the tail log-probability."""

from __future__ import annotations

import torch

CHUNK_TOKENS = 512  # tokens whose float32 (n, V) log-probabilities exist at once


@torch.no_grad()
def teacher_topk(
    logits: torch.Tensor, k: int, *, temperature: float = 1.0, vocab_size: int | None = None,
    chunk_tokens: int = CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(logits[:, :vocab_size] / temperature)`` in float32, and the log of the rest.

    Args:
        logits: ``(N, V_head)`` teacher logits (any float dtype, any device), ``V_head >= vocab_size``; the columns
            from ``vocab_size`` on (a head padded beyond the tokenizer) are cut before the softmax.
        k: tokens kept per position, ``1 <= k <= vocab_size``.
        temperature: the softmax temperature.
        vocab_size: ``V``, the real vocabulary (default: ``V_head``).
        chunk_tokens: rows converted to float32 at once.
    Returns:
        ``ids`` ``(N, k)`` int64 sorted by decreasing log-probability, ``logprobs`` ``(N, k)`` float32, and
        ``tail`` ``(N,)`` float32 ``= logsumexp`` of the log-probabilities outside the top-k (``-inf`` when
        ``k = V``), computed directly from those log-probabilities (no ``log(1 - sum)`` cancellation).
    """
    vocab_size = logits.shape[-1] if vocab_size is None else vocab_size
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"The teacher scores {logits.shape[-1]} tokens but the vocabulary has {vocab_size}: the "
                         "teacher and tokenizer do not match.")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}], got {k}.")
    ids, values, tails = [], [], []
    for start in range(0, logits.shape[0], chunk_tokens):
        z = logits[start:start + chunk_tokens, :vocab_size].float()
        if temperature != 1.0:
            z = z / temperature
        logp = torch.log_softmax(z, dim=-1)  # (n, V)
        top_values, top_ids = logp.topk(k, dim=-1, sorted=True)
        tail = torch.logsumexp(logp.scatter_(-1, top_ids, float("-inf")), dim=-1)  # (n,)
        ids.append(top_ids)
        values.append(top_values)
        tails.append(tail)
    if not ids:
        empty = logits.new_zeros((0, k))
        return empty.long(), empty.float(), logits.new_zeros((0,)).float()
    return torch.cat(ids), torch.cat(values), torch.cat(tails)
