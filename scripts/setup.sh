#!/usr/bin/env bash
# Create .venv and install llmkd with every extra (DeepSpeed, bitsandbytes, lm-eval, vision, dev).
# torch is pinned to 2.13.0 unless a torch is already in the venv or LLMKD_TORCH is set
# (e.g. LLMKD_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  python -m pip install --quiet ${LLMKD_TORCH:-torch==2.13.0}
fi
# DS_BUILD_OPS=0: DeepSpeed builds its ops just in time where they are used, not at install.
DS_BUILD_OPS=0 python -m pip install --quiet -e ".[all]"
python -c "import llmkd, torch; print(f'llmkd {llmkd.__version__} ready (torch {torch.__version__})')"
