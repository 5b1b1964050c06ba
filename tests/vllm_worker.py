"""A short on-policy run that samples with a colocated vLLM engine (use_vllm=True), for tests/test_vllm.py.

    python tests/vllm_worker.py OUT.json [--lora]

vLLM starts its engine in this process (external_launcher), once per process, so each scenario is a process of its
own. It records, per student sample: the largest gap between the engine's log-probabilities of the tokens it sampled
and the training student's own (transformers, teacher-forced, the weights of that step), the same gap against the
student's initial weights (which the run has moved away from: the check can fail), whether the rows distilled carry
exactly the sampled tokens, and whether per-row seeds reproduce.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from utils import make_tokenizer, prompt_completion_rows, tiny_llama  # noqa: E402
from llmkd import DistillConfig, DistillTrainer  # noqa: E402
from llmkd.constants import IGNORE_INDEX  # noqa: E402


@torch.no_grad()
def completion_logprobs(model, prompt_ids, prompt_mask, generated, eos_token_id) -> list[list[float]]:
    """Per row, the model's log-probabilities of its generated tokens up to and including the first EOS."""
    was_training = model.training
    model.eval()
    ids = torch.cat([prompt_ids, generated], dim=1)
    mask = torch.cat([prompt_mask, torch.ones_like(generated)], dim=1)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logprobs = torch.log_softmax(logits[:, prompt_ids.shape[1] - 1 : -1], dim=-1)
    picked = logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    model.train(was_training)
    rows = []
    for row, tokens in zip(picked, generated):
        ends = (tokens == eos_token_id).nonzero()
        length = int(ends[0]) + 1 if len(ends) else len(tokens)
        rows.append(row[:length].tolist())
    return rows


def largest_gap(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b], ([len(x) for x in a], [len(y) for y in b])
    return max((abs(x - y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)), default=0.0)


class RecordingTrainer(DistillTrainer):
    records: dict

    def sample(self, model, prompt_ids, prompt_mask, *, seed, extra_inputs):
        generated = super().sample(model, prompt_ids, prompt_mask, seed=seed, extra_inputs=extra_inputs)
        eos = self._tokenizer.eos_token_id
        engine = model.last_logprobs
        current = completion_logprobs(self.model, prompt_ids, prompt_mask, generated, eos)
        initial = completion_logprobs(self.initial_student, prompt_ids, prompt_mask, generated, eos)
        self.records["gap"].append(largest_gap(engine, current))
        self.records["gap_to_initial"].append(largest_gap(engine, initial))
        self.records["sampled"].append([row[: len(lp)] for row, lp in zip(generated.tolist(), current)])
        return generated

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        self.records["distilled"].append([row[row != IGNORE_INDEX].tolist() for row in labels])
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.records["loss"].append(float(loss[0] if isinstance(loss, tuple) else loss))
        return loss


def main() -> None:
    out, lora = sys.argv[1], "--lora" in sys.argv
    tokenizer = make_tokenizer()
    student = tiny_llama(len(tokenizer), hidden=64, seed=0, num_attention_heads=2, num_key_value_heads=2)
    teacher = tiny_llama(len(tokenizer), hidden=64, seed=1, num_attention_heads=2, num_key_value_heads=2)
    lora_fields = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"]) if lora else {}
    with tempfile.TemporaryDirectory() as tmp:
        config = DistillConfig(
            output_dir=tmp, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            learning_rate=0.05, lr_scheduler_type="constant", divergence="rkl", lmbda=1.0, use_vllm=True,
            max_completion_length=6, logging_steps=1, save_strategy="no", report_to="none", seed=0, use_cpu=True,
            vllm_max_model_length=64, **lora_fields)
        trainer = RecordingTrainer(model=student, teacher_model=teacher, args=config,
                                   train_dataset=Dataset.from_list(prompt_completion_rows(32)),
                                   processing_class=tokenizer)
        trainer.records = {"gap": [], "gap_to_initial": [], "sampled": [], "distilled": [], "loss": []}
        trainer.initial_student = copy.deepcopy(trainer.model).eval()
        before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        after = dict(trainer.model.named_parameters())
        sampler = trainer.vllm_sampler
        prompts = tokenizer(["what is one add two", "what is the add five"], return_tensors="pt", padding=True,
                            padding_side="left")
        pad = tokenizer.pad_token_id
        sampler.sync(trainer.state.global_step)
        draws = [sampler.sample(prompts["input_ids"], prompts["attention_mask"], seed=s, pad_token_id=pad).tolist()
                 for s in (7, 7, 8)]
    records = trainer.records
    records.update(
        weights_changed=all(not torch.equal(before[n], after[n].detach()) for n in before),
        same_seed_same_samples=draws[0] == draws[1], other_seed_other_samples=draws[0] != draws[2],
        on_policy_fraction=[e["on_policy_fraction"] for e in trainer.state.log_history if "on_policy_fraction" in e],
        engine_dtype=str(sampler.engine.llm.llm_engine.model_config.dtype),
        thread_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
    with open(out, "w") as handle:
        json.dump(records, handle)


if __name__ == "__main__":
    main()
