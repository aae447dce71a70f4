#!/usr/bin/env bash
# Train on GPU nodes with SLURM: one process per GPU, the layout jax.distributed.initialize()
# expects under SLURM (it reads the coordinator, process count and id from SLURM's environment
# and gives process i the GPU SLURM_LOCALID).
#
#   sbatch --nodes=2 launch/slurm_gpu.sh --config configs/dog.py --workdir /shared/runs/dog \
#       --config.train.batch_size=16 --config.mesh.fsdp=8
#
# Nodes with other than 8 GPUs: sbatch --ntasks-per-node=N --gpus-per-node=N. --dry-run prints
# the command instead of running it. PYTHON picks the interpreter (default python3).
#SBATCH --job-name=idfuse
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
set -euo pipefail
# Under sbatch this file runs from a spool copy: find _common.sh from the submit directory.
here=$(dirname "${BASH_SOURCE[0]}")
[[ -f $here/_common.sh ]] || here=${SLURM_SUBMIT_DIR:-.}/launch
# shellcheck source=launch/_common.sh
source "$here/_common.sh"
shift "$SHIFT"
train_command "$@"
run_exec srun --kill-on-bad-exit=1 "${TRAIN[@]}"
