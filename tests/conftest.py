import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

from utils import make_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: intra-op threads only add overhead (a lot of it when the other cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The tests .venv-vllm runs (scripts/setup_vllm.sh; the README's test command): the vLLM tests, and the trainers,
# losses, output heads, data and on-policy path on the transformers vLLM pins (5.19), which the rest of the suite
# (on constraints.txt's transformers) does not see. Select them with `-m vllm_env`.
VLLM_ENV_FILES = {
    "test_vllm.py", "test_on_policy.py", "test_trainer.py", "test_losses.py", "test_chunked_engine.py",
    "test_heads.py", "test_data.py", "test_sampled_token.py", "test_completions.py", "test_teacher_signals.py",
    "test_served_teacher.py", "test_teacher_server.py", "test_sglang_server.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if os.path.basename(str(item.fspath)) in VLLM_ENV_FILES:
            item.add_marker(pytest.mark.vllm_env)
