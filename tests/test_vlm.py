"""Vision-language pairs (LLaVA-style, same processor): image fields reach student and teacher unchanged."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llmkd import DistillConfig, DistillTrainer

IMAGE_TOKEN = 320
PATCHES = 4  # (8 / 4) ** 2 patches, CLS dropped by the "default" feature strategy


def tiny_llava(vocab: int, hidden: int, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=8, patch_size=4)
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def image_rows(n: int = 8):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        prompt = [7, 8] + [IMAGE_TOKEN] * PATCHES + [9, 10 + i % 5]
        answer = [40 + i % 7, 41, 3]
        rows.append({
            "input_ids": prompt + answer,
            "labels": [-100] * len(prompt) + answer,
            "pixel_values": torch.randn(3, 8, 8, generator=generator).tolist(),
        })
    return rows


def test_pixel_values_reach_student_and_teacher_unchanged(tmp_path, tokenizer):
    vocab = 330
    student, teacher = tiny_llava(vocab, 32, 1), tiny_llava(vocab, 48, 2)
    seen = {"student": [], "teacher": []}

    def spy(role):
        def hook(module, args, kwargs):
            seen[role].append(kwargs.get("pixel_values", args[0] if args else None).detach().clone())
        return hook

    student.model.vision_tower.register_forward_pre_hook(spy("student"), with_kwargs=True)
    teacher.model.vision_tower.register_forward_pre_hook(spy("teacher"), with_kwargs=True)
    data = Dataset.from_list(image_rows())
    args = DistillConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, kd_ratio=1.0, save_strategy="no", report_to="none", disable_tqdm=True,
                         loss_chunk_size=8)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    seen["student"].clear(), seen["teacher"].clear()
    trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(seen["student"][0], batch["pixel_values"], rtol=0, atol=0)
    torch.testing.assert_close(seen["teacher"][0], batch["pixel_values"], rtol=0, atol=0)

    projector_before = student.model.multi_modal_projector.linear_1.weight.clone()
    trainer.train()
    kd = [e["kd_loss"] for e in trainer.state.log_history if "kd_loss" in e]
    assert kd[-1] < kd[0]
    # the image changes the student's loss through the projector, which therefore trains
    assert not torch.equal(projector_before, student.model.multi_modal_projector.linear_1.weight)


def test_images_change_the_teacher_signal(tmp_path, tokenizer):
    """Sanity check that the test above is meaningful: different pixels give a different distillation loss."""
    student, teacher = tiny_llava(330, 32, 1), tiny_llava(330, 48, 2)
    data = Dataset.from_list(image_rows(4))
    args = DistillConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", save_strategy="no", kd_ratio=1.0)
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                             processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        first = trainer.compute_loss(trainer.model, batch)
        batch["pixel_values"] = batch["pixel_values"] + 1.0
        second = trainer.compute_loss(trainer.model, batch)
    assert abs(first.item() - second.item()) > 1e-6
