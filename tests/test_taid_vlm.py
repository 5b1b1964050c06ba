"""TAIDTrainer on LLaVA-style vision-language pairs (the paper's TAID-VLM), built from tiny configs (no downloads).

One short run is shared by the tests: the images reach the vision towers of both models at every step, the student
(language model, projector and vision tower) learns toward its moving target, t follows TAID's schedule from the
logged step losses, the teacher stays frozen, and the saved student loads back with the same logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from test_vlm import image_rows, tiny_llava
from transformers import AutoModelForImageTextToText

from llmkd import TAIDConfig, TAIDTrainer
from llmkd.losses import forward_kl, taid_loss
from llmkd.losses.taid import TAIDSchedule

VOCAB = 330
MAX_STEPS = 8
BATCH = 4
T_START = 0.4


def record_vision_inputs(model, seen: list) -> None:
    """Append a copy of the pixel_values each call of ``model``'s vision tower receives to ``seen``."""
    def hook(module, args, kwargs):
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        seen.append(None if pixels is None else pixels.detach().clone())

    model.model.vision_tower.register_forward_pre_hook(hook, with_kwargs=True)


def logits_on(model, batch, vocab: int) -> torch.Tensor:
    """The model's next-token logits ``(B, S-1, vocab)`` on an image batch, without gradient."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
    return out.logits[:, :-1, :vocab].float()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """Train a tiny LLaVA student on a tiny LLaVA teacher with TAID for MAX_STEPS steps, spying on both vision
    towers. Returns the trainer, copies of both models before training, the spies' records and a fixed batch."""
    output_dir = tmp_path_factory.mktemp("taid_vlm")
    student, teacher = tiny_llava(VOCAB, 32, 1), tiny_llava(VOCAB, 48, 2)
    initial_student, initial_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    seen = {"student": [], "teacher": []}
    record_vision_inputs(student, seen["student"])
    record_vision_inputs(teacher, seen["teacher"])
    args = TAIDConfig(output_dir=str(output_dir / "out"), max_steps=MAX_STEPS, per_device_train_batch_size=BATCH,
                      learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                      disable_tqdm=True, loss_chunk_size=8, t_start=T_START, alpha=0.05, beta=0.5)
    trainer = TAIDTrainer(model=student, teacher_model=teacher, args=args,
                          train_dataset=Dataset.from_list(image_rows(16)), processing_class=tokenizer)
    for calls in seen.values():
        calls.clear()  # the head check at construction runs text-only forwards
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    return {"trainer": trainer, "initial_student": initial_student, "initial_teacher": initial_teacher,
            "seen": seen, "batch": batch, "output_dir": output_dir}


def logged(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_pixel_values_reach_both_vision_towers_at_every_step(run):
    seen = run["seen"]
    assert len(seen["student"]) == len(seen["teacher"]) == MAX_STEPS  # one micro-batch per optimizer step
    images = torch.tensor([row["pixel_values"] for row in image_rows(16)])  # (16, 3, 8, 8)
    for student_pixels, teacher_pixels in zip(seen["student"], seen["teacher"]):
        assert student_pixels is not None and student_pixels.shape == (BATCH, 3, 8, 8)
        torch.testing.assert_close(student_pixels, teacher_pixels, rtol=0, atol=0)
        for image in student_pixels:  # each one is a dataset image, unchanged by collation
            assert any(torch.equal(image, candidate) for candidate in images)


def test_the_taid_loss_depends_on_the_images(run):
    trainer, batch = run["trainer"], dict(run["batch"])
    trainer.model.eval()
    with torch.no_grad():
        first = trainer.compute_loss(trainer.model, batch).item()
        batch["pixel_values"] = batch["pixel_values"] + 1.0
        second = trainer.compute_loss(trainer.model, batch).item()
    assert abs(first - second) > 1e-6


def test_chunked_taid_loss_matches_the_dense_formula_on_images(run):
    """With kd_ratio 1 the trainer's loss is KL(p_t || q_theta) averaged over the completion tokens."""
    trainer, batch = run["trainer"], run["batch"]
    trainer.model.eval()
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        chunked = trainer.compute_loss(trainer.model, batch)
    dense = taid_loss(logits_on(trainer.model, batch, trainer.vocab_size),
                      logits_on(trainer.teacher, batch, trainer.vocab_size), mask, t=trainer.schedule.t)
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)


def test_the_student_learns_toward_its_target_and_the_teacher(run):
    trainer, batch = run["trainer"], run["batch"]
    vocab, t = trainer.vocab_size, trainer.schedule.t
    mask = batch["labels"][:, 1:] != -100
    teacher_logits = logits_on(trainer.teacher, batch, vocab)
    before, after = logits_on(run["initial_student"], batch, vocab), logits_on(trainer.model.eval(), batch, vocab)
    # the TAID loss at the final t, and the plain KL to the teacher, both fall
    assert taid_loss(after, teacher_logits, mask, t=t) < 0.7 * taid_loss(before, teacher_logits, mask, t=t)
    assert forward_kl(after, teacher_logits, mask) < 0.7 * forward_kl(before, teacher_logits, mask)


def test_every_part_of_the_student_trains_and_the_teacher_is_frozen(run):
    student, initial = run["trainer"].model.state_dict(), run["initial_student"].state_dict()
    for part in ("model.language_model.", "model.multi_modal_projector.", "model.vision_tower."):
        names = [name for name in initial if name.startswith(part)]
        assert names, part
        assert any(not torch.equal(student[name], initial[name]) for name in names), f"{part} did not change"
    teacher = run["trainer"].teacher.state_dict()
    for name, value in run["initial_teacher"].state_dict().items():
        assert torch.equal(teacher[name], value), name


def test_t_follows_the_schedule_from_the_logged_step_losses(run):
    trainer = run["trainer"]
    # the schedule is fed the cross-entropy KL + H(p_t) (logged as taid_ce), with the official 0-based step index
    ts, ce = logged(trainer, "taid_t"), logged(trainer, "taid_ce")
    assert len(ts) == MAX_STEPS and ts[0] == pytest.approx(T_START)  # the first step only records J
    replay = TAIDSchedule(t_start=T_START, alpha=0.05, beta=0.5)
    for step, (t, loss) in enumerate(zip(ts, ce)):
        if step > 0:  # from the second step on, t is at least the linear floor
            assert t >= replay.linear_floor(step, MAX_STEPS) - 1e-6
        assert replay.update(loss, step, MAX_STEPS) == pytest.approx(t, abs=1e-5)  # logs round to 6 decimals
    assert all(later >= earlier for earlier, later in zip(ts, ts[1:]))
    assert trainer.schedule.t == pytest.approx(ts[-1], abs=1e-6) and ts[-1] > T_START


def test_saved_student_loads_back_with_identical_logits(run):
    trainer, batch = run["trainer"], run["batch"]
    folder = run["output_dir"] / "student"
    trainer.save_model(str(folder))
    assert (folder / "model.safetensors").exists()
    reloaded = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()
    assert type(reloaded) is type(trainer.model)
    torch.testing.assert_close(logits_on(reloaded, batch, VOCAB), logits_on(trainer.model.eval(), batch, VOCAB),
                               rtol=0, atol=0)
