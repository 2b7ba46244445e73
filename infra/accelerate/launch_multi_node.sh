#!/usr/bin/env bash
# Multi-node launch of one pipeline stage with infra/accelerate/multi_node.yaml; run it on every node,
# from the repo root, with the same MAIN_PROCESS_IP and a distinct MACHINE_RANK (0 on the main node):
#   MAIN_PROCESS_IP=10.0.0.1 MACHINE_RANK=0 infra/accelerate/launch_multi_node.sh grpo --set grpo.steps=500
# Optional: MAIN_PROCESS_PORT (29500), NUM_MACHINES (2), NUM_PROCESSES (total over all nodes, 16).
set -euo pipefail
: "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the address of the rank-0 node}"
: "${MACHINE_RANK:?set MACHINE_RANK (0 on the rank-0 node, 1..N-1 elsewhere)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
extra=()
if [[ -n "${NUM_MACHINES:-}" ]]; then extra+=(--num_machines "$NUM_MACHINES"); fi
if [[ -n "${NUM_PROCESSES:-}" ]]; then extra+=(--num_processes "$NUM_PROCESSES"); fi
exec accelerate launch --config_file "$here/multi_node.yaml" \
    --main_process_ip "$MAIN_PROCESS_IP" \
    --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    --machine_rank "$MACHINE_RANK" \
    "${extra[@]}" \
    -m grpo_steps.cli "$@"
