#!/usr/bin/env bash
# mgrow train under the deepspeed launcher (ZeRO configs: optimizer.type zero1|zero2|zero3).
#
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh configs/gpt/125m_to_350m_zero2.yaml
# Lines of the hostfile are "<host> slots=<ranks>"; the launcher reaches the other hosts with pdsh/ssh.
# A hostfile naming only localhost runs locally (no ssh needed).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/deepspeed.sh CONFIG [section.key=value ...]}
shift
HOSTFILE=${HOSTFILE:-launch/hostfile.example}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ssh_check=()
if [ "$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")" = 1 ] && grep -q '^localhost' "$HOSTFILE"; then
    ssh_check=(--no_ssh_check --master_addr 127.0.0.1)
fi
exec .venv/bin/deepspeed --hostfile "$HOSTFILE" "${ssh_check[@]}" --master_port "${MASTER_PORT:-29500}" \
    --module mgrow.cli train --config "$CONFIG" "$@"
