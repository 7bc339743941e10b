#!/usr/bin/env bash
# The GPU check (launch/gpu_check.py says what it runs): on a machine with one or more GPUs.
#
#   launch/gpu_check.sh [--out DIR] [--deadline SECONDS] [--jobs N] [--only probe,a,b,c]
#   launch/gpu_check.sh --dry-run          # validate every command, run nothing (a CPU test runs this)
#   launch/gpu_check.sh --device cpu       # rehearse the same checks on CPU ranks with small models
#
# A machine without a package index installs megatron-core and DeepSpeed from a folder of wheels
# (WHEELS, default .whl: ../shared/gpu/make_gpu_wheels.sh builds it for Python 3.12) into /tmp/mgrow-site;
# mgrow itself runs from this checkout. PY picks the interpreter (default python3, the one with CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
case " $* " in
  *" --dry-run "*) ;;
  *)
    if ! "$PY" -c 'import megatron.core, deepspeed' >/dev/null 2>&1; then
      if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check: megatron-core / DeepSpeed are not importable and $WHEELS holds no wheels" >&2
        exit 2
      fi
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mgrow-site \
        "$WHEELS"/*.whl
      export PYTHONPATH="$PYTHONPATH:/tmp/mgrow-site"
    fi
    ;;
esac
exec "$PY" launch/gpu_check.py "$@"
