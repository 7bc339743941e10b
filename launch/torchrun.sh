#!/usr/bin/env bash
# mgrow train on one node or many with torchrun and a c10d rendezvous.
#
# One node:   NPROC_PER_NODE=8 launch/torchrun.sh configs/gpt/125m_to_350m.yaml
# Many nodes: run on every node, with the same MASTER_ADDR (node 0's address) and its own NODE_RANK:
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 launch/torchrun.sh CONFIG [key=value ...]
# On CPU machines NPROC_PER_NODE is the number of ranks per machine (gloo); on GPU nodes, the GPUs per node (NCCL).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [section.key=value ...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(.venv/bin/python -c 'import torch; print(torch.cuda.device_count() or 4)')}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m torch.distributed.run \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${RDZV_ID:-mgrow}" \
    -m mgrow.cli train --config "$CONFIG" "$@"
