#!/usr/bin/env bash
# The README's ToyBench comparison: IdFuse, its three ablations, DisenBooth and DreamBooth-LoRA
# (plus the untrained model as a control), each trained on the eight ToyBench subjects in one
# job (the subject axis, batch 1 per subject as in the paper) on the shipped tiny world model,
# then one `compare` (evaluating every run on ToyBench's 8 prompts, 2 images each, ground-truth
# scores). Writes runs/toybench_compare/{NAME,comparison}; copies the plots to docs/ with
# COPY_DOCS=1. Measured on the shared 2-core CPU: see the README's "Methods and comparisons".
#   bash benchmarks/toybench_compare.sh            # STEPS=800 OUT=runs/toybench_compare
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python}
STEPS=${STEPS:-800}
OUT=${OUT:-runs/toybench_compare}
BENCH=$OUT/toybench

[ -f "$BENCH/toybench.json" ] || $PYTHON -m idfuse_jax.data.world --out "$BENCH"

train() {  # NAME PRESET [overrides...]: one job of all eight subjects; a finished job is kept
  local name=$1 preset=$2
  shift 2
  [ -f "$OUT/$name/subjects/red_striped_ball/idfuse_weights.safetensors" ] && return
  local start=$SECONDS
  nice $PYTHON -m idfuse_jax.train --config configs/world.py --workdir "$OUT/$name" \
    --config.data.instance_dir="$BENCH" --config.data.subjects=all \
    --config.train.batch_size=1 --config.train.steps="$STEPS" \
    --config.train.checkpoint_every="$STEPS" --config.train.sample_every="$STEPS" \
    --config.method.preset="$preset" "$@" 2>&1 | grep -v "step/s" || true
  [ -f "$OUT/$name/subjects/red_striped_ball/idfuse_weights.safetensors" ] ||
    { echo "error: training $name failed" >&2; exit 1; }
  echo "$name: trained in $((SECONDS - start)) s"
}

PRESETS=(idfuse idfuse_no_explicit idfuse_no_ffm idfuse_no_image_branch disenbooth dreambooth_lora)
for preset in "${PRESETS[@]}"; do train "$preset" "$preset"; done
# The control: the pretrained model as it is (no update: learning rate 0, one step).
STEPS=1 train untrained dreambooth_lora --config.optim.learning_rate=0

methods=()
for name in "${PRESETS[@]}" untrained; do methods+=("$name=$OUT/$name"); done
start=$SECONDS
nice $PYTHON -m idfuse_jax.compare "${methods[@]}" --toybench "$BENCH" --num_images 2 \
  --out "$OUT/comparison" 2>&1 | grep -v "img/s"
echo "compare (evaluations included) in $((SECONDS - start)) s"
if [ "${COPY_DOCS:-0}" = 1 ]; then
  cp "$OUT/comparison/tradeoff.png" docs/toybench_tradeoff.png
  cp "$OUT/comparison/subjects.png" docs/toybench_compare_subjects.png
fi
