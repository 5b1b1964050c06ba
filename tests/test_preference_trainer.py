"""PreferenceDistillTrainer: DPO / paired KTO with the frozen teacher as the reference, on a tiny LLM and a tiny
LLaVA (losses = formulas on independently computed log-probs, sigmoid = TRL's own DPO loss, the margin grows
beyond the teacher's on held-out pairs, aux loss for MoE students, save/load, clear errors)."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from moe_utils import tiny_llava
from PIL import Image
from transformers import AutoModelForCausalLM, CLIPImageProcessor, LlavaProcessor
from trl import DPOConfig, DPOTrainer
from utils import make_tokenizer, tiny_llama

from llmkd import PreferenceDistillConfig, PreferenceDistillTrainer, upcycle_to_moe
from llmkd.losses import dpo_sigmoid_loss, kto_pair_loss

NAMES = ["one", "two", "three", "four", "five", "the"]


def preference_rows(n: int, seed: int) -> list[dict]:
    """'what is a add b' -> chosen: the right sum; rejected: a wrong one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        right = (a + b) % 6
        wrong = (right + rng.randint(1, 5)) % 6
        rows.append({"prompt": f"what is {NAMES[a]} add {NAMES[b]}", "chosen": f" sum is {NAMES[right]}",
                     "rejected": f" sum is {NAMES[wrong]}"})
    return rows


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=10, learning_rate=5e-3,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True, beta=0.1)
    values.update(overrides)
    return PreferenceDistillConfig(**values)


def sequence_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the response tokens' log-probs from the model's full logits (chosen rows, rejected rows)."""
    inputs = {k: v for k, v in batch.items() if k not in ("completion_mask", "ref_chosen_logps",
                                                            "ref_rejected_logps")}
    logits = model(**inputs).logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    token_logps = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * batch["completion_mask"][:, 1:]).sum(1).chunk(2)


def reference_logps(student, teacher, batch):
    """(pi_c, pi_r, ref_c, ref_r): the student's and the teacher's response log-probs, no gradient."""
    with torch.no_grad():
        return (*sequence_logps(student, batch), *sequence_logps(teacher, batch))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.mark.parametrize("loss_type", ["sigmoid", "kto_pair"])
def test_loss_equals_the_formula_on_independent_log_probs(tmp_path, tokenizer, loss_type):
    student, teacher = tiny_llama(len(tokenizer), 32, seed=1), tiny_llama(len(tokenizer), 48, seed=2)
    trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher,
                                       args=config(tmp_path, loss_type=loss_type, beta=0.3),
                                       train_dataset=Dataset.from_list(preference_rows(16, 0)),
                                       processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    pc, pr, rc, rr = reference_logps(student, teacher, batch)  # the reference is the teacher, not the student
    formula = dpo_sigmoid_loss if loss_type == "sigmoid" else kto_pair_loss
    torch.testing.assert_close(loss.detach(), formula(pc, pr, rc, rr, 0.3).mean(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_sigmoid_equals_trls_own_dpo_loss_with_the_teacher_as_ref_model(tmp_path, tokenizer):
    student, teacher = tiny_llama(len(tokenizer), 32, seed=1), tiny_llama(len(tokenizer), 48, seed=2)
    data = Dataset.from_list(preference_rows(16, 0))
    ours = PreferenceDistillTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher),
                                    args=config(tmp_path, loss_type="sigmoid"), train_dataset=data,
                                    processing_class=tokenizer)
    trl_args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=["sigmoid"], beta=0.1, bf16=False,
                         gradient_checkpointing=False, report_to="none", per_device_train_batch_size=4)
    theirs = DPOTrainer(model=copy.deepcopy(student), ref_model=copy.deepcopy(teacher), args=trl_args,
                        train_dataset=data, processing_class=tokenizer)
    batch = ours.data_collator([ours.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        ours_loss, theirs_loss = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
        # Both losses are -logsigmoid(beta * margin) of the same four sequence log-prob sums, grouped in another
        # order ((pi_c - pi_r) - (ref_c - ref_r) here, (pi_c - ref_c) - (pi_r - ref_r) in TRL) and, for the student,
        # from another head kernel (llmkd's fused log-prob head). Each sum of n token log-probs |log p| <= log V +
        # 2 max|z| carries float32 error <= 2 n u (log V + 2 max|z|); four of them enter the margin, and
        # |d(-logsigmoid(x))/dx| <= 1, so |d loss| <= beta * 8 n u (log V + 2 max|z|) (u = 2^-24).
        logits = [m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                  for m in (ours.model, ours.ref_model)]
        max_logit = max(z.abs().max().item() for z in logits)
        tokens = int(batch["completion_mask"].sum(-1).max())
        bound = trl_args.beta * 8 * tokens * 2.0**-24 * (math.log(len(tokenizer)) + 2 * max_logit)
        torch.testing.assert_close(ours_loss, theirs_loss, rtol=0.0, atol=bound)


@pytest.mark.parametrize("loss_type", ["kto_pair", "sigmoid"])
def test_the_margin_grows_beyond_the_teachers_on_held_out_pairs(tmp_path, tokenizer, loss_type):
    student, teacher = tiny_llama(len(tokenizer), 32, seed=1), tiny_llama(len(tokenizer), 48, seed=2)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher,
                                       args=config(tmp_path, loss_type=loss_type, max_steps=60, learning_rate=1e-2,
                                                   per_device_train_batch_size=8),
                                       train_dataset=Dataset.from_list(preference_rows(64, 0)),
                                       eval_dataset=Dataset.from_list(preference_rows(16, 99)),
                                       processing_class=tokenizer)
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()
    # rewards/margins = beta * ((pi_c - pi_r) - (ref_c - ref_r)): the student's margin beyond the teacher's
    assert abs(start["eval_rewards/margins"]) < 0.05
    assert end["eval_rewards/margins"] > start["eval_rewards/margins"] + 0.1
    assert end["eval_rewards/accuracies"] > 0.5  # more held-out pairs ranked right than wrong
    assert end["eval_teacher_margin"] == pytest.approx(start["eval_teacher_margin"])  # the teacher is frozen
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student")).eval()
    trainer.create_model_card()  # llmkd's card, not TRL's
    card = (tmp_path / "out" / "README.md").read_text()
    assert "llmkd" in card and "preference" in card and loss_type in card
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(reloaded(ids).logits, student.eval()(ids).logits)


def test_moe_student_adds_the_load_balancing_loss(tmp_path, tokenizer):
    student = upcycle_to_moe(tiny_llama(len(tokenizer), 32, seed=1))
    teacher = tiny_llama(len(tokenizer), 48, seed=2)
    trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher,
                                       args=config(tmp_path, loss_type="kto_pair", aux_loss_coef=0.5, max_steps=3),
                                       train_dataset=Dataset.from_list(preference_rows(16, 0)),
                                       processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    loss = trainer.compute_loss(trainer.model, batch)
    pc, pr, rc, rr = reference_logps(student, teacher, batch)
    with torch.no_grad():
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        aux = student(**inputs, output_router_logits=True).aux_loss  # the model's own definition
    torch.testing.assert_close(loss.detach(), kto_pair_loss(pc, pr, rc, rr, 0.1).mean() + 0.5 * aux,
                               rtol=1e-5, atol=1e-6)
    trainer.train()
    assert "moe_aux_loss" in trainer.state.log_history[0] and "moe_load_e3" in trainer.state.log_history[0]


def tiny_vision_processor(tokenizer) -> LlavaProcessor:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def image_preference_rows(n: int, seed: int) -> list[dict]:
    """A bright image -> chosen 'red', rejected 'blue'; a dark one -> the opposite."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        bright = i % 2 == 0
        pixels = rng.integers(150, 255, (8, 8, 3)) if bright else rng.integers(0, 100, (8, 8, 3))
        right, wrong = (" red cat", " blue dog") if bright else (" blue dog", " red cat")
        rows.append({"images": [Image.fromarray(pixels.astype(np.uint8))], "prompt": "<image>what is",
                     "chosen": right, "rejected": wrong})
    return rows


def test_image_text_pairs_reach_student_and_teacher_and_the_moe_vlm_learns(tmp_path, tokenizer):
    processor = tiny_vision_processor(tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(processor.tokenizer) + 4
    student = upcycle_to_moe(tiny_llava(vocab, 32, seed=1, image_token_id=image_id))
    teacher = tiny_llava(vocab, 48, seed=2, image_token_id=image_id)
    seen = {"student": 0, "teacher": 0}

    def count(role):
        def hook(module, args, kwargs):
            seen[role] += 1
        return hook

    student.model.vision_tower.register_forward_pre_hook(count("student"), with_kwargs=True)
    teacher.model.vision_tower.register_forward_pre_hook(count("teacher"), with_kwargs=True)
    trainer = PreferenceDistillTrainer(model=student, teacher_model=teacher,
                                       args=config(tmp_path, max_steps=12, learning_rate=1e-2, max_length=None),
                                       train_dataset=Dataset.from_list(image_preference_rows(32, 0)),
                                       eval_dataset=Dataset.from_list(image_preference_rows(8, 1)),
                                       processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (8, 3, 8, 8) and (batch["input_ids"] == image_id).sum() == 8 * 4
    loss = trainer.compute_loss(trainer.model, batch)
    pc, pr, rc, rr = reference_logps(student, teacher, batch)
    with torch.no_grad(), trainer.router_monitor.recording():  # the wrapper returns no aux loss: record it
        student(**{k: v for k, v in batch.items() if k != "completion_mask"})
        aux = trainer.router_monitor.aux_loss(batch["attention_mask"])
    torch.testing.assert_close(loss.detach() - 0.01 * aux, kto_pair_loss(pc, pr, rc, rr, 0.1).mean(),
                               rtol=1e-5, atol=1e-6)
    start = trainer.evaluate()
    seen.update(student=0, teacher=0)
    trainer.train()
    assert seen["student"] >= 12 and seen["teacher"] >= 12
    end = trainer.evaluate()
    assert end["eval_rewards/margins"] > start["eval_rewards/margins"] + 0.05
    assert "moe_aux_loss" in trainer.state.log_history[0]
    # the vision tower stays frozen (freeze_vision_tower), the trained student can be copied (no kept router graph)
    assert not any(p.requires_grad for n, p in student.named_parameters() if "vision_tower" in n)
    assert trainer.router_monitor.router_logits == []
    copy.deepcopy(student)


def test_which_parameters_train_in_the_preference_stage(tmp_path, tokenizer):
    processor = tiny_vision_processor(tokenizer)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(processor.tokenizer) + 4
    upcycle_to_moe(tiny_llava(vocab, 32, seed=1, image_token_id=image_id)).save_pretrained(tmp_path / "student")
    processor.save_pretrained(tmp_path / "student")
    teacher = tiny_llava(vocab, 48, seed=2, image_token_id=image_id)
    data = Dataset.from_list(image_preference_rows(8, 0))
    for stage in (None, "d2s"):
        trainer = PreferenceDistillTrainer(model=str(tmp_path / "student"), teacher_model=teacher,
                                           args=config(tmp_path, moe_stage=stage, max_length=None),
                                           train_dataset=data, teacher_processing_class=processor.tokenizer)
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert trainable and not any("vision_tower" in n for n in trainable)  # frozen by default, as in mimic
        if stage is None:  # loaded from a path: the whole language model trains
            assert any("self_attn" in n for n in trainable)
        else:  # d2s: FFNs/experts/routers and the projector only
            assert not any("self_attn" in n or "embed_tokens" in n or "lm_head" in n for n in trainable)
            assert any("experts" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    with pytest.raises(ValueError, match="moe_stage must be None or one of"):
        config(tmp_path, moe_stage="sparse")


def test_bad_input_is_refused_clearly(tmp_path, tokenizer):
    student, teacher = tiny_llama(len(tokenizer), 32, seed=1), tiny_llama(len(tokenizer), 48, seed=2)
    data = Dataset.from_list(preference_rows(8, 0))
    with pytest.raises(ValueError, match="needs 'prompt', 'chosen' and 'rejected'"):
        PreferenceDistillTrainer(model=student, teacher_model=teacher, args=config(tmp_path),
                                 train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b"}]),
                                 processing_class=tokenizer)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        config(tmp_path, loss_type="ipo")
    with pytest.raises(ValueError, match="the reference must be the teacher"):
        PreferenceDistillTrainer(model=student, teacher_model=student, args=config(tmp_path), train_dataset=data,
                                 processing_class=tokenizer)
    other = make_tokenizer(vocab_size=300)
    with pytest.raises(ValueError, match="[Tt]okenizer"):
        PreferenceDistillTrainer(model=student, teacher_model=teacher, args=config(tmp_path), train_dataset=data,
                                 processing_class=tokenizer, teacher_processing_class=other)
    with pytest.raises(ValueError, match="No preference data"):
        PreferenceDistillTrainer(model=student, teacher_model=teacher, args=config(tmp_path),
                                 processing_class=tokenizer)
