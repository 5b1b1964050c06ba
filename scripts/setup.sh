#!/usr/bin/env bash
# Create .venv and install llmkd with every extra (DeepSpeed, bitsandbytes, lm-eval, vision, liger, dev), at the
# exact versions the test suite was verified on (constraints.txt).
# torch is pinned to 2.13.0 unless a torch is already in the venv or LLMKD_TORCH is set
# (e.g. LLMKD_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" on a GPU machine).
# LLMKD_CONSTRAINTS=none installs the newest releases pyproject.toml allows instead of the verified set
# (scripts/check_releases.py does that in a scratch venv and runs the suite).
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
CONSTRAINTS=(-c constraints.txt)
if [ "${LLMKD_CONSTRAINTS:-}" = "none" ]; then
  CONSTRAINTS=()
  echo "LLMKD_CONSTRAINTS=none: installing the newest releases, not the verified set in constraints.txt"
fi
# DS_BUILD_OPS=0: DeepSpeed builds its ops just in time where they are used, not at install.
DS_BUILD_OPS=0 python -m pip install --quiet "${CONSTRAINTS[@]}" -e ".[all]"
# Liger-Kernel (the "liger" extra), for the conventions tests: its chunked losses run on CPU, so its triton
# dependency (GPU kernels, several hundred MB) is left out here; `pip install -e ".[liger]"` brings it on a GPU.
python -m pip install --quiet --no-deps "${CONSTRAINTS[@]}" "liger-kernel>=0.8.5,<0.9"
python -c "import llmkd, torch, transformers; print(f'llmkd {llmkd.__version__} ready (torch {torch.__version__}, transformers {transformers.__version__})')"
