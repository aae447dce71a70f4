# shellcheck shell=bash
# Shared by the launchers (sourced, not run): --dry-run handling and the training command.
# shellcheck disable=SC2034  # DRY_RUN, SHIFT, TRAIN and CHECK are read by the launchers

# DRY_RUN=1 when the first argument is --dry-run; the caller then drops it with `shift "$SHIFT"`.
DRY_RUN=0
SHIFT=0
if [[ ${1:-} == --dry-run ]]; then
  DRY_RUN=1
  SHIFT=1
fi

# The training program with the user's flags. Overrides must follow --config FILE (ml_collections
# refuses them before it), so multihost=true goes last; it also wins over a user's own value.
train_command() {
  TRAIN=("${PYTHON:-python3}" -m idfuse_jax.train "$@" --config.multihost=true)
}

# The compile check of the same run for TARGET, here: the training flags without --workdir.
check_command() {
  local target=$1
  shift
  CHECK=("${PYTHON:-python3}" -m idfuse_jax.compile_check --target "$target")
  while (($#)); do
    case $1 in
      --workdir) shift ;;
      --workdir=*) ;;
      *) CHECK+=("$1") ;;
    esac
    shift
  done
}

# One word as the shell reads it back: as is when plain, else in single quotes.
quote_word() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Its arguments as one shell-quoted line (no newline): what ssh runs remotely, or a dry run shows.
quoted() {
  local sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote_word "$word"
    sep=" "
  done
}

# Print the command (shell-quoted, one line) under --dry-run; run it otherwise.
run() {
  if ((DRY_RUN)); then
    quoted "$@"
    printf '\n'
  else
    "$@"
  fi
}

# Like run, but the command replaces the shell (signals reach the program itself).
run_exec() {
  if ((DRY_RUN)); then
    run "$@"
  else
    exec "$@"
  fi
}
