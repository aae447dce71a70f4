#!/usr/bin/env bash
# Multi-node GPU training without a scheduler: run this on every node with its rank.
#
#   COORDINATOR=10.0.0.1:1234 NUM_NODES=2 NODE_RANK=0 launch/gpu_node.sh --config configs/dog.py \
#       --workdir /shared/runs/dog --config.train.batch_size=16
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port of node 0}"
: "${NUM_NODES:?set NUM_NODES}"
: "${NODE_RANK:?set NODE_RANK (0..NUM_NODES-1)}"
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_NODES JAX_PROCESS_ID=$NODE_RANK
exec python -m idfuse_jax.train --config.multihost=true "$@"
