"""The teacher: vocabulary alignment with the student, and preparation for the run (device, ZeRO, FSDP).

Where the teacher lives (see ACCELERATE.md):
* single process: moved to the training device, eval mode, no gradients;
* DeepSpeed ZeRO-3: a ZeRO-3 inference engine, its parameters partitioned across ranks like the student's;
* DeepSpeed ZeRO-1/2: a stage-0 engine, replicated on every rank (ZeRO-1/2 shard optimizer state, which a
  frozen teacher does not have);
* FSDP: wrapped with FSDP so its parameters are sharded;
* quantized (bitsandbytes): kept where it was loaded (bitsandbytes models cannot be moved or sharded).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .heads import head_parameters, head_rows, unwrap_model

logger = logging.getLogger(__name__)


class VocabularyMismatchError(ValueError):
    """Student and teacher do not share a token-id space."""


def _vocab(tokenizer) -> dict[str, int]:
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return tokenizer.get_vocab()


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """Refuse a student and teacher whose tokenizers differ (token ids would not mean the same text)."""
    if student_tokenizer is None or teacher_tokenizer is None:
        return
    student_vocab, teacher_vocab = _vocab(student_tokenizer), _vocab(teacher_tokenizer)
    if student_vocab != teacher_vocab:
        only_student = len(set(student_vocab.items()) - set(teacher_vocab.items()))
        only_teacher = len(set(teacher_vocab.items()) - set(student_vocab.items()))
        raise VocabularyMismatchError(
            f"The student and teacher tokenizers differ ({len(student_vocab)} vs {len(teacher_vocab)} tokens; "
            f"{only_student} token-id pairs only in the student's, {only_teacher} only in the teacher's). "
            "Token-level distillation compares distributions over the same token ids. To distil across "
            "tokenizers, set cross_tokenizer_loss: uld, hybrid or span (the text is aligned between the two "
            "tokenizations; docs/CROSS_TOKENIZER.md); or pick a teacher and student of the same model family "
            "(e.g. Qwen2.5-7B -> Qwen2.5-0.5B) for exact token-level distillation."
        )


def aligned_vocab_size(student: nn.Module, teacher: nn.Module, student_tokenizer=None, teacher_tokenizer=None) -> int:
    """The number of leading token ids both models score, after checking they share a tokenizer.

    Models of one family often pad their embedding matrices differently (Qwen2.5-0.5B has 151936 rows, 7B has
    152064, for the same 151665-token tokenizer): the divergence is then computed on the shared ids
    ``[0, min(V_s, V_t))`` and the alignment is logged. Different tokenizers cannot be aligned id by id and are an
    error.
    """
    check_same_tokenizer(student_tokenizer, teacher_tokenizer)
    student_rows, teacher_rows = head_rows(student), head_rows(teacher)
    size = min(student_rows, teacher_rows)
    tokenizer = student_tokenizer if student_tokenizer is not None else teacher_tokenizer
    if tokenizer is not None:
        tokenizer_size = len(getattr(tokenizer, "tokenizer", tokenizer))
        if tokenizer_size > size:
            raise VocabularyMismatchError(
                f"The tokenizer has {tokenizer_size} tokens but the smaller output head scores only {size} "
                f"(student {student_rows}, teacher {teacher_rows}); resize the model's embeddings "
                "(model.resize_token_embeddings(len(tokenizer))) or use the tokenizer the models were trained with."
            )
    if student_rows != teacher_rows:
        logger.info(
            "Vocabulary sizes differ (student head %d rows, teacher head %d rows) with a shared tokenizer: "
            "distilling over the %d shared token ids.", student_rows, teacher_rows, size,
        )
    return size


def check_label_spaces(student: nn.Module, teacher: nn.Module) -> int:
    """The number of classes of two sequence classifiers, after checking they predict the same classes.

    Both must have the same ``num_labels``; when both configs name their labels (``id2label`` other than the
    default ``LABEL_0``, ``LABEL_1``...), the names must agree id by id.
    """
    student_config, teacher_config = unwrap_model(student).config, unwrap_model(teacher).config
    if student_config.num_labels != teacher_config.num_labels:
        raise ValueError(
            f"The student classifies into {student_config.num_labels} classes and the teacher into "
            f"{teacher_config.num_labels}: distillation compares their class distributions, so build the student "
            f"with num_labels={teacher_config.num_labels} (and the teacher's id2label/label2id)."
        )

    def named(config) -> dict[int, str] | None:
        names = {int(k): v for k, v in (getattr(config, "id2label", None) or {}).items()}
        return None if all(v == f"LABEL_{k}" for k, v in names.items()) else names

    student_names, teacher_names = named(student_config), named(teacher_config)
    if student_names is not None and teacher_names is not None and student_names != teacher_names:
        raise ValueError(
            f"The student's classes {student_names} are not the teacher's {teacher_names} (id by id): give the "
            "student the teacher's id2label/label2id so that class i means the same thing in both models."
        )
    return int(student_config.num_labels)


def _is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def is_quantized(model: nn.Module) -> bool:
    return getattr(unwrap_model(model), "quantization_config", None) is not None or bool(
        getattr(unwrap_model(model), "is_quantized", False)
    )


def prepare_teacher(teacher: nn.Module, accelerator, *, is_deepspeed: bool, is_fsdp: bool) -> nn.Module:
    """Freeze the teacher and place it for the run (see the module docstring)."""
    freeze(teacher)
    if is_quantized(teacher):
        if is_deepspeed or is_fsdp:
            logger.info("The teacher is quantized with bitsandbytes: it stays replicated on every process "
                        "(bitsandbytes weights cannot be partitioned by ZeRO-3 or FSDP).")
        return teacher
    if is_deepspeed:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(teacher, accelerator)
    if is_fsdp:
        from trl.models import prepare_fsdp

        return prepare_fsdp(teacher, accelerator)
    return accelerator.prepare_model(teacher, evaluation_mode=True)


@contextlib.contextmanager
def gathered_head_parameters(model: nn.Module):
    """Yield the output head's (weight ``(V, H)``, bias or None) in full: gathered if ZeRO-3 partitioned them,
    all-gathered from their shards if FSDP2 made them DTensors."""
    weight, bias = head_parameters(model)
    params = [p for p in (weight, bias) if p is not None]
    if any(_is_partitioned(p) for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield weight, bias
    elif any(isinstance(p, DTensor) for p in params):
        yield tuple(p.full_tensor() if isinstance(p, DTensor) else p for p in (weight, bias))
    else:
        yield weight, bias
