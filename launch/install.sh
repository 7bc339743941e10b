#!/usr/bin/env bash
# Create .venv and install mgrow with its test and hf (transformers) extras. CPU machines get torch's CPU
# build (torch==2.13.0); set MGROW_TORCH to another requirement (e.g. a CUDA build
# on a GPU cluster) to override. Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first and pinned: a loose torch requirement resolves to several GB of CUDA wheels.
.venv/bin/python -m pip install -q "${MGROW_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test,hf]"
.venv/bin/mgrow data --out data/cache/corpus >/dev/null
echo "mgrow installed in .venv ($(PYTHONWARNINGS=ignore .venv/bin/python -c 'import torch, megatron.core, deepspeed; print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, deepspeed {deepspeed.__version__}")'))"
