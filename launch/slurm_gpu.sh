#!/usr/bin/env bash
# Train on several GPU nodes with SLURM: one process per node, all local GPUs per process.
#
#   sbatch --nodes=2 --gpus-per-node=8 launch/slurm_gpu.sh --config configs/dog.py \
#       --workdir /shared/runs/dog --config.train.batch_size=16 --config.mesh.fsdp=8
#
# jax.distributed.initialize() reads the SLURM environment (coordinator = first node).
#SBATCH --job-name=idfuse
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
srun --kill-on-bad-exit=1 python -m idfuse_jax.train --config.multihost=true "$@"
