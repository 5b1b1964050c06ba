"""Between a training batch and a generator: prompts out, completions back in, as tensors (no loop per token).

A training batch is right-padded (``input_ids`` ``(B, T)``) and each row's prompt is its first
``prompt_length[b]`` tokens (:data:`llmkd.data.PROMPT_LENGTH`). A generator wants the prompts left-padded, and
returns ``(B, L)`` new tokens per row. The completion of a row is its new tokens up to and including the first
EOS (all ``L`` when there is none); what follows the EOS is padding. The training row is the prompt followed by
the completion: the prompt carries no loss (label -100), every completion token does, its EOS included
(docs/ALGORITHMS.md section 5).
"""

from __future__ import annotations

import torch

from ..constants import IGNORE_INDEX


def left_padded_prompts(input_ids: torch.Tensor, prompt_length: torch.Tensor,
                        pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of a right-padded batch, left-padded.

    Args:
        input_ids: ``(B, T)`` long, each row starting with its prompt.
        prompt_length: ``(B,)`` long, ``1 <= prompt_length[b] <= T``.
        pad_token_id: the id written into the padding.
    Returns:
        ``(prompt_ids, prompt_mask)``, both ``(B, P)`` long with ``P = max(prompt_length)``: row b holds its
        prompt in its last ``prompt_length[b]`` positions, mask 1 there and 0 before.
    """
    batch, width = input_ids.shape
    lengths = prompt_length.to(device=input_ids.device, dtype=torch.long)
    if lengths.numel() != batch or bool((lengths < 1).any()) or bool((lengths > width).any()):
        raise ValueError(f"prompt_length must hold one length in [1, {width}] per row of input_ids "
                         f"{tuple(input_ids.shape)}, got {lengths.tolist()}.")
    longest = int(lengths.max())
    positions = torch.arange(longest, device=input_ids.device)  # (P,)
    shift = (longest - lengths).unsqueeze(1)  # (B, 1): left padding of each row
    source = (positions.unsqueeze(0) - shift).clamp_min(0)  # (B, P): the prompt position shown at each slot
    mask = positions.unsqueeze(0) >= shift
    prompt_ids = torch.where(mask, input_ids.gather(1, source), torch.full_like(source, pad_token_id))
    return prompt_ids, mask.long()


def completion_batch(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generated: torch.Tensor,
                     eos_token_id: int | None, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Training rows from left-padded prompts and the tokens generated after them.

    Args:
        prompt_ids / prompt_mask: ``(B, P)`` from :func:`left_padded_prompts`.
        generated: ``(B, L)`` long, the new tokens of each row (anything after a row's first EOS is ignored).
        eos_token_id: the end of a completion (None: every completion is ``L`` tokens long).
        pad_token_id: the id of padded ``input_ids`` positions.
    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: ``(B, T')`` long, right-padded, ``T' = max_b (prompt_b +
        completion_b)``; labels -100 on prompts and padding. ``completion_length``: ``(B,)`` long, the completion
        tokens of each row (EOS included). ``eos_only``: ``(B,)`` bool, completions that are a single EOS.
        ``truncated``: ``(B,)`` bool, completions that reached ``L`` tokens without an EOS.
    """
    batch, new = generated.shape
    device = generated.device
    steps = torch.arange(new, device=device)
    if eos_token_id is None:
        is_eos = torch.zeros_like(generated, dtype=torch.bool)
    else:
        is_eos = generated == eos_token_id
    has_eos = is_eos.any(dim=1)
    first_eos = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, new, dtype=torch.long))
    completion_length = torch.where(has_eos, first_eos + 1, first_eos)  # (B,)
    lengths = prompt_mask.sum(dim=1).to(device)  # (B,) prompt tokens
    total = lengths + completion_length
    width = int(total.max())

    # row b, column j: prompt token j (j < lengths[b]), else completion token j - lengths[b]
    columns = torch.arange(width, device=device).unsqueeze(0)  # (1, T')
    in_prompt = columns < lengths.unsqueeze(1)
    in_completion = ~in_prompt & (columns < total.unsqueeze(1))
    prompt_width = prompt_ids.shape[1]
    prompt_source = (columns + (prompt_width - lengths).unsqueeze(1)).clamp(0, max(prompt_width - 1, 0))
    completion_source = (columns - lengths.unsqueeze(1)).clamp(0, max(new - 1, 0))
    from_prompt = prompt_ids.to(device).gather(1, prompt_source)
    from_completion = generated.gather(1, completion_source) if new else torch.zeros_like(from_prompt)
    pad = torch.full_like(from_prompt, pad_token_id)
    input_ids = torch.where(in_prompt, from_prompt, torch.where(in_completion, from_completion, pad))
    labels = torch.where(in_completion, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return {
        "input_ids": input_ids,
        "attention_mask": (in_prompt | in_completion).long(),
        "labels": labels,
        "completion_length": completion_length,
        "eos_only": has_eos & (first_eos == 0),
        "truncated": ~has_eos,
    }
