#!/usr/bin/env bash
# Install (if needed), train the tiny GPT on 4 local CPU ranks (TP2 x DP2) and grow it mid-run at step 40,
# then draw the loss curve with the growth event (runs/tiny_growth/loss.png).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
.venv/bin/mgrow train --config configs/tiny_growth_tp2_dp2.yaml --nproc 4 "$@"
.venv/bin/mgrow plot --metrics runs/tiny_growth/metrics.jsonl --out runs/tiny_growth/loss.png
