#!/usr/bin/env bash
# The confirmation of epsilon on fresh seeds, as docs/_results/confirmation/PROTOCOL.txt fixes it:
# seeds 20-27 on the calibrated and calibrated-stall presets, sum / warmup / SelHN at 0.01, 0.05
# and 0.1; then a three-times-longer budget (12 epochs) on calibrated-stall, seeds 20-22, for
# warmup and SelHN at 0.01 and 0.05.
#   JOBS=1 (the default): seed by seed, so that whatever has finished is a set of complete pairs;
#   JOBS=N: all of a preset's runs at once in N worker processes (a GPU machine).
# Outputs: $OUT/<preset>/{runs,per_seed,comparison,facts,paired}.csv and the rest that compare writes,
# $OUT/calibrated-stall-3x/ for the longer budget. SMOKE=1 runs the same plan at toy sizes.
set -eu
OUT=${OUT:-runs/confirmation}
mkdir -p "$OUT"
DATA=${DATA:-data}
JOBS=${JOBS:-1}
THREADS=${THREADS:-1}
PY=${PY:-python3}
PRESETS=${PRESETS:-calibrated calibrated-stall}
LONGER=${LONGER:-1}
SEEDS=(20 21 22 23 24 25 26 27)
LONG_SEEDS=(20 21 22)
EXTRA=()
if [ "${SMOKE:-0}" = 1 ]; then
  SEEDS=(20 21)
  LONG_SEEDS=(20)
  EXTRA=(--max-steps 4 --synthetic-train 120 --synthetic-dev 40 --synthetic-test 40 --batch-size 32
         --embed-size 32 --word-dim 16)
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS
git log -1 --format='commit %H %s' 2>/dev/null || true
compare() {  # preset, out, seeds..., [-- training arguments]
  local preset=$1 out=$2
  shift 2
  "$PY" -m examples.selection_study.compare --preset "$preset" --root "$DATA/$preset" --out "$out" \
    --losses sum warmup selhn --epsilons 0.05 0.1 --jobs "$JOBS" --threads "$THREADS" --seeds "$@"
}
for preset in $PRESETS; do
  if [ "$JOBS" = 1 ]; then
    for seed in "${SEEDS[@]}"; do
      compare "$preset" "$OUT/$preset" "$seed" -- "${EXTRA[@]}" > "$OUT/$preset.seed$seed.log" 2>&1 || { echo "$preset seed $seed failed"; exit 1; }
      echo "$(date -u +%H:%M:%S) $preset seed $seed done"
    done
  fi
  compare "$preset" "$OUT/$preset" "${SEEDS[@]}" -- "${EXTRA[@]}" > "$OUT/$preset.log" 2>&1
  echo "$(date -u +%H:%M:%S) $preset: tables written"
done
if [ "$LONGER" = 1 ]; then
  "$PY" -m examples.selection_study.compare --preset calibrated-stall --root "$DATA/calibrated-stall" \
    --out "$OUT/calibrated-stall-3x" --losses warmup selhn --epsilons 0.05 --jobs "$JOBS" --threads "$THREADS" \
    --seeds "${LONG_SEEDS[@]}" -- --epochs 12 --lr-decay-epoch 9 "${EXTRA[@]}" > "$OUT/calibrated-stall-3x.log" 2>&1
  echo "$(date -u +%H:%M:%S) longer budget: tables written"
fi
"$PY" -m examples.selection_study.confirm "$OUT"
