"""The MoE pipeline from the command line: `llmkd upcycle`, the offline tiny-llm recipes run in order (d2d -> d2s ->
preference), and scripts/prepare_vlm_mimic_data.py feeding the VLM mimic stage."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from moe_utils import tiny_llava
from PIL import Image
from test_preference_trainer import tiny_vision_processor
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
from utils import write_local_run

from llmkd import MoEMimicConfig, MoEMimicTrainer
from llmkd.models.routing import is_moe_model

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def llmkd(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "llmkd", *args], capture_output=True, text=True, env=ENV,
                            cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_upcycle_command_writes_an_equivalent_moe_model(tmp_path):
    local = write_local_run(tmp_path)
    llmkd("upcycle", "--model", local["model_name_or_path"], "--output_dir", str(tmp_path / "moe"),
          "--num_experts", "3", "--top_k", "2", "--every", "1")
    dense = AutoModelForCausalLM.from_pretrained(local["model_name_or_path"]).eval()
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(moe).__name__ == "Qwen2MoeForCausalLM" and moe.config.num_experts == 3
    assert (tmp_path / "moe" / "tokenizer.json").exists()
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llm", "vlm"])
def test_tiny_recipes_run_in_order_from_the_repository_root(tmp_path, kind):
    """recipes/moe/tiny-{llm,vlm}-{d2d,d2s,preference}.yaml as shipped, shortened to a few steps each."""
    out = {stage: str(tmp_path / stage) for stage in ("d2d", "d2s", "preference")}
    common = ["--logging_steps", "1", "--report", "false", "--max_steps", "3"]
    llmkd("train", "--config", f"recipes/moe/tiny-{kind}-d2d.yaml", "--output_dir", out["d2d"], *common)
    llmkd("train", "--config", f"recipes/moe/tiny-{kind}-d2s.yaml", "--output_dir", out["d2s"],
          "--model_name_or_path", out["d2d"], *common)
    result = llmkd("train", "--config", f"recipes/moe/tiny-{kind}-preference.yaml", "--output_dir", out["preference"],
                   "--model_name_or_path", out["d2s"], *common)
    model_class = AutoModelForCausalLM if kind == "llm" else AutoModelForImageTextToText
    assert not is_moe_model(model_class.from_pretrained(out["d2d"]))
    for stage in ("d2s", "preference"):
        assert is_moe_model(model_class.from_pretrained(out[stage]))
    assert "rewards/margins" in result.stdout + result.stderr and "moe_load_e0" in result.stdout + result.stderr
    d2s = model_class.from_pretrained(out["d2s"]).state_dict()
    final = model_class.from_pretrained(out["preference"]).state_dict()
    changed = {k for k in final if not torch.equal(d2s[k], final[k])}
    assert changed and not any("vision_tower" in k for k in changed)  # the preference stage trained the student


def load_prepare_script():
    spec = importlib.util.spec_from_file_location("prepare_vlm_mimic_data",
                                                  ROOT / "scripts" / "prepare_vlm_mimic_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepared_vlm_rows_label_only_the_answers_and_train_the_mimic_stage(tmp_path, tokenizer):
    processor = tiny_vision_processor(tokenizer)
    processor.save_pretrained(tmp_path / "processor")
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3)).astype(np.uint8)).save(tmp_path / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is red"}, {"from": "gpt", "value": "the cat"},
            {"from": "human", "value": "and blue"}, {"from": "gpt", "value": "one dog"}]})
    (tmp_path / "data.json").write_text(json.dumps(records))
    load_prepare_script().main(["--processor", str(tmp_path / "processor"), "--data", str(tmp_path / "data.json"),
                                "--image_root", str(tmp_path), "--output", str(tmp_path / "processed")])
    rows = load_from_disk(str(tmp_path / "processed"))
    row = rows[0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert row["input_ids"].count(image_id) == 4 and np.asarray(row["pixel_values"]).shape == (3, 8, 8)
    answer_ids = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    text = processor.tokenizer.decode(answer_ids)
    assert text.replace(" ", "") == "thecat</s>onedog</s>"  # both assistant turns (with their end token), nothing else

    vocab = len(processor.tokenizer) + 4
    student = tiny_llava(vocab, 32, seed=1, image_token_id=image_id)
    teacher = tiny_llava(vocab, 48, seed=2, image_token_id=image_id)
    args = MoEMimicConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                          report_to="none", save_strategy="no", disable_tqdm=True, loss_chunk_size=8)
    trainer = MoEMimicTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                              processing_class=processor.tokenizer)
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0 and is_moe_model(trainer.model)
