"""LLaVA-MoD's official MoE training options: DeepSpeed's top-2 aux loss, Gumbel second-expert sampling, expert
capacity dropping (llmkd.models.top2_gating, llmkd.losses.load_balancing), their installation in the trainers, and
the LLaVA + MoE student on transformers >= 5.24 (router logits kept out of the wrapper's output)."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from moe_utils import IMAGE_TOKEN, tiny_llava
from test_moe_mimic import config, ffn_teacher_for, logged
from test_vlm import image_rows
from transformers import LlavaForConditionalGeneration
from utils import prompt_completion_rows, tiny_llama

from llmkd import MoEMimicConfig, MoEMimicTrainer, PreferenceDistillConfig, upcycle_to_moe
from llmkd.losses.load_balancing import deepspeed_top2_aux_loss, router_aux_loss
from llmkd.models.routing import find_routers
from llmkd.models.top2_gating import Top2RoutingHooks, expert_capacity, gumbel_noise, top2_route

sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe", reason="DeepSpeed's top2gating is the reference")


# ------------------------------------------------------------------------------------------------ aux loss
def aux_by_hand(layers: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """E^2 * mean_e(me_e * ce_e) per layer, summed, written with loops over rows and experts (float64)."""
    total = torch.zeros((), dtype=torch.float64)
    for logits in layers:
        n, num_experts = logits.shape
        rows = [i for i in range(n) if mask is None or mask[i] > 0]
        probs = [torch.softmax(logits[i].double(), dim=0) for i in rows]
        firsts = [int(torch.argmax(logits[i].detach())) for i in rows]
        products = []
        for e in range(num_experts):
            me = sum(p[e] for p in probs) / len(rows)
            ce = sum(1.0 for first in firsts if first == e) / len(rows)
            products.append(me * ce)
        total = total + num_experts * num_experts * sum(products) / num_experts
    return total


@pytest.mark.parametrize("masked", [False, True])
def test_deepspeed_top2_aux_value_and_gradient_match_the_formula(masked):
    generator = torch.Generator().manual_seed(0)
    layers = [torch.randn(12, 4, generator=generator, requires_grad=True) for _ in range(3)]
    mask = (torch.arange(12) % 5 != 4).long() if masked else None
    got = deepspeed_top2_aux_loss(layers, mask)
    want = aux_by_hand(layers, mask)
    # float32 softmax and means of 12 terms vs float64: relative error a few float32 ulps (< 1e-6)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    got_grads = torch.autograd.grad(got, layers)
    want_grads = torch.autograd.grad(want, layers)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)  # float32 grads vs float64 rounded to float32


def test_deepspeed_top2_aux_equals_deepspeeds_own_l_aux_and_its_gradient():
    generator = torch.Generator().manual_seed(1)
    layers = [(torch.randn(16, 4, generator=generator) * 2).requires_grad_() for _ in range(2)]
    ours = deepspeed_top2_aux_loss(layers)
    theirs = sum(sharded_moe.top2gating(logits.clone(), capacity_factor=1.5, min_capacity=0,
                                        top2_2nd_expert_sampling=False)[0] for logits in layers)
    # the same float32 operations in the same order (softmax, means over rows, product, mean): equal up to the
    # summation order of the means, a few ulps
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    for g, w in zip(torch.autograd.grad(ours, layers), torch.autograd.grad(theirs, layers)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-8)


def test_the_two_aux_formulas_at_a_uniform_router():
    uniform = [torch.zeros(8, 4) for _ in range(12)]  # 12 sparse layers, all experts equally likely
    # ties: argmax and topk both pick the lowest indices, so the top-1 share is not uniform; use balanced logits
    balanced = [torch.eye(4).repeat(2, 1) * 1e-3 for _ in range(12)]
    assert deepspeed_top2_aux_loss(balanced).item() == pytest.approx(12.0, rel=1e-3)  # 1 per layer, summed
    assert router_aux_loss("switch", uniform, top_k=2).item() == pytest.approx(2.0)  # top_k for the model
    with pytest.raises(ValueError, match="aux_loss_type must be one of"):
        router_aux_loss("gshard", uniform, top_k=2)


# ------------------------------------------------------------------------------------------------ routing
def test_capacity_is_deepspeeds():
    assert expert_capacity(10, 4, 1.5) == math.ceil(10 / 4 * 3)  # 7.5 -> 8
    assert expert_capacity(8, 4, 1.5) == 6
    assert expert_capacity(3, 4, 0.25, min_capacity=4) == 4
    for tokens in (1, 7, 12, 33, 100):
        for factor in (0.25, 0.5, 1.0, 1.5, 2.0):
            logits = torch.zeros(tokens, 4)
            want = sharded_moe._capacity(logits, torch.tensor(factor * 2), torch.tensor(0))
            assert expert_capacity(tokens, 4, factor) == int(want)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        expert_capacity(8, 4, 0.0)


def test_constructed_case_drops_exactly_the_expected_assignments():
    # 6 tokens, 4 experts, capacity_factor 0.5 -> C = ceil(6 / 4 * 2 * 0.5) = 2 slots per expert
    firsts, seconds = [0, 0, 0, 1, 1, 2], [1, 1, 1, 0, 2, 3]
    logits = torch.full((6, 4), -1.0)
    for token, (a, b) in enumerate(zip(firsts, seconds)):
        logits[token, a], logits[token, b] = 3.0, 2.0
    routing = top2_route(logits, second_expert_sampling=False, capacity_factor=0.5)
    assert routing.capacity == 2
    assert routing.first.tolist() == firsts and routing.second.tolist() == seconds
    # expert 0: first choices of tokens 0, 1 fit, token 2's is third -> dropped; token 3's second choice comes
    #   after expert 0's three first choices -> dropped
    # expert 1: first choices of tokens 3, 4 fill it; second choices of tokens 0, 1, 2 -> all dropped
    # expert 2: first choice of token 5, then token 4's second choice -> both fit; expert 3: token 5's second
    assert routing.kept.tolist() == [[True, False], [True, False], [False, False], [True, False], [True, True],
                                     [True, True]]
    assert routing.experts.tolist() == [[a, b] for a, b in zip(firsts, seconds)]  # dropped: kept index, weight 0
    gates = logits.softmax(-1)
    weights = routing.weights.detach()
    assert weights[[0, 1, 3], 0].tolist() == [1.0, 1.0, 1.0] and weights[[0, 1, 3], 1].tolist() == [0.0] * 3
    assert weights[2].tolist() == [0.0, 0.0]  # both dropped: nothing from the experts
    torch.testing.assert_close(weights[4], gates[4, [1, 2]] / gates[4, [1, 2]].sum())
    torch.testing.assert_close(weights[5], gates[5, [2, 3]] / gates[5, [2, 3]].sum())


@pytest.mark.parametrize("sampling,factor", [(True, None), (True, 1.5), (True, 0.5), (False, 0.5), (True, 0.2)])
def test_routing_equals_deepspeeds_top2gating_given_the_same_noise(monkeypatch, sampling, factor):
    generator = torch.Generator().manual_seed(2)
    logits = (torch.randn(24, 4, generator=generator) * 1.5).requires_grad_()
    noise = gumbel_noise((24, 4), generator=generator)
    monkeypatch.setattr(sharded_moe, "gumbel_rsample", lambda shape, device: noise.clone())
    ours = top2_route(logits, second_expert_sampling=sampling, capacity_factor=factor, noise=noise)
    _, combine, dispatch, _ = sharded_moe.top2gating(logits.clone(), capacity_factor=factor or 1.0, min_capacity=0,
                                                     drop_tokens=factor is not None,
                                                     top2_2nd_expert_sampling=sampling)
    ours_dense = torch.zeros(24, 4).scatter_add(1, ours.experts, ours.weights)  # (tokens, experts)
    theirs_dense = combine.sum(-1)
    # the same float32 gates divided by the same sums: equal up to one rounding
    torch.testing.assert_close(ours_dense, theirs_dense, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours_dense.detach() > 0, dispatch.any(-1))
    if factor is not None:
        assert ours.capacity == combine.shape[-1]
        if factor <= 0.5:
            assert (~ours.kept).any()  # the case drops something
    probe = torch.randn(24, 4, generator=generator)
    for g, w in zip(torch.autograd.grad((ours_dense * probe).sum(), logits),
                    torch.autograd.grad((theirs_dense * probe).sum(), logits)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_the_second_expert_is_the_noisy_argmax_and_never_the_first():
    logits = torch.randn(500, 4, generator=torch.Generator().manual_seed(3))
    routing = top2_route(logits, capacity_factor=None, generator=torch.Generator().manual_seed(7))
    noise = gumbel_noise((500, 4), generator=torch.Generator().manual_seed(7))
    noisy = (logits + noise).scatter(1, logits.argmax(-1, keepdim=True), float("-inf"))
    assert torch.equal(routing.second, noisy.argmax(-1))
    assert torch.equal(routing.first, logits.argmax(-1))
    assert not (routing.first == routing.second).any()
    assert (routing.second != logits.topk(2, dim=-1).indices[:, 1]).any()  # really sampled, not the runner-up
    again = top2_route(logits, capacity_factor=None, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.second, routing.second)  # seeded: reproducible


def test_the_second_expert_follows_the_softmax_of_the_other_logits():
    # Gumbel-max: P(second = e) = softmax over the non-first logits. N draws of one token: each frequency has
    # standard deviation <= sqrt(0.25 / N) = 0.0025 for N = 40000, so a 0.015 tolerance is 6 standard deviations.
    n = 40000
    row = torch.tensor([2.0, 1.0, 0.0, -1.0])
    routing = top2_route(row.expand(n, 4), capacity_factor=None, generator=torch.Generator().manual_seed(11))
    frequencies = torch.bincount(routing.second, minlength=4).double() / n
    expected = torch.cat([torch.zeros(1), torch.softmax(row[1:], 0)]).double()
    assert frequencies[0] == 0
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.015)


# ------------------------------------------------------------------------------------------------ on a model
def moe_student(seed: int = 0):
    """A tiny upcycled Qwen2-MoE (layers 0 and 2 sparse, 4 experts, top-2) whose experts differ."""
    dense = tiny_llama(64, hidden=32, layers=3, seed=seed)
    model = upcycle_to_moe(dense, num_experts=4, top_k=2, every=2, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
            if name.endswith("mlp.gate.weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def test_dropped_tokens_pass_through_the_residual_only_and_kept_ones_use_the_renormalised_gates():
    model = moe_student().train()
    block = model.model.layers[0].mlp
    hooks = Top2RoutingHooks([block.gate], second_expert_sampling=True, capacity_factor=0.5)
    hidden = torch.randn(2, 10, 32, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(123)
    output = block(hidden).reshape(20, 32)
    torch.manual_seed(123)  # the same global-generator noise the hook drew
    routing = top2_route(torch.nn.functional.linear(hidden.reshape(20, 32), block.gate.weight), True, 0.5)
    both_dropped = ~routing.kept.any(-1)
    assert both_dropped.any() and routing.kept.all(-1).any()
    assert torch.equal(output[both_dropped], torch.zeros_like(output[both_dropped]))  # only the residual is left
    flat = hidden.reshape(20, 32)
    want = torch.zeros(20, 32)
    for token in range(20):
        for slot in range(2):
            expert = int(routing.experts[token, slot])
            if routing.kept[token, slot]:
                gate, up = (flat[token] @ block.experts.gate_up_proj[expert].T).chunk(2)
                want[token] += routing.weights[token, slot] * (block.experts.down_proj[expert] @
                                                               (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(output, want, rtol=1e-5, atol=1e-6)  # float32 matmuls of width 64: ~1e-6 apart

    model.eval()  # at evaluation the router's own deterministic top-2 routing is kept
    with torch.no_grad():
        hooked = model(torch.arange(12)[None]).logits
        hooks.remove()
        plain = model(torch.arange(12)[None]).logits
    assert torch.equal(hooked, plain)


def test_gradient_checkpointing_recomputes_the_same_sampled_routing():
    grads = []
    for checkpointing in (False, True):
        model = moe_student(seed=1).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        Top2RoutingHooks([router for _, router in find_routers(model)], capacity_factor=0.75)
        torch.manual_seed(5)
        ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(6))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:  # the same float32 operations recomputed: equal up to reassociation (~1e-7)
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_official_routing_refuses_routers_it_cannot_reproduce():
    model = upcycle_to_moe(tiny_llama(64, hidden=32, layers=2, seed=0), top_k=1)
    with pytest.raises(ValueError, match="top-1"):
        Top2RoutingHooks([router for _, router in find_routers(model)])
    model = moe_student()
    for _, router in find_routers(model):
        router.norm_topk_prob = False
    with pytest.raises(ValueError, match="norm_topk_prob=False"):
        Top2RoutingHooks([router for _, router in find_routers(model)])


# ------------------------------------------------------------------------------------------------ trainers
@pytest.fixture(scope="module")
def text_data():
    return Dataset.from_list(prompt_completion_rows(32))


def test_defaults_install_nothing_and_official_options_change_only_training(tmp_path, tokenizer, text_data):
    student = tiny_llama(len(tokenizer), 32, layers=3, seed=1)
    teacher = ffn_teacher_for(student)
    plain = MoEMimicTrainer(model=student, teacher_model=teacher, args=config(tmp_path, moe_stage="d2s"),
                            train_dataset=text_data, processing_class=tokenizer)
    assert plain.router_monitor.routing is None and plain.router_monitor.aux_loss_type == "switch"
    assert all(len(router._forward_hooks) == 1 for _, router in find_routers(plain.model))  # the monitor only

    official = MoEMimicTrainer(
        model=student, teacher_model=teacher, processing_class=tokenizer, train_dataset=text_data,
        args=config(tmp_path, moe_stage="d2s", aux_loss_type="deepspeed_top2", aux_loss_mask_padding=False,
                    second_expert_sampling=True, capacity_factor=1.5, max_steps=6))
    model = official.model
    batch = official.data_collator([official.train_dataset[i] for i in range(8)])
    model.train()
    with torch.no_grad():
        torch.manual_seed(9)
        got = official.compute_loss(model, batch)
        torch.manual_seed(9)  # the same noise: the model's own router-logit record then gives the reference aux
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = model(**inputs, output_router_logits=True)
        teacher_logits = teacher(**inputs).logits
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    s, t = outputs.logits[:, :-1][valid], teacher_logits[:, :-1][valid]
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum()
    ce = torch.nn.functional.cross_entropy(s, targets[valid], reduction="sum")
    aux = deepspeed_top2_aux_loss(list(outputs.router_logits))  # padding counted, as configured
    want = (kl + ce) / valid.sum() + 0.01 * aux
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    official.train()
    dropped = logged(official, "moe_dropped")
    assert len(dropped) == 6 and all(0.0 <= value < 0.5 for value in dropped)
    assert len(logged(official, "moe_aux_loss")) == 6
    loads = [logged(official, f"moe_load_e{e}") for e in range(4)]
    for step in range(6):  # shares of the assignments actually routed
        assert sum(series[step] for series in loads) == pytest.approx(1.0, abs=1e-5)


def test_config_fields_are_checked(tmp_path):
    with pytest.raises(ValueError, match="aux_loss_type must be one of"):
        MoEMimicConfig(output_dir=str(tmp_path), aux_loss_type="gshard")
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        MoEMimicConfig(output_dir=str(tmp_path), capacity_factor=0.0)
    with pytest.raises(ValueError, match="min_capacity must be >= 0"):
        PreferenceDistillConfig(output_dir=str(tmp_path), min_capacity=-1)
    assert PreferenceDistillConfig(output_dir=str(tmp_path), capacity_factor=1.5).capacity_factor == 1.5


def test_llava_moe_student_whose_text_model_returns_router_logits_trains(tmp_path, tokenizer):
    # transformers >= 5.24's LLaVA forwards the language model's output fields into its own output class, which has
    # no router_logits: an MoE language model configured to return them made the wrapper raise a TypeError
    student = upcycle_to_moe(tiny_llava(IMAGE_TOKEN + 10, 32, seed=1))
    student.config.text_config.output_router_logits = True
    teacher = ffn_teacher_for(tiny_llava(IMAGE_TOKEN + 10, 32, seed=1))
    data = Dataset.from_list(image_rows(8))
    trainer = MoEMimicTrainer(model=student, teacher_model=teacher, train_dataset=data, processing_class=tokenizer,
                              args=config(tmp_path, per_device_train_batch_size=4, max_steps=2, loss_chunk_size=8,
                                          second_expert_sampling=True, capacity_factor=1.5))
    assert isinstance(trainer.model, LlavaForConditionalGeneration)
    assert trainer.model.config.text_config.output_router_logits is False
    trainer.train()
    assert len(logged(trainer, "moe_aux_loss")) == 2 and len(logged(trainer, "moe_dropped")) == 2


def test_preference_stage_takes_the_same_official_options(tmp_path):
    from test_preference_trainer import config as preference_config, preference_rows, reference_logps
    from utils import make_tokenizer

    from llmkd import PreferenceDistillTrainer
    from llmkd.losses import kto_pair_loss

    tokenizer = make_tokenizer()
    student = upcycle_to_moe(tiny_llama(len(tokenizer), 32, seed=1))
    teacher = tiny_llama(len(tokenizer), 48, seed=2)
    trainer = PreferenceDistillTrainer(
        model=student, teacher_model=teacher, processing_class=tokenizer,
        train_dataset=Dataset.from_list(preference_rows(16, 0)),
        args=preference_config(tmp_path, aux_loss_coef=0.5, max_steps=3, aux_loss_type="deepspeed_top2",
                               second_expert_sampling=True, capacity_factor=1.5))
    assert trainer.router_monitor.routing is not None
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.eval()  # deterministic routing: the loss is the formula with the DeepSpeed aux of padding-free rows
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        pc, pr, rc, rr = reference_logps(student, teacher, batch)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        router_logits = student(**inputs, output_router_logits=True).router_logits
    aux = deepspeed_top2_aux_loss(list(router_logits), batch["attention_mask"])
    torch.testing.assert_close(loss, kto_pair_loss(pc, pr, rc, rr, 0.1).mean() + 0.5 * aux, rtol=1e-5, atol=1e-6)
    trainer.model.train()
    trainer.train()
    assert "moe_dropped" in trainer.state.log_history[0] and "moe_aux_loss" in trainer.state.log_history[0]


def test_the_official_tiny_recipe_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--logging_steps", "1", "--report", "false", "--max_steps", "3"]
    for recipe, out, extra in (("tiny-llm-d2d", "d2d", []),
                               ("tiny-llm-d2s-official", "d2s", ["--model_name_or_path", str(tmp_path / "d2d")])):
        result = subprocess.run([sys.executable, "-m", "llmkd", "train", "--config", f"recipes/moe/{recipe}.yaml",
                                 "--output_dir", str(tmp_path / out), *common, *extra], capture_output=True,
                                text=True, env=env, cwd=root, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "moe_dropped" in result.stdout + result.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "d2s")  # a standard transformers MoE, no custom code
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.num_experts_per_tok == 2
