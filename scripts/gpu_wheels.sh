#!/usr/bin/env bash
# The wheels scripts/gpu_check.py needs on the GPU machine and that machine lacks (or has at a version llmkd was not
# verified with), for Python 3.12 on manylinux x86-64, into .whl/ (ignored by git; it travels with the device
# command's carry list). Versions are constraints.txt's, the set the test suite passed on; llmkd itself travels as
# source (this checkout).
#
#   bash scripts/gpu_wheels.sh            # downloads, checks the 64 MiB limit, prints the device command
#
# What the GPU machine has (/work/.library/device/KINDS.md, 2026-11): torch 2.11 (CUDA 13), transformers 5.17,
# accelerate 1.15, huggingface_hub 1.33, tokenizers 0.23.2, safetensors 0.8, triton 3.6, pyarrow, pandas, xxhash.
# Carried: transformers 5.24 (llmkd needs >= 5.23: its head interception relies on internals verified there), the
# accelerate and peft llmkd was verified with, trl and datasets with the pure-Python packages datasets needs and the
# machine lacks (dill, multiprocess; fsspec at the version datasets accepts), regex (transformers 5.24 checks for a
# 2025.10 or newer at import) and liger-kernel (the stronger floor's fused linear cross-entropy). deepspeed,
# bitsandbytes, evaluate and lm-eval are not needed by the check.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEST=.whl
LIMIT_MIB=64
NAMES=(transformers accelerate peft trl datasets dill multiprocess fsspec regex liger-kernel)

pins=()
for name in "${NAMES[@]}"; do
  pin=$(grep -i -E "^${name}==" constraints.txt || true)
  if [ -z "$pin" ]; then
    echo "constraints.txt pins no version of $name" >&2
    exit 1
  fi
  pins+=("$pin")
done

rm -rf "$DEST"
mkdir -p "$DEST"
# pure-Python wheels match any platform; regex (compiled) is found for cp312 under one of the manylinux tags
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"

wheel_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
# what travels besides: tracked and untracked-but-not-ignored files (the device tool's rule)
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | grep total$ \
  | awk '{s += $1} END {print s}')
total=$((wheel_bytes + tree_bytes))
limit=$((LIMIT_MIB * 1024 * 1024))
echo "wheels ($(ls "$DEST" | wc -l)):"
ls -1 "$DEST" | sed 's/^/  /'
awk -v w="$wheel_bytes" -v t="$tree_bytes" -v l="$LIMIT_MIB" \
  'BEGIN {printf "wheels %.1f MiB + working tree %.1f MiB = %.1f MiB (limit %d MiB)\n", w / 2^20, t / 2^20, (w + t) / 2^20, l}'
if [ "$total" -gt "$limit" ]; then
  echo "over the $LIMIT_MIB MiB the device tool carries: drop a wheel or shrink the tree" >&2
  exit 1
fi

install="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $DEST/*.whl && export PYTHONPATH=/tmp/site || exit;"
echo
echo "install line (on the device):"
echo "  $install"
echo
echo "device command (run with carry [\"$DEST\"] and timeout_s 540):"
echo "  $install set -o pipefail; PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out_dir \$OUT 2>&1 | tee \$OUT/gpu_check.log"
