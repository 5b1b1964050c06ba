"""MoEMimicTrainer: the d2d and d2s stages on a tiny LLM and a tiny LLaVA (loss = formula, right parameters train,
loss falls, per-expert load logged, save/load round trip)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from moe_utils import IMAGE_TOKEN, tiny_llava
from test_vlm import image_rows
from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration
from utils import prompt_completion_rows, tiny_llama

from llmkd import MoEMimicConfig, MoEMimicTrainer
from llmkd.models.routing import is_moe_model
from llmkd.trainers.moe import stage_trainable


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=12, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", report_to="none", seed=0, disable_tqdm=True,
                  loss_chunk_size=16)
    values.update(overrides)
    return MoEMimicConfig(**values)


@pytest.fixture(scope="module")
def text_data():
    return Dataset.from_list(prompt_completion_rows(32))


def reference_loss(student, teacher, batch, kd_weight=1.0, ce_weight=1.0, aux_coef=0.01):
    """KL(teacher || student) + CE over the response tokens (position t predicts token t+1) + coef * aux, where the
    aux loss is the model's own (output_router_logits=True), not llmkd's hooks."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    outputs = student(**inputs, output_router_logits=True) if is_moe_model(student) else student(**inputs)
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    s = outputs.logits[:, :-1][valid].float()
    t = teacher_logits[:, :-1][valid].float()
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum()
    ce = F.cross_entropy(s, targets[valid], reduction="sum")
    loss = (kd_weight * kl + ce_weight * ce) / valid.sum()
    aux = getattr(outputs, "aux_loss", None)
    return loss + aux_coef * aux if aux is not None else loss


def ffn_teacher_for(student, seed: int = 5):
    """Sharpen the student's head, then a teacher = the student with random FFNs: a target far from the student
    (KL of several nats) that a student training only its FFNs can reach (the d2s stage's situation)."""
    with torch.no_grad():
        student.get_output_embeddings().weight.mul_(20.0)
    teacher = copy.deepcopy(student)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in teacher.named_parameters():
            if ".mlp." in name and "vision" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return teacher


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_d2s_upcycles_trains_only_the_ffns_and_round_trips(tmp_path, tokenizer, text_data):
    student = tiny_llama(len(tokenizer), 32, layers=3, seed=1)
    teacher = ffn_teacher_for(student)
    trainer = MoEMimicTrainer(model=student, teacher_model=teacher, args=config(tmp_path, moe_stage="d2s"),
                              train_dataset=text_data, processing_class=tokenizer)
    model = trainer.model
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and is_moe_model(model)
    assert [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")] == [0, 2]
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (".mlp." in name and "shared_expert" not in name), name
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        got = trainer.compute_loss(model, batch)
        want = reference_loss(model, teacher, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    kd = logged(trainer, "kd_loss")
    assert sum(kd[-3:]) < 0.6 * sum(kd[:3])
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any("experts" in k for k in changed) and any("mlp.gate.weight" in k for k in changed)
    assert any(k.endswith("layers.1.mlp.down_proj.weight") for k in changed)  # the remaining dense FFN trains too
    assert not any("self_attn" in k or "embed_tokens" in k or "lm_head" in k or "norm" in k for k in changed)
    assert all(not v.any() for k, v in after.items() if "shared_expert" in k)  # the zero shared expert stays 0
    loads = [logged(trainer, f"moe_load_e{e}") for e in range(4)]
    assert all(len(series) == 12 for series in loads)
    for step in range(12):
        assert sum(series[step] for series in loads) == pytest.approx(1.0, abs=1e-5)
    assert all(value >= 2.0 - 1e-6 for value in logged(trainer, "moe_aux_loss"))  # E * sum f P >= k

    assert trainer.router_monitor.router_logits == []  # no router graph kept alive after the step
    copy.deepcopy(model)  # so the trained student can be copied (it failed while the logits were kept)
    trainer.save_model(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student")).eval()
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    torch.testing.assert_close(reloaded(batch["input_ids"]).logits, model.eval()(batch["input_ids"]).logits)


def test_d2d_trains_the_whole_dense_model_without_aux(tmp_path, tokenizer, text_data):
    student, teacher = tiny_llama(len(tokenizer), 32, seed=1), tiny_llama(len(tokenizer), 48, seed=2)
    trainer = MoEMimicTrainer(model=student, teacher_model=teacher,
                              args=config(tmp_path, moe_stage="d2d", kd_weight=0.7, ce_weight=0.4, max_steps=4),
                              train_dataset=text_data, processing_class=tokenizer)
    assert trainer.model is student and trainer.router_monitor is None
    assert all(p.requires_grad for p in student.parameters())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(trainer.compute_loss(student, batch),
                                   reference_loss(student, teacher, batch, 0.7, 0.4), rtol=1e-5, atol=1e-6)
    before = copy.deepcopy(student.state_dict())
    trainer.train()
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           student.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    assert "moe_aux_loss" not in trainer.state.log_history[0]


def test_the_aux_loss_gradient_reaches_the_routers(tmp_path, tokenizer, text_data):
    """With kd and ce weights 0 only the load-balancing term is left: the routers get its gradient."""
    student, teacher = tiny_llama(len(tokenizer), 32, seed=1), tiny_llama(len(tokenizer), 48, seed=2)
    trainer = MoEMimicTrainer(model=student, teacher_model=teacher,
                              args=config(tmp_path, kd_weight=0.0, ce_weight=0.0, aux_loss_coef=1.0),
                              train_dataset=text_data, processing_class=tokenizer)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    loss = trainer.compute_loss(model, batch)
    want = reference_loss(model, teacher, batch, 0.0, 0.0, 1.0)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_vlm_d2s_trains_ffns_and_projector_and_computes_aux_without_the_wrapper(tmp_path, tokenizer):
    student = tiny_llava(IMAGE_TOKEN + 10, 32, seed=1)
    teacher = ffn_teacher_for(student)
    data = Dataset.from_list(image_rows(16))
    trainer = MoEMimicTrainer(model=student, teacher_model=teacher,
                              args=config(tmp_path, per_device_train_batch_size=4, max_steps=10, loss_chunk_size=8),
                              train_dataset=data, processing_class=tokenizer)
    model = trainer.model
    assert isinstance(model, LlavaForConditionalGeneration) and model.config.text_config.model_type == "qwen2_moe"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n or "self_attn" in n or "embed_tokens" in n for n in trainable)
    assert any("experts" in n for n in trainable)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert getattr(model(**inputs), "aux_loss", None) is None  # the wrapper returns no aux loss: llmkd's hooks do
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.train()
    assert logged(trainer, "moe_aux_loss") and logged(trainer, "kd_loss")[-1] < logged(trainer, "kd_loss")[0]
    after = model.state_dict()
    assert not torch.equal(before["model.multi_modal_projector.linear_1.weight"],
                           after["model.multi_modal_projector.linear_1.weight"])
    assert all(torch.equal(before[k], after[k]) for k in after if "vision_tower" in k)
    trainer.save_model(str(tmp_path / "vlm"))
    reloaded = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "vlm")).eval()
    torch.testing.assert_close(reloaded(**inputs).logits, model.eval()(**inputs).logits)


def test_stage_parameter_selection():
    assert stage_trainable("model.layers.3.mlp.experts.gate_up_proj", "d2s")
    assert stage_trainable("model.language_model.layers.0.mlp.gate.weight", "d2s")
    assert stage_trainable("model.multi_modal_projector.linear_1.weight", "d2s")
    assert not stage_trainable("model.layers.3.self_attn.q_proj.weight", "d2s")
    assert not stage_trainable("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "d2s")
    assert stage_trainable("model.layers.3.self_attn.q_proj.weight", "d2d")
    assert not stage_trainable("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "d2d")
    assert stage_trainable("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight", "d2d",
                           freeze_vision_tower=False)


def test_misuse_is_refused(tmp_path, tokenizer, text_data):
    with pytest.raises(ValueError, match="moe_stage must be one of"):
        config(tmp_path, moe_stage="sparse")
    with pytest.raises(ValueError, match="LoRA is not supported"):
        MoEMimicTrainer(model=tiny_llama(len(tokenizer), 32), teacher_model=tiny_llama(len(tokenizer), 48),
                        args=config(tmp_path, use_peft=True), train_dataset=text_data, processing_class=tokenizer)
