#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (v4, v5e, v5p, v6e; one host or many).
#
#   launch/tpu_vm.sh [--dry-run] [--skip-install] [--check TARGET] TPU_NAME ZONE \
#       --config configs/dog.py --workdir gs://bucket/runs/dog --config.train.batch_size=32
#
# 0. with --check TARGET (v5e-32, v5p-8, ...: idfuse_jax.targets), first compiles every program
#    of the run for that slice here (python -m idfuse_jax.compile_check, with the same flags) and
#    stops unless all compile and fit; it needs this machine's `pip install -e '.[accel]'`,
# 1. packs this checkout's tracked files as they are on disk (uncommitted changes included;
#    untracked files are not: `git add` them) and copies them to every worker,
# 2. installs them with JAX's TPU build on every worker (skipped with --skip-install),
# 3. runs the same training command on every worker at once; jax.distributed.initialize() finds
#    the coordinator and the process ids on TPU VMs by itself.
# Weights and photos must be at the same paths on every worker; the workdir on GCS (gs://...) or
# a disk every worker shares. REMOTE_DIR is the code's folder on the workers (default idfuse_jax,
# under the home folder). --dry-run prints the commands instead of running them.
set -euo pipefail
# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
shift "$SHIFT"
install=1
target=""
while [[ ${1:-} == --skip-install || ${1:-} == --check ]]; do
  if [[ $1 == --skip-install ]]; then
    install=0
    shift
  else
    target=${2:?--check needs a target, e.g. --check v5e-32}
    shift 2
  fi
done
if (($# < 2)); then
  echo "usage: $0 [--dry-run] [--skip-install] [--check TARGET] TPU_NAME ZONE --config FILE --workdir DIR [--config.a.b=v ...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
if [[ -n $target ]]; then
  check_command "$target" "$@"
  run "${CHECK[@]}"
fi
remote=${REMOTE_DIR:-idfuse_jax}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive=${TMPDIR:-/tmp}/idfuse_jax_code.tar.gz
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command)
python=${PYTHON:-python3}
if ((install)); then
  # A commit of the tracked files as they are on disk (no ref or stash entry is changed);
  # empty when nothing differs from HEAD.
  snapshot=$(git -C "$repo" -c user.name=idfuse_jax -c user.email=idfuse_jax@localhost stash create)
  if [[ -n $(git -C "$repo" ls-files --others --exclude-standard) ]]; then
    echo "warning: untracked files in $repo are not copied (git add them to copy them)" >&2
  fi
  run git -C "$repo" archive --format=tar.gz --output="$archive" "${snapshot:-HEAD}"
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:idfuse_jax_code.tar.gz" --zone="$zone" \
    --worker=all
  run "${ssh[@]}" "rm -rf $(quoted "$remote") && mkdir -p $(quoted "$remote") && tar -xzf \
idfuse_jax_code.tar.gz -C $(quoted "$remote") && $python -m pip install -q -e $(quoted "$remote") \
'jax[tpu]'"
fi
train_command "$@"
run "${ssh[@]}" "cd $(quoted "$remote") && $(quoted "${TRAIN[@]}")"
