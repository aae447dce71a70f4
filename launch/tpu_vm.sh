#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: runs the same command on every host of the slice.
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config configs/dog.py --workdir gs://bucket/runs/dog \
#       --config.train.batch_size=32 --config.mesh.fsdp=4
#
# Expects the repo and the weights at the same paths on every host (e.g. a shared disk or a
# previous `gcloud compute tpus tpu-vm scp`). jax.distributed.initialize() finds the
# coordinator on TPU VMs by itself; --config.multihost=true asks for it.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 TPU_NAME ZONE [train flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
repo=${IDFUSE_REPO:-~/idfuse_jax}
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd $repo && pip install -q -e . 'jax[tpu]' && python -m idfuse_jax.train --config.multihost=true $(printf '%q ' "$@")"
