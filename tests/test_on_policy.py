"""On-policy distillation in the token-level trainers (llmkd/trainers/on_policy.py, docs/ON_POLICY.md): lmbda=0 is
the off-policy run exactly; the completions the student samples (with the current weights and the derived seed) are
the rows distilled, only their tokens carrying loss; the trainer's loss and gradient on them equal a naive
reference written from the formulas; every token-level trainer trains on-policy; LoRA students sample with their
adapters; bad settings are refused with the fix.

Accumulation and data parallelism on a fixed set of samples, and ZeRO-3: tests/test_on_policy_distributed.py;
exact resume: tests/test_resume.py (case ``on_policy``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from utils import fixed_completions, prompt_completion_rows, tiny_llama
from llmkd import (
    DistillConfig,
    DistillTrainer,
    MoEMimicConfig,
    MoEMimicTrainer,
    SinKDConfig,
    SinKDTrainer,
    TAIDConfig,
    TAIDTrainer,
)
from llmkd.constants import IGNORE_INDEX
from llmkd.data import PROMPT_LENGTH
from llmkd.generation import completion_batch, sample_completions
from llmkd.trainers.on_policy import (
    COMPLETIONS_KEY,
    check_on_policy_setup,
    completion_source,
    derived_seed,
)

COMPLETION = 6  # max_completion_length of these tests
# float32 sums of at most a few hundred O(1) terms, added in a different order by the trainer's chunked engine and
# the reference: the relative rounding error is below n * 2^-24 ~ 2e-5 for n = 300
RTOL, ATOL = 2e-5, 1e-7


class Recording:
    """Mixin: keeps what each sampling call got and returned (with the sampling model's weights) and every
    training micro-batch compute_loss saw."""

    def sample(self, model, prompt_ids, prompt_mask, *, seed, extra_inputs):
        generated = super().sample(model, prompt_ids, prompt_mask, seed=seed, extra_inputs=extra_inputs)
        self.samples.append({
            "step": self.state.global_step, "seed": seed, "prompt_ids": prompt_ids.clone(),
            "prompt_mask": prompt_mask.clone(), "generated": generated.clone(),
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        })
        return generated

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.batches.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class RecordingTrainer(Recording, DistillTrainer):
    pass


class EOSOnly(DistillTrainer):
    """A sampler whose every completion is a single EOS."""

    def sample(self, model, prompt_ids, prompt_mask, *, seed, extra_inputs):
        eos = self.processing_class.eos_token_id
        return torch.full((prompt_ids.shape[0], COMPLETION), eos, dtype=torch.long)


class StepWeights(TrainerCallback):
    def __init__(self):
        self.after = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def config(tmp_path, config_class=DistillConfig, **fields):
    base = dict(output_dir=str(tmp_path / "run"), max_steps=2, logging_steps=1, report_to="none", use_cpu=True,
                per_device_train_batch_size=4, save_strategy="no", seed=0, disable_tqdm=True,
                dataloader_num_workers=0, learning_rate=1e-2, max_completion_length=COMPLETION)
    if config_class is not SinKDConfig:
        base["loss_chunk_size"] = 16
    return config_class(**{**base, **fields})


def build(tokenizer, args, trainer_class=DistillTrainer, rows=None, student=None, **kwargs):
    student = student if student is not None else tiny_llama(len(tokenizer), 32, seed=1)
    teacher = tiny_llama(len(tokenizer), 48, seed=2)
    data = Dataset.from_list(rows if rows is not None else prompt_completion_rows(16, seed=3))
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=data,
                            processing_class=tokenizer, **kwargs)
    if isinstance(trainer, Recording):
        trainer.samples, trainer.batches = [], []
    return trainer


def train_logs(trainer):
    return [{k: v for k, v in h.items() if "runtime" not in k and "per_second" not in k}
            for h in trainer.state.log_history]


# ------------------------------------------------------------------------------------------------ lmbda = 0
def test_lmbda_zero_is_the_off_policy_run_exactly(tokenizer, tmp_path, single_thread):
    plain = build(tokenizer, config(tmp_path / "a", gradient_accumulation_steps=2, per_device_train_batch_size=2,
                                    max_steps=3))
    zero = build(tokenizer, config(tmp_path / "b", gradient_accumulation_steps=2, per_device_train_batch_size=2,
                                   max_steps=3, lmbda=0.0, seq_kd=False, top_k=3, generation_temperature=0.7,
                                   on_policy_objective="sampled_token"))
    assert PROMPT_LENGTH not in zero.train_dataset.column_names  # the data is today's
    plain.train()
    zero.train()
    assert train_logs(zero) == train_logs(plain)
    assert not any(key in h for h in train_logs(zero) for key in ("on_policy_fraction", "completion_length"))
    for (name, a), b in zip(plain.model.state_dict().items(), zero.model.state_dict().values()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------- what is distilled
def test_the_student_samples_with_its_current_weights_and_those_samples_are_distilled(tokenizer, tmp_path,
                                                                                      single_thread):
    args = config(tmp_path, lmbda=1.0, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = build(tokenizer, args, RecordingTrainer)
    weights = StepWeights()
    trainer.add_callback(weights)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    prepared_prompts = {tuple(row["input_ids"][: row[PROMPT_LENGTH]]) for row in trainer.train_dataset}
    trainer.train()

    assert [s["step"] for s in trainer.samples] == [0, 0, 1, 1] and len(trainer.batches) == 4
    # step 0 samples from the initial weights, step 1 from the weights after step 0 (which moved)
    for sample in trainer.samples:
        reference = initial if sample["step"] == 0 else weights.after[0]
        assert all(torch.equal(sample["state"][k], reference[k]) for k in reference)
    assert any(not torch.equal(initial[k], weights.after[0][k]) for k in initial)

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for micro, (sample, batch) in enumerate(zip(trainer.samples, trainer.batches)):
        assert batch[COMPLETIONS_KEY] == "student" and PROMPT_LENGTH not in batch
        assert sample["seed"] == derived_seed(0, "sample", sample["step"], micro % 2, 0)
        # the same weights and seed sample the same completions outside the trainer
        model = tiny_llama(len(tokenizer), 32, seed=5)
        model.load_state_dict(sample["state"])
        again = sample_completions(model, sample["prompt_ids"], sample["prompt_mask"], args.sampling_settings(),
                                   seed=sample["seed"], eos_token_id=eos, pad_token_id=pad)
        assert torch.equal(again, sample["generated"])
        # the rows distilled are the prompts followed by those completions; only completion tokens carry loss
        rows = completion_batch(sample["prompt_ids"], sample["prompt_mask"], sample["generated"], eos, pad)
        for key in ("input_ids", "attention_mask", "labels"):
            assert torch.equal(batch[key], rows[key]), key
        for b, length in enumerate(sample["prompt_mask"].sum(1).tolist()):
            prompt = tuple(batch["input_ids"][b, :length].tolist())
            assert prompt in prepared_prompts
            assert (batch["labels"][b, :length] == IGNORE_INDEX).all()
            trained = batch["labels"][b] != IGNORE_INDEX
            assert int(trained.sum()) == int(rows["completion_length"][b]) >= 1
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["on_policy_fraction"] for h in logs] == [1.0, 1.0]


def test_lmbda_and_seq_kd_choose_each_micro_batch_source():
    draws = [completion_source(7, step, micro, lmbda=0.3, seq_kd=False) for step in range(500) for micro in range(4)]
    fraction = draws.count("student") / len(draws)
    assert set(draws) == {"student", "dataset"} and abs(fraction - 0.3) < 0.05  # 5 binomial std of 2000 draws
    assert {completion_source(7, s, 0, lmbda=0.0, seq_kd=True) for s in range(50)} == {"teacher"}
    assert {completion_source(7, s, 0, lmbda=1.0, seq_kd=True) for s in range(50)} == {"student"}
    mixed = {completion_source(7, s, m, lmbda=0.5, seq_kd=True) for s in range(50) for m in range(2)}
    assert mixed == {"student", "teacher"}
    # the warm start: the first off_policy_steps steps use the dataset
    assert [completion_source(7, s, 0, lmbda=1.0, seq_kd=True, off_policy_steps=3) for s in range(5)] == [
        "dataset", "dataset", "dataset", "student", "student"]
    # a function of (seed, step, micro-batch): a resumed run redraws the same sources
    assert draws == [completion_source(7, s, m, lmbda=0.3, seq_kd=False) for s in range(500) for m in range(4)]


def test_off_policy_steps_then_on_policy(tokenizer, tmp_path, single_thread):
    trainer = build(tokenizer, config(tmp_path, lmbda=1.0, off_policy_steps=1), RecordingTrainer)
    trainer.train()
    assert [b[COMPLETIONS_KEY] for b in trainer.batches] == ["dataset", "student"]
    assert [s["step"] for s in trainer.samples] == [1]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["on_policy_fraction"] for h in logs] == [0.0, 1.0]


def test_seq_kd_distils_the_teacher_samples(tokenizer, tmp_path, single_thread):
    trainer = build(tokenizer, config(tmp_path, seq_kd=True, max_steps=1), RecordingTrainer)
    trainer.train()
    (sample,), (batch,) = trainer.samples, trainer.batches
    teacher_state = trainer.teacher.state_dict()
    assert sample["state"].keys() == teacher_state.keys()
    assert all(torch.equal(sample["state"][k], teacher_state[k]) for k in teacher_state)  # the teacher sampled
    assert batch[COMPLETIONS_KEY] == "teacher"
    log = next(h for h in trainer.state.log_history if "loss" in h)
    assert log["seq_kd_fraction"] == 1.0 and log["on_policy_fraction"] == 0.0


# ------------------------------------------------------------------------------------ the naive reference
def naive_loss(student, teacher, batch, normalizer, *, kd_ratio, with_ce, sampled_token):
    """The loss written from the formulas on full logits: reverse KL sum_v q (log q - log p) (or, for the
    sampled-token objective, the surrogate whose gradient is sum_i (log q(y_i) - log p(y_i)) grad log q(y_i)),
    times kd_ratio, plus (1 - kd_ratio) CE when the batch keeps it, over the batch's completion tokens / normalizer."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE_INDEX
    log_q = torch.log_softmax(student(**inputs).logits[:, :-1][valid].float(), dim=-1)  # (N, V)
    with torch.no_grad():
        log_p = torch.log_softmax(teacher(**inputs).logits[:, :-1][valid].float(), dim=-1)
    targets = labels[valid]
    if sampled_token:
        token_q = log_q.gather(1, targets[:, None]).squeeze(1)
        token_p = log_p.gather(1, targets[:, None]).squeeze(1)
        kd = ((token_q - token_p).detach() * token_q).sum()  # the surrogate: its gradient is the policy gradient
        kd_value = (token_q - token_p).sum().detach()
    else:
        kd = (log_q.exp() * (log_q - log_p)).sum()
        kd_value = kd.detach()
    ce = -log_q.gather(1, targets[:, None]).sum() if with_ce else torch.zeros(())
    loss = (kd_ratio * kd + (1 - kd_ratio) * ce) / normalizer
    value = (kd_ratio * kd_value + (1 - kd_ratio) * ce.detach()) / normalizer
    return loss, value


@pytest.mark.parametrize("source,objective", [("student", "divergence"), ("student", "sampled_token"),
                                              ("teacher", "divergence")])
def test_loss_and_gradient_equal_the_naive_reference(tokenizer, tmp_path, single_thread, source, objective):
    args = config(tmp_path, lmbda=1.0 if source == "student" else 0.0, seq_kd=source == "teacher",
                  divergence="rkl", kd_ratio=0.5, on_policy_objective=objective)
    trainer = build(tokenizer, args)
    batch = next(iter(trainer.get_train_dataloader()))
    sampler = trainer.model if source == "student" else trainer.teacher
    rows = trainer.generated_batch(sampler, batch, step=0, micro=0, source=source)
    normalizer = int((rows["labels"][:, 1:] != IGNORE_INDEX).sum())
    reference_student = copy.deepcopy(trainer.model)

    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, {**rows, COMPLETIONS_KEY: source},
                                num_items_in_batch=torch.tensor(normalizer))
    loss.backward()
    surrogate, value = naive_loss(reference_student, trainer.teacher, rows, normalizer, kd_ratio=0.5,
                                  with_ce=source == "teacher", sampled_token=objective == "sampled_token")
    surrogate.backward()
    torch.testing.assert_close(loss.detach(), value, rtol=RTOL, atol=ATOL)
    ours = dict(trainer.model.named_parameters())
    for name, p in reference_student.named_parameters():
        torch.testing.assert_close(ours[name].grad, p.grad, rtol=RTOL, atol=ATOL, msg=name)


# --------------------------------------------------------------------------------------- training, methods
def test_on_policy_training_lowers_the_reverse_kl_and_saves(tokenizer, tmp_path, single_thread):
    args = config(tmp_path, lmbda=1.0, divergence="rkl", max_steps=30, per_device_train_batch_size=8,
                  learning_rate=3e-3)
    trainer = build(tokenizer, args, rows=prompt_completion_rows(64, seed=3))
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    kd = [h["kd_loss"] for h in trainer.state.log_history if "kd_loss" in h]
    assert len(kd) == 30 and sum(kd[-5:]) / 5 < 0.75 * sum(kd[:3]) / 3, kd
    trainer.save_model(str(tmp_path / "student"))
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "student"))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name
    assert any(not torch.equal(initial[k], v) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("method", ["taid", "sinkd", "moe_mimic"])
def test_every_token_level_method_trains_on_policy(tokenizer, tmp_path, single_thread, method):
    if method == "taid":
        args = config(tmp_path, TAIDConfig, lmbda=1.0, t_start=0.4, alpha=0.05, beta=0.5)
        trainer_class = type("RecordingTAID", (Recording, TAIDTrainer), {})
    elif method == "sinkd":
        args = config(tmp_path, SinKDConfig, lmbda=1.0, sinkhorn_block=16, sinkhorn_scale=0.05,
                      on_policy_objective="sampled_token")
        trainer_class = type("RecordingSinKD", (Recording, SinKDTrainer), {})
    else:
        args = config(tmp_path, MoEMimicConfig, lmbda=1.0, moe_stage="d2s", num_experts=4, num_experts_per_tok=2)
        trainer_class = type("RecordingMoE", (Recording, MoEMimicTrainer), {})
    trainer = build(tokenizer, args, trainer_class)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs), logs
    assert all(h["on_policy_fraction"] == 1.0 for h in logs)
    assert [b[COMPLETIONS_KEY] for b in trainer.batches] == ["student", "student"]
    final = trainer.model.state_dict()
    assert any(not torch.equal(initial[k], final[k]) for k in initial if k in final)
    if method == "taid":
        assert logs[-1]["taid_t"] > 0.4  # the schedule moved on the on-policy losses


def test_lora_student_samples_with_its_adapters(tokenizer, tmp_path, single_thread):
    args = config(tmp_path, lmbda=1.0, use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                  learning_rate=5e-2)
    trainer = build(tokenizer, args, RecordingTrainer)
    weights = StepWeights()
    trainer.add_callback(weights)
    trainer.train()
    first, second = trainer.samples
    lora = [k for k in first["state"] if "lora_" in k]
    assert lora, "the sampling model has no LoRA weights: the adapters were not used for generation"
    # step 1 samples with the adapters as trained by step 0
    assert all(torch.equal(second["state"][k], weights.after[0][k]) for k in lora)
    assert any(not torch.equal(first["state"][k], second["state"][k]) for k in lora)
    base = [k for k in first["state"] if "base_layer" in k]
    assert base and all(torch.equal(first["state"][k], second["state"][k]) for k in base)


# ------------------------------------------------------------------------------------------------ bad input
def test_completions_of_only_eos_are_counted_and_train(tokenizer, tmp_path, single_thread):
    trainer = build(tokenizer, config(tmp_path, lmbda=1.0), EOSOnly)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for log in logs:
        assert log["eos_only_fraction"] == 1.0 and log["completion_length"] == 1.0
        assert log["truncated_fraction"] == 0.0 and torch.isfinite(torch.tensor(log["loss"]))


def test_fixed_completions_helper_is_a_function_of_the_prompt(tokenizer):
    ids = torch.tensor([[0, 0, 9, 10], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = fixed_completions(ids, mask, 3, 320, 6)
    assert torch.equal(out[0], fixed_completions(ids[:1, 2:], mask[:1, 2:], 3, 320, 6)[0])


def test_rows_without_a_prompt_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="has no prompt"):
        build(tokenizer, config(tmp_path, lmbda=0.5), rows=[{"text": "the cat sat on the mat"}] * 4)


def test_a_completion_beyond_the_positions_is_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"max_completion_length=300 exceed.*max_completion_length <= 2\d\d"):
        build(tokenizer, config(tmp_path, lmbda=1.0, max_completion_length=300))


def test_setups_that_cannot_sample_are_refused(tokenizer, tmp_path):
    args = config(tmp_path, lmbda=0.5)
    with pytest.raises(ValueError, match="teacher cache only holds the dataset's rows"):
        check_on_policy_setup(args, task="causal_lm", teacher_cache=object())
    with pytest.raises(ValueError, match="sequence classifier"):
        check_on_policy_setup(args, task="sequence_classification", teacher_cache=None)
    with pytest.raises(ValueError, match="on_policy_objective='divergence'"):
        build(tokenizer, config(tmp_path, TAIDConfig, lmbda=1.0, on_policy_objective="sampled_token"), TAIDTrainer)


@pytest.mark.parametrize("fields,match", [
    ({"lmbda": 1.5}, "lmbda must be in"), ({"on_policy_objective": "kl"}, "on_policy_objective"),
    ({"off_policy_steps": -1}, "off_policy_steps"), ({"max_completion_length": 0}, "max_completion_length"),
    ({"top_p": 0.0}, "top_p"), ({"generation_temperature": 0.0}, "temperature"),
    ({"generation_kwargs": "{bad"}, "generation_kwargs must be a JSON object"),
])
def test_bad_on_policy_fields_are_refused(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **fields)
