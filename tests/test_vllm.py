"""The vLLM backend of on-policy distillation (use_vllm=True, llmkd/generation/vllm_sampler.py).

The tests marked ``vllm`` start a real colocated vLLM engine (vLLM's CPU build, in its own environment:
``bash scripts/setup_vllm.sh`` then ``.venv-vllm/bin/python -m pytest -m vllm_env``, the README's test command);
where vLLM is not installed they are skipped and the error a user gets instead is tested. Each engine runs in a
process of its own (tests/vllm_worker.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from accelerate import Accelerator

from utils import make_tokenizer, tiny_llama
from llmkd import DistillConfig
from llmkd.generation import SamplingSettings, VLLMSampler, VLLMUnavailableError

HERE = os.path.dirname(__file__)
HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed: bash scripts/setup_vllm.sh, then "
                                "run .venv-vllm/bin/python -m pytest -m vllm_env")
# fp32 on both sides: the engine's and transformers' log-probabilities of the same tokens differ by float32 rounding
# of the same sums (hidden 64, 2 layers, vocab 320: |log p| < 10, relative error ~1e-6), far below this bound; a stale
# or wrong weight moves them by > 0.1 (the gap to the initial weights, asserted below).
LOGPROB_BOUND = 1e-3


def run_worker(tmp_path, *flags) -> dict:
    out = tmp_path / "records.json"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE)]))
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    result = subprocess.run([sys.executable, os.path.join(HERE, "vllm_worker.py"), str(out), *flags], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(out.read_text())


def check_records(records: dict) -> None:
    # every student micro-batch (3 steps x 2 micro-batches) was sampled by the engine
    assert len(records["gap"]) == 6 and records["on_policy_fraction"] == [1.0, 1.0, 1.0]
    assert records["engine_dtype"] == "torch.float32"
    # the colocated engine on a CPU leaves the training's OpenMP threads unpinned
    assert records["thread_bind"] == "nobind"
    # the engine holds the student's weights of each step: its log-probs of its samples are the student's
    assert max(records["gap"]) < LOGPROB_BOUND, records["gap"]
    # ... and not the initial weights, which the run moved away from after its first optimizer step
    assert records["gap_to_initial"][0] < LOGPROB_BOUND
    assert min(records["gap_to_initial"][2:]) > 0.1, records["gap_to_initial"]
    # the rows distilled carry exactly the sampled tokens (prompt and padding masked)
    assert records["distilled"] == records["sampled"]
    assert records["weights_changed"]
    assert all(loss == loss for loss in records["loss"])
    # per-row seeds: the same seed draws the same completions, another seed others
    assert records["same_seed_same_samples"] and records["other_seed_other_samples"]


@pytest.mark.vllm
@needs_vllm
def test_colocated_vllm_samples_with_the_weights_of_each_step(tmp_path):
    check_records(run_worker(tmp_path))


@pytest.mark.vllm
@needs_vllm
def test_colocated_vllm_lora_student_syncs_merged_adapters(tmp_path):
    check_records(run_worker(tmp_path, "--lora"))


@pytest.mark.vllm
@needs_vllm
def test_server_mode_on_cpu_names_colocate():
    model = tiny_llama(len(make_tokenizer()), hidden=64)
    with pytest.raises(VLLMUnavailableError, match="needs a CUDA device.*vllm_mode='colocate'"):
        VLLMSampler(model, Accelerator(cpu=True), make_tokenizer(), SamplingSettings(), mode="server",
                    server_base_url="http://127.0.0.1:9", server_timeout=1)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the missing-vLLM error cannot be raised")
def test_missing_vllm_says_what_to_install():
    tokenizer = make_tokenizer()
    with pytest.raises(VLLMUnavailableError, match=r"llmkd\[vllm\].*setup_vllm.sh.*use_vllm=False"):
        VLLMSampler(tiny_llama(len(tokenizer)), Accelerator(cpu=True), tokenizer, SamplingSettings(),
                    mode="colocate")


def test_vllm_fields_are_checked(tmp_path):
    with pytest.raises(ValueError, match="lmbda=0 samples none"):
        DistillConfig(output_dir=str(tmp_path), use_vllm=True)
    with pytest.raises(ValueError, match="vllm_mode must be 'colocate' or 'server'"):
        DistillConfig(output_dir=str(tmp_path), use_vllm=True, lmbda=1.0, vllm_mode="remote")
    config = DistillConfig(output_dir=str(tmp_path), use_vllm=True, lmbda=1.0, vllm_server_port=8123,
                           vllm_gpu_memory_utilization=0.5)
    kwargs = config.vllm_engine_kwargs()
    assert kwargs["server_port"] == 8123 and kwargs["gpu_memory_utilization"] == 0.5
