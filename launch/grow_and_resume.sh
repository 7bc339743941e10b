#!/usr/bin/env bash
# The resume-from-grown-checkpoint workflow: grow a saved checkpoint offline (weights and optimizer state),
# check that the grown model computes the same logits, then resume training from it with torchrun.
#
#   launch/grow_and_resume.sh CONFIG CHECKPOINT PLAN GROWN_ROOT [section.key=value ...]
#
# CHECKPOINT is a checkpoint root (its `latest`) or a step folder; GROWN_ROOT receives the grown checkpoint and
# the run's later checkpoints. CONFIG is the run's config as before: the grown checkpoint records the plan, and
# the resumed run replays it. NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE as for launch/torchrun.sh;
# the offline growth runs on the checkpoint's own layout, on this node.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 4 ]; then
    echo "usage: launch/grow_and_resume.sh CONFIG CHECKPOINT PLAN GROWN_ROOT [section.key=value ...]" >&2
    exit 2
fi
CONFIG=$1 CHECKPOINT=$2 PLAN=$3 GROWN=$4
shift 4
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/mgrow grow-checkpoint --in "$CHECKPOINT" --plan "$PLAN" --out "$GROWN"
.venv/bin/mgrow verify --before "$CHECKPOINT" --after "$GROWN"
exec launch/torchrun.sh "$CONFIG" checkpoint.load="$GROWN" checkpoint.save="$GROWN" "$@"
