"""`accelerate launch -m llmkd train` with the shipped accelerate configs, on 2 CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from distributed.launcher import CHILD_ENV, TESTS_DIR, free_port
from utils import write_local_run

ROOT = TESTS_DIR.parent
SITECUSTOMIZE = f"""
import sys
sys.path.insert(0, {str(TESTS_DIR)!r})
from distributed.launcher import patch_accelerate_cpu_backend
patch_accelerate_cpu_backend()
"""


@pytest.mark.distributed
@pytest.mark.parametrize("accelerate_config", ["zero2.yaml", "zero3.yaml"])
def test_accelerate_launch_runs_the_cli_on_two_processes(tmp_path, accelerate_config):
    pytest.importorskip("deepspeed", reason="the ZeRO configs need deepspeed (extra 'deepspeed')")
    local = write_local_run(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "method": "kd", **local,
        "output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 2,
        "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
    }))
    # The CPU backend patch (see tests/distributed/launcher.py) reaches the children through sitecustomize.
    patch_dir = tmp_path / "patch"
    patch_dir.mkdir()
    (patch_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, **CHILD_ENV, PYTHONPATH=f"{patch_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes" / "accelerate" / accelerate_config), "--num_processes", "2", "--mixed_precision", "no",
        "--main_process_port", str(free_port()), "-m", "llmkd", "train", "--config", str(recipe),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=400, cwd=str(tmp_path))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "'kd_loss'" in output
    # both ranks joined one world of size 2: 3 steps x 2 rows x 2 processes = 12 of 16 rows = epoch 0.75
    # (a single process would be at epoch 0.375)
    assert "'epoch': '0.75'" in output, output[-3000:]
