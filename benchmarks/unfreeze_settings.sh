#!/usr/bin/env bash
# The unfreeze at the settings users run, as docs/_results/unfreeze_settings/PROTOCOL.txt fixes it: the
# calibrated-unfreeze preset at backbone factor 0.01 (part 1) and 1 (part 2), summed and clipped at 2.0, with
# warmup, vse-infinity-full and SelHN 0.05; and at the preset's factor 10 on fresh seeds (part 3).
# Start it twice for two streams: both take (part, seed) units from one queue (a unit is claimed by creating
# $OUT/claims/<part>-<seed>), in the protocol's order, so whatever has finished is a set of complete seeds.
# Each stream makes its own copy of the data ($DATA/stream-<pid>), so that two never write one folder.
# Then, per part: python -m examples.selection_study.confirm --unfreeze "$OUT/<part>".
# Outputs: $OUT/<part>/{runs,per_seed,comparison,facts,paired}.csv and the rest that compare writes; logs
# in $OUT/<part>.seed<seed>.log. SMOKE=1 runs the same plan at toy sizes.
set -eu
OUT=${OUT:-runs/unfreeze_settings}
DATA_BASE=${DATA:-data/unfreeze_settings}
DATA=$DATA_BASE/stream-$$
THREADS=${THREADS:-1}
PY=${PY:-python3}
mkdir -p "$OUT/claims"
SMALL=()
STEPS=()
PART13_SEEDS=(40 41 42 43 44)
PART3_SEEDS=(40 41 42 43 44 45 46 47)
if [ "${SMOKE:-0}" = 1 ]; then
  PART13_SEEDS=(40)
  PART3_SEEDS=(40 41)
  STEPS=(--steps 4)
  SMALL=(--synthetic-train 120 --synthetic-dev 40 --synthetic-test 40 --batch-size 32
         --embed-size 32 --word-dim 16)
fi
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS
git log -1 --format='commit %H %s' 2>/dev/null || true

flags() {  # the part's training flags
  case $1 in
    factor-0.01) echo --backbone-lr-factor 0.01 --reduction sum --grad-clip 2.0 ;;
    factor-1) echo --backbone-lr-factor 1 --reduction sum --grad-clip 2.0 ;;
    factor-10) echo ;;
  esac
}
losses() {  # the part's variants
  case $1 in
    factor-10) echo vse-infinity-full selhn ;;
    *) echo warmup vse-infinity-full selhn ;;
  esac
}
compare() {  # part, seeds... (COPIES: the other streams' data folders, for the tables)
  local part=$1
  shift
  # shellcheck disable=SC2046
  "$PY" -m examples.selection_study.compare --preset calibrated-unfreeze --root "$DATA" --out "$OUT/$part" \
    --losses $(losses "$part") --epsilons 0.05 --no-default-epsilon --threads "$THREADS" "${STEPS[@]}" \
    ${COPIES:+--data-copies $COPIES} --seeds "$@" -- $(flags "$part") "${SMALL[@]}"
}

units=()
for seed in "${PART13_SEEDS[@]}"; do units+=("factor-0.01 $seed"); done
for seed in "${PART3_SEEDS[@]}"; do units+=("factor-10 $seed"); done
for seed in "${PART13_SEEDS[@]}"; do units+=("factor-1 $seed"); done
for unit in "${units[@]}"; do
  read -r part seed <<< "$unit"
  mkdir "$OUT/claims/$part-$seed" 2>/dev/null || continue
  compare "$part" "$seed" > "$OUT/$part.seed$seed.log" 2>&1 || { echo "$part seed $seed failed"; exit 1; }
  touch "$OUT/claims/$part-$seed/done"
  echo "$(date -u +%H:%M:%S) $part seed $seed done"
done
# the tables of each part whose every seed has finished (the other stream may still be training one);
# the other stream's runs were trained on its own copy of the same data, checked byte for byte
COPIES=$(find "$DATA_BASE" -mindepth 1 -maxdepth 1 -type d -name 'stream-*' ! -path "$DATA" | tr '\n' ' ')
for part in factor-0.01 factor-10 factor-1; do
  seeds=("${PART13_SEEDS[@]}")
  [ "$part" = factor-10 ] && seeds=("${PART3_SEEDS[@]}")
  finished=true
  for seed in "${seeds[@]}"; do [ -e "$OUT/claims/$part-$seed/done" ] || finished=false; done
  if $finished; then
    compare "$part" "${seeds[@]}" > "$OUT/$part.log" 2>&1 && echo "$(date -u +%H:%M:%S) $part: tables written"
  fi
done
