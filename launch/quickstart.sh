#!/usr/bin/env bash
# Install (if needed) and train the tiny GPT on 4 local CPU ranks, TP2 x PP2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec .venv/bin/mgrow train --config configs/tiny_tp2_pp2.yaml "$@"
