"""Logit post-processing: the chunked path reproduces each architecture's logits or refuses the model."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaForCausalLM,
)
from utils import prompt_completion_rows, tiny_llama

from llmkd import DistillConfig, DistillTrainer
from llmkd.heads import UnsupportedModelError, logit_transform_for, verify_head_reproduction

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)


def _gemma(vocab, seed):
    torch.manual_seed(seed)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, head_dim=8, final_logit_softcapping=2.0, **SMALL))


def _cohere(vocab, seed):
    torch.manual_seed(seed)
    return CohereForCausalLM(CohereConfig(vocab_size=vocab, logit_scale=0.25, **SMALL))


def _granite(vocab, seed):
    torch.manual_seed(seed)
    return GraniteForCausalLM(GraniteConfig(vocab_size=vocab, logits_scaling=4.0, **SMALL))


@pytest.mark.parametrize("factory, expected", [
    (_gemma, dict(scale=1.0, softcap=2.0)),
    (_cohere, dict(scale=0.25, softcap=None)),
    (_granite, dict(scale=0.25, softcap=None)),
])
def test_transform_detected_and_verified(tokenizer, factory, expected):
    model = factory(len(tokenizer), 0)
    transform = logit_transform_for(model)
    assert transform.scale == pytest.approx(expected["scale"]) and transform.softcap == expected["softcap"]
    verify_head_reproduction(model, torch.tensor([[5, 6, 7, 8, 9]]))  # raises if not reproduced
    # the post-processing is restored after the check
    logits = model(torch.tensor([[5, 6, 7]])).logits
    if expected["softcap"] is not None:
        assert logits.abs().max() <= expected["softcap"]


@pytest.mark.parametrize("factory", [_gemma, _cohere, _granite])
def test_chunked_equals_dense_with_postprocessing(tmp_path, tokenizer, factory):
    data = Dataset.from_list(prompt_completion_rows(8))
    results = []
    for chunked in (True, False):
        student, teacher = factory(len(tokenizer), 1), factory(len(tokenizer), 2)
        args = DistillConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, optim="sgd",
                             learning_rate=0.5, use_chunked_loss=chunked, loss_chunk_size=7, kd_ratio=0.6,
                             save_strategy="no", report_to="none", disable_tqdm=True)
        trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                 processing_class=tokenizer)
        trainer.train()
        results.append((trainer.state.log_history[0]["train_loss"], student.state_dict()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for key, value in results[1][1].items():
        torch.testing.assert_close(results[0][1][key], value, rtol=1e-5, atol=1e-6)


class DoubledLogitsLlama(LlamaForCausalLM):
    """An architecture that post-processes its logits in a way llmkd does not know."""

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * 2.0
        return output


def test_unknown_postprocessing_is_refused(tmp_path, tokenizer):
    odd = DoubledLogitsLlama(tiny_llama(len(tokenizer)).config)
    with pytest.raises(UnsupportedModelError, match="use_chunked_loss=False"):
        verify_head_reproduction(odd, torch.tensor([[5, 6, 7]]))
    data = Dataset.from_list(prompt_completion_rows(8))
    args = DistillConfig(output_dir=str(tmp_path), max_steps=1, save_strategy="no", report_to="none")
    with pytest.raises(UnsupportedModelError, match="student"):
        DistillTrainer(model=odd, teacher_model=tiny_llama(len(tokenizer)), args=args, train_dataset=data,
                       processing_class=tokenizer)
    # even with the up-front check switched off, the step itself refuses to optimise a changed objective
    args = DistillConfig(output_dir=str(tmp_path), max_steps=1, save_strategy="no", report_to="none",
                         verify_logit_head=False)
    trainer = DistillTrainer(model=odd, teacher_model=tiny_llama(len(tokenizer)), args=args, train_dataset=data,
                             processing_class=tokenizer)
    with pytest.raises(RuntimeError, match="changed the output of its head"):
        trainer.train()
