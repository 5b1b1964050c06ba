"""The documented multi-process commands (ACCELERATE.md), run as a user types them on a machine without a GPU.

`accelerate launch --config_file recipes/accelerate/<ddp|zero2|zero3>.yaml --num_processes 2 -m llmkd train ...`
with no flag added and no patch of accelerate: llmkd itself sets what accelerate and DeepSpeed need on CPU
(llmkd/launch.py). A recorder (a ``sitecustomize`` module that only records; it changes nothing) writes, per rank,
the world size, the distributed type, the model wrapper and the token ids of every batch the rank trained on, so
the test checks that the two processes formed one world and saw different rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from distributed.launcher import CHILD_ENV, TESTS_DIR, free_port
from utils import write_local_run

from llmkd.launch import LaunchError, adapt_to_launcher, check_launched_world

ROOT = TESTS_DIR.parent
RECORDER = """
import atexit, json, os
_out = os.environ["LLMKD_TEST_RECORD"]
def _install():
    import transformers
    from llmkd.data import collator as collator_module
    seen = []
    original_call = collator_module.DistillDataCollator.__call__
    def call(self, features):
        batch = original_call(self, features)
        seen.append(batch["input_ids"].tolist())
        return batch
    collator_module.DistillDataCollator.__call__ = call
    original_train = transformers.Trainer.train
    def train(self, *args, **kwargs):
        result = original_train(self, *args, **kwargs)
        state = self.accelerator.state
        record = dict(world=self.accelerator.num_processes, rank=self.accelerator.process_index,
                      distributed_type=str(state.distributed_type), deepspeed=self.is_deepspeed_enabled,
                      wrapper=type(self.model_wrapped).__name__, batches=seen)
        with open(os.path.join(_out, f"rank{record['rank']}.json"), "w") as handle:
            json.dump(record, handle)
        return result
    transformers.Trainer.train = train
_install()
"""


def _accelerate_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "accelerate")
    return [script, "launch"] if os.path.exists(script) else [sys.executable, "-m", "accelerate.commands.launch"]


def _launch(tmp_path, accelerate_config: str, record: bool = True):
    local = write_local_run(tmp_path)
    distinct = tmp_path / "distinct.jsonl"  # 16 different rows: a row seen by both ranks is a sharing error
    distinct.write_text("\n".join(json.dumps({"prompt": f"add {i} and {i + 1}", "completion": f" sum {2 * i + 1}"})
                                  for i in range(16)))
    local["dataset_name"] = str(distinct)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "kd", **local,
        "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 2,
        "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "report": False,
    }))
    record_dir = tmp_path / "record"
    record_dir.mkdir()
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(RECORDER)
    pythonpath = os.pathsep.join(p for p in (str(recorder) if record else "", os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, **CHILD_ENV, PYTHONPATH=pythonpath, LLMKD_TEST_RECORD=str(record_dir))
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    # the documented command line, word for word, except the port (tests run side by side)
    command = _accelerate_command() + [
        "--config_file", str(ROOT / "recipes" / "accelerate" / accelerate_config), "--num_processes", "2",
        "--main_process_port", str(free_port()), "-m", "llmkd", "train", "--config", str(recipe),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, cwd=str(tmp_path))
    records = [json.loads((record_dir / f"rank{r}.json").read_text()) for r in range(2)
               if (record_dir / f"rank{r}.json").exists()]
    return result, records


@pytest.mark.distributed
@pytest.mark.parametrize("accelerate_config, distributed_type, wrapper", [
    ("ddp.yaml", "MULTI_CPU", "DistributedDataParallel"),
    ("zero2.yaml", "DEEPSPEED", "DeepSpeedEngine"),
    ("zero3.yaml", "DEEPSPEED", "DeepSpeedEngine"),
])
def test_the_documented_launch_forms_one_world_on_cpu(tmp_path, accelerate_config, distributed_type, wrapper):
    if accelerate_config != "ddp.yaml":
        pytest.importorskip("deepspeed", reason="the ZeRO configs need deepspeed (extra 'deepspeed')")
    result, records = _launch(tmp_path, accelerate_config)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert len(records) == 2, output[-3000:]
    for rank, record in enumerate(records):
        assert record["rank"] == rank and record["world"] == 2
        assert record["distributed_type"] == f"DistributedType.{distributed_type}"
        assert record["wrapper"] == wrapper
        # one micro-batch per optimizer step (accelerate's loader fetches one batch ahead: at most one more)
        assert len(record["batches"]) in (3, 4)
    rows = [[tuple(row) for batch in record["batches"][:3] for row in batch] for record in records]
    assert not set(rows[0]) & set(rows[1]), "the two ranks trained on the same rows"
    assert (tmp_path / "out" / "model.safetensors").exists()
    # 3 steps x 2 rows x 2 processes = 12 of 16 rows = epoch 0.75 (one process alone would be at 0.375)
    assert "'epoch': '0.75'" in output, output[-3000:]
    assert "no GPU:" in output  # llmkd says what it set
    # known third-party noise is silenced (bitsandbytes' message is checked in test_cli.py: the recorder imports
    # transformers, and with it bitsandbytes, before llmkd's command line starts)
    for noise in ("pin_memory", "is deprecated"):
        assert noise not in output, noise
    # DeepSpeed's accelerator detection: said once, by `accelerate launch` itself (not an llmkd process), not per rank
    assert output.count("Setting accelerator to CPU") <= 1


@pytest.mark.distributed
def test_fsdp_on_cpu_is_refused_in_one_line(tmp_path):
    result, records = _launch(tmp_path, "fsdp2.yaml", record=False)
    assert result.returncode != 0 and not records
    lines = [line for line in result.stderr.splitlines() if line.startswith("llmkd train: LaunchError")]
    assert len(lines) == 2, result.stderr[-3000:]  # one line per rank
    assert "FSDP needs a GPU per process" in lines[0] and "ddp.yaml" in lines[0]


class _Config:
    """The fields of a TrainingArguments that adapt_to_launcher reads and sets (before __post_init__)."""

    def __init__(self, **fields):
        self.bf16 = self.fp16 = self.use_cpu = False
        self.ddp_backend = self.deepspeed = self.fsdp = None
        self.dataloader_pin_memory = True
        self.__dict__.update(fields)


@pytest.fixture
def cpu_launch(monkeypatch):
    import llmkd.launch as launch

    monkeypatch.setattr(launch, "has_accelerator", lambda: False)
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    return monkeypatch


def test_adapt_to_launcher_on_cpu(cpu_launch):
    ddp = _Config()
    adapt_to_launcher(ddp)
    assert ddp.use_cpu is True and ddp.ddp_backend is None and ddp.dataloader_pin_memory is False

    cpu_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cpu_launch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    zero = _Config()
    adapt_to_launcher(zero)
    assert zero.use_cpu is False and zero.ddp_backend == "gloo" and zero.bf16 is False
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "no"  # DeepSpeed's plugin reads it: float32 on CPU
    with pytest.raises(LaunchError, match="bf16 on a machine without a GPU under DeepSpeed"):
        adapt_to_launcher(_Config(bf16=True))

    cpu_launch.delenv("ACCELERATE_USE_DEEPSPEED")
    cpu_launch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchError, match="FSDP needs a GPU"):
        adapt_to_launcher(_Config())


def test_adapt_to_launcher_leaves_single_process_and_gpu_runs_alone(cpu_launch):
    import llmkd.launch as launch

    cpu_launch.setenv("WORLD_SIZE", "1")
    alone = _Config()
    adapt_to_launcher(alone)
    assert alone.use_cpu is False and alone.ddp_backend is None
    cpu_launch.setattr(launch, "has_accelerator", lambda: True)
    cpu_launch.setenv("WORLD_SIZE", "8")
    cpu_launch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    gpu = _Config()
    adapt_to_launcher(gpu)  # the launcher's precision is adopted when the recipe chose none
    assert gpu.bf16 is True and gpu.use_cpu is False and gpu.dataloader_pin_memory is True
    chosen = _Config(fp16=True)
    adapt_to_launcher(chosen)
    assert chosen.fp16 is True and chosen.bf16 is False


def test_a_launch_that_did_not_form_one_world_stops(monkeypatch):
    class Accelerator:  # what check_launched_world reads of an accelerate.Accelerator
        num_processes = 1
        distributed_type = "NO"

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError, match=r"started 2 processes, but this one joined a world of 1"):
        check_launched_world(Accelerator())
    Accelerator.num_processes = 2
    check_launched_world(Accelerator())
    monkeypatch.setenv("WORLD_SIZE", "1")
    Accelerator.num_processes = 1
    check_launched_world(Accelerator())

