#!/usr/bin/env bash
# The swap's configuration, as docs/_results/swap/PROTOCOL.txt fixes it: the warm-up and SelHN at 0.05, both at
# VSE++'s summed loss scale with gradient clipping at 2.0, on seeds 30-37 of the calibrated and calibrated-stall
# presets, seed by seed (so that whatever has finished is a set of complete pairs).
#   PRESETS="calibrated calibrated-stall" (the default) runs them one after the other; give one preset per
#   stream to run two streams at once, then grade: python -m examples.selection_study.confirm --swap "$OUT".
# Outputs: $OUT/<preset>/{runs,per_seed,comparison,facts,paired}.csv and the rest that compare writes.
# SMOKE=1 runs the same plan at toy sizes.
set -eu
OUT=${OUT:-runs/swap}
mkdir -p "$OUT"
DATA=${DATA:-data}
THREADS=${THREADS:-1}
PY=${PY:-python3}
PRESETS=${PRESETS:-calibrated calibrated-stall}
SEEDS=(30 31 32 33 34 35 36 37)
EXTRA=()
STEPS=()
if [ "${SMOKE:-0}" = 1 ]; then
  SEEDS=(30 31)
  STEPS=(--steps 4)
  EXTRA=(--synthetic-train 120 --synthetic-dev 40 --synthetic-test 40 --batch-size 32
         --embed-size 32 --word-dim 16)
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS
git log -1 --format='commit %H %s' 2>/dev/null || true
compare() {  # preset, seeds...
  local preset=$1
  shift
  "$PY" -m examples.selection_study.compare --preset "$preset" --root "$DATA/$preset" --out "$OUT/$preset" \
    --losses warmup selhn --epsilons 0.05 --no-default-epsilon --threads "$THREADS" "${STEPS[@]}" --seeds "$@" \
    -- --reduction sum --grad-clip 2.0 "${EXTRA[@]}"
}
for preset in $PRESETS; do
  for seed in "${SEEDS[@]}"; do
    compare "$preset" "$seed" > "$OUT/$preset.seed$seed.log" 2>&1 || { echo "$preset seed $seed failed"; exit 1; }
    echo "$(date -u +%H:%M:%S) $preset seed $seed done"
  done
  compare "$preset" "${SEEDS[@]}" > "$OUT/$preset.log" 2>&1
  echo "$(date -u +%H:%M:%S) $preset: tables written"
done
