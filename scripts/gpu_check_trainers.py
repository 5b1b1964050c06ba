"""Part a of scripts/gpu_check.py, continued: one step of each llmkd trainer on small models, on the device.

For DistillTrainer (forward KL), TAIDTrainer, DistillTrainer from a top-64 teacher cache, DistillTrainer on a
Gemma 2 pair (final-logit soft-capping at 30, the heads scaled so that the cap bends the logits; the head check
``verify_logit_head`` on), DistillTrainer with two teachers, the rows routed between them by a column (the
grouped loss: one engine pass per teacher), and DistillTrainer with a teacher of another tokenizer (the student's
words under shuffled ids; the hybrid loss on the aligned spans), in float32 and in bfloat16 (weights and the Trainer's ``bf16=True``):

1. the trainer's own ``compute_loss`` on its first batch, with the chunked engine and with the dense path
   (``use_chunked_loss=False``: the models' own logits), loss and every parameter's gradient compared norm-wise;
2. one real training step (``train()``, one optimizer step): the loss is finite, every parameter stays finite and
   the student changed; TAID's schedule was fed its loss.

Tolerances (norm-wise relative difference of the two paths, over all the student's gradients at once). Both run
the same model code; only the head differs (chunked products or one product, the closed form or autograd), so
their logits' gradients differ by the float32 rounding of the loss's arithmetic, ``~(sqrt(H) Z + 2 Z + log V) u32``
relative (``Z`` the largest logit, about 2^-15 here), which the body's backward carries to every parameter: float32
tolerance ``2^-12`` for the gradients (16x that) and ``2^-16`` for the loss (a sum of float32 row reductions). In
bfloat16 (``u = 2^-8``) the dense path takes the model's own bfloat16 logits, whose post-processing (Gemma's
soft-cap: a divide, a tanh and a multiply, and their backward) rounds up to 8 times at ``u`` relative in the
logits' gradient, and the body's bfloat16 backward carries the difference on: tolerance ``16u = 2^-4`` for the
gradients and ``2^-10`` for the loss (float32 arithmetic on bfloat16 logits that agree to a few ``u``).
"""

from __future__ import annotations

import math
import tempfile
import traceback

import torch

import gpu_check_common as common
from bench_step import _common, _rows, _teacher_tokenizer, _tokenizer
from gpu_check_common import log

TRAINER_CASES = ("DistillTrainer, forward KL", "TAIDTrainer", "DistillTrainer from a top-64 cache",
                 "DistillTrainer, Gemma 2 soft-capped logits", "DistillTrainer, two routed teachers",
                 "DistillTrainer, teacher with another tokenizer (hybrid)")
TOLERANCES = {torch.float32: {"loss": 2.0**-16, "gradients": 2.0**-12},
              torch.bfloat16: {"loss": 2.0**-10, "gradients": 2.0**-4}}
GEMMA_CAP = 30.0


def gemma_config(qwen_shape: dict) -> dict:
    """A Gemma 2 config of the small Qwen shape (same widths, a head dimension of hidden / heads)."""
    shape = {k: qwen_shape[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "intermediate_size", "vocab_size",
                                        "tie_word_embeddings")}
    return dict(shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                final_logit_softcapping=GEMMA_CAP, query_pre_attn_scalar=shape["hidden_size"] // shape[
                    "num_attention_heads"], sliding_window=64)


def small_models(small: dict, case: str, dtype, device):
    """(student, teacher) of the small shapes; for the Gemma case with heads scaled x100, so that the logits reach
    the cap (checked by the caller)."""
    family = "gemma2" if "Gemma" in case else "qwen2"
    configs = [small["student"], small["teacher"]]
    if family == "gemma2":
        configs = [gemma_config(c) for c in configs]
    student, teacher = (common.build_causal_lm(config, dtype, device, seed, small["seq"], family)
                        for config, seed in zip(configs, (1, 2)))
    if family == "gemma2":
        with torch.no_grad():
            for model in (student, teacher):
                model.get_output_embeddings().weight.mul_(100.0)
    return student, teacher


def build_trainer(case: str, small: dict, dtype, device, output_dir: str):
    """The case's trainer on one batch of ``small['batch']`` random rows (max_steps 1, kd_ratio 0.5, chunks of
    ``small['chunk']`` tokens, the head check on)."""
    from types import SimpleNamespace

    from datasets import Dataset

    from llmkd import DistillConfig, DistillTrainer, TAIDConfig, TAIDTrainer

    student, teacher = small_models(small, case, dtype, device)
    tokenizer = _tokenizer(small["tokenizer_size"])
    rows = _rows(small["tokenizer_size"], small["seq"], small["batch"])
    data = Dataset.from_list([{"input_ids": row, "labels": row} for row in rows])
    settings = dict(_common(SimpleNamespace(batch=small["batch"], total_steps=1), output_dir), learning_rate=1e-3,
                    logging_steps=1, max_length=small["seq"], kd_ratio=0.5, loss_chunk_size=small["chunk"],
                    bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", gradient_checkpointing=False)
    if "cache" in case:
        from llmkd.cache import write_teacher_cache
        from llmkd.data import prepare_dataset

        cache_dir = f"{output_dir}/cache"
        write_teacher_cache(teacher, prepare_dataset(data, tokenizer, max_length=small["seq"]), tokenizer, cache_dir,
                            top_k=64, temperature=1.0, shard_rows=len(rows), batch_size=len(rows),
                            teacher_name="gpu-check-small-teacher", progress=False)
        return DistillTrainer(model=student, args=DistillConfig(**settings, teacher_cache=cache_dir),
                              train_dataset=data, processing_class=tokenizer), teacher
    if "another tokenizer" in case:  # the teacher's tokenizer: the student's words under shuffled ids
        config = DistillConfig(**settings, cross_tokenizer_loss="hybrid")
        return DistillTrainer(model=student, teacher_model=teacher, args=config, train_dataset=data,
                              processing_class=tokenizer,
                              teacher_processing_class=_teacher_tokenizer(small["tokenizer_size"])), teacher
    if "routed" in case:  # rows alternate between two teachers (the second of another seed, weight 2)
        other = common.build_causal_lm(small["teacher"], dtype, device, 3, small["seq"], "qwen2")
        data = Dataset.from_list([{"input_ids": row, "labels": row, "domain": ("a", "b")[i % 2]}
                                  for i, row in enumerate(rows)])
        config = DistillConfig(**settings, teachers=[{"name": "a"}, {"name": "b", "weight": 2.0}],
                               teacher_routing_column="domain")
        return DistillTrainer(model=student, teacher_model={"a": teacher, "b": other}, args=config,
                              train_dataset=data, processing_class=tokenizer), teacher
    config_class, trainer_class = (TAIDConfig, TAIDTrainer) if case == "TAIDTrainer" else (DistillConfig,
                                                                                              DistillTrainer)
    return trainer_class(model=student, teacher_model=teacher, args=config_class(**settings), train_dataset=data,
                         processing_class=tokenizer), teacher


def loss_and_gradients(trainer, inputs: dict, chunked: bool) -> tuple[float, dict]:
    """The trainer's loss on ``inputs`` and the student's gradients, on the chunked or the dense path."""
    model = trainer.model
    trainer.args.use_chunked_loss = chunked
    model.zero_grad(set_to_none=True)
    tokens = int((inputs["labels"][:, 1:] != -100).sum())
    device = inputs["labels"].device
    # the autocast accelerate wraps the student's forward in once train() prepares it (the teacher is prepared at
    # init: its outputs come back in float32)
    with trainer.compute_loss_context_manager(), common.autocast(device, model.dtype):
        loss = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(tokens, device=device))
    loss.backward()
    grads = {name: p.grad.detach().double().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    trainer.args.use_chunked_loss = True
    return float(loss.detach()), grads


def path_ratios(trainer, dtype) -> dict:
    """Chunked vs dense on the trainer's first batch: {"loss": ratio, "gradients": ratio} (relative difference /
    tolerance; the gradients of all parameters as one vector)."""
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    chunked_loss, chunked = loss_and_gradients(trainer, inputs, chunked=True)
    dense_loss, dense = loss_and_gradients(trainer, inputs, chunked=False)
    for state in ("_metric_sums",):  # the two passes are not training steps: forget their metrics
        getattr(trainer, state)[True].clear()
    if hasattr(trainer, "_step_sums"):
        trainer._step_sums = None
    if set(chunked) != set(dense):
        return {"loss": math.inf, "gradients": math.inf}
    difference = sum((chunked[n] - dense[n]).square().sum() for n in dense).sqrt()
    relative = (difference / sum(g.square().sum() for g in dense.values()).sqrt().clamp_min(1e-30)).item()
    tolerance = TOLERANCES[dtype]
    return {"loss": abs(chunked_loss - dense_loss) / abs(dense_loss) / tolerance["loss"],
            "gradients": relative / tolerance["gradients"]}


def training_step_ratios(trainer) -> dict:
    """One optimizer step: {"step": 0 if the loss and parameters are finite, the student changed and (TAID) the
    schedule was fed, else inf}."""
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = dict(trainer.model.named_parameters())
    finite = all(torch.isfinite(p).all() for p in after.values()) and losses and all(map(math.isfinite, losses))
    changed = any(not torch.equal(before[n], p.detach()) for n, p in after.items())
    fed = getattr(getattr(trainer, "schedule", None), "prev_loss", 0.0) is not None
    return {"step": 0.0 if finite and changed and fed else math.inf}


def cap_ratio(student) -> dict:
    """Gemma: the student's uncapped logits must exceed half the cap (else the soft-cap would not matter)."""
    from llmkd.heads import intercept_head

    ids = torch.arange(3, 19, device=student.device)[None]
    weight = student.get_output_embeddings().weight
    with torch.no_grad(), intercept_head(student, lambda hidden: torch.nn.functional.linear(hidden, weight)):
        largest = student(input_ids=ids).logits.abs().max().item()
    return {"cap": (GEMMA_CAP / 2) / largest}


def trainer_rows(shapes: dict, device):
    """Every trainer case in float32 and bfloat16: yields one row each (ratios <= 1 pass)."""
    small = shapes["small"]
    for dtype in (torch.float32, torch.bfloat16):
        for case in TRAINER_CASES:
            row = {"check": case, "dtype": str(dtype).replace("torch.", ""), "path": "trainer step"}
            try:
                trainer, teacher = build_trainer(case, small, dtype, device, tempfile.mkdtemp(prefix="llmkd_gpu_"))
                ratios = path_ratios(trainer, dtype)
                if "Gemma" in case:
                    ratios.update(cap_ratio(trainer.model))
                ratios.update(training_step_ratios(trainer))
            except Exception as error:  # noqa: BLE001 - a failing trainer is a failed row, the others still run
                traceback.print_exc()
                ratios = {"error": math.inf}
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            worst = max(ratios, key=ratios.get)
            row.update(passed=all(r <= 1.0 for r in ratios.values()), worst=worst, ratio=ratios[worst],
                       ratios=ratios)
            log(f"{case} [{dtype}]: " + ", ".join(f"{k} {v:.3g}" for k, v in ratios.items()))
            yield row
            common.release_memory(device)
