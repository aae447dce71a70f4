#!/usr/bin/env bash
# Multi-node GPU training without a scheduler: run this on every node, each with its own rank.
# One process per node drives all of the node's GPUs.
#
#   COORDINATOR=10.0.0.1:1234 NUM_NODES=2 NODE_RANK=0 launch/gpu_node.sh --config configs/dog.py \
#       --workdir /shared/runs/dog --config.train.batch_size=16
#
# COORDINATOR is host:port of the rank-0 node (the port must be free there and reachable from
# every node). --dry-run first prints the command instead of running it. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
shift "$SHIFT"
: "${COORDINATOR:?set COORDINATOR=host:port of the rank-0 node}"
: "${NUM_NODES:?set NUM_NODES (how many nodes run this script)}"
: "${NODE_RANK:?set NODE_RANK (0..NUM_NODES-1, 0 on the COORDINATOR node)}"
train_command "$@"
run_exec env JAX_COORDINATOR_ADDRESS="$COORDINATOR" JAX_NUM_PROCESSES="$NUM_NODES" \
  JAX_PROCESS_ID="$NODE_RANK" "${TRAIN[@]}"
