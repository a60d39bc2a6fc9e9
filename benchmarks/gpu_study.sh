#!/usr/bin/env bash
# The GPU run of issues 14 (item 5) and 18, as one prepared command for a lent GPU machine:
#   flickr: the paper's configuration at Flickr30K size (29,000 / 1,014 / 1,000 images, 36 x 2048
#           regions), 3 epochs, hn / warmup / selhn (seed 0), dev every 200 steps;
#   study:  the rule study (examples/selection_study/study.py: selection on seeds 0-4, the mechanical choice,
#           the held-out confirmation), fp32, in a pool of worker processes;
#   cuda:   tests/test_cuda.py.
# The three tracks run side by side. At DEADLINE seconds every track is stopped and whatever finished
# is packed; the archives are also refreshed every minute, so a run cut short still returns its data.
# Outputs (at most 8 files, as the device tool returns them): $OUT/log.txt, $OUT/results.tgz.
# SMOKE=1 runs the same tracks at toy sizes (a check of the script on a CPU machine); TRACKS="flickr"
# (or any subset of "flickr study cuda") runs only those.
# Measured on the lease of 2026-11-30 (H200, 16 CPU cores): side by side, the tracks compete for the
# CPU cores, not the GPU. The study ran about 11 runs a minute with 11 workers (15 a minute alone
# with 15); the Flickr30K-size runs slowed to about 2 steps a second each and finished one epoch of
# three in 535 s. Give the Flickr track a lease of its own (TRACKS=flickr, DEADLINE=560).
set -u
OUT=${OUT:-runs/gpu_study}
DEADLINE=${DEADLINE:-540}
WORK=${WORK:-/tmp/gpu_study}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PY:-python3}
JOBS=${JOBS:-10}
FLICKR=(--synthetic-train 29000 --synthetic-dev 1014 --synthetic-test 1000 --epochs 3 --workers 3)
TOY=()
if [ "${SMOKE:-0}" = 1 ]; then
  FLICKR=(--synthetic-train 300 --synthetic-dev 40 --synthetic-test 40 --epochs 1 --max-steps 4 --embed-size 32
          --word-dim 16 --synthetic-regions 6 --synthetic-dim 32 --workers 1)
  TOY=(-- --max-steps 4 --synthetic-train 120 --synthetic-dev 40 --synthetic-test 40 --batch-size 32
       --embed-size 32 --word-dim 16)
  JOBS=2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
git log -1 --format='commit %H %s' 2>/dev/null
pack() {
  tar czf "$OUT/results.tgz.part" -C "$WORK" --exclude='*.pth' --exclude='*.npy' --exclude='tensorboard' \
    --exclude='data' . 2>/dev/null && mv "$OUT/results.tgz.part" "$OUT/results.tgz"
}
TRACKS=${TRACKS:-flickr study cuda}
track() {  # name, command...: runs in the background, its output in $WORK/<name>.log
  local name=$1
  shift
  case " $TRACKS " in *" $name "*) ;; *) echo "== $name: skipped (not in TRACKS)"; return ;; esac
  ( start=$SECONDS; timeout -k 10 $((DEADLINE - 20)) "$@" > "$WORK/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s" ) &
  PIDS+=($!)
}
PIDS=()
track flickr "$PY" -m examples.selection_study.compare --out "$WORK/flickr" --root "$WORK/data/f30k" --preset paper \
  --seeds 0 --losses hn warmup selhn --epsilons --eval-steps 200 --log-every 20 --jobs 3 --threads 2 -- "${FLICKR[@]}"
track study nice -n 5 "$PY" -m examples.selection_study.study --out "$WORK/study" --data "$WORK/data/study" --jobs "$JOBS" \
  "${TOY[@]}"
track cuda nice -n 10 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
running() { for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
while running && [ $SECONDS -lt "$DEADLINE" ]; do
  sleep 5
  if [ $((SECONDS % 60)) -lt 5 ]; then
    pack
    echo "-- $SECONDS s: $(find "$WORK" -name results.json | wc -l) runs finished"
  fi
done
[ ${#PIDS[@]} -gt 0 ] && kill "${PIDS[@]}" 2>/dev/null
pack
for name in $TRACKS; do echo "==== $name.log (tail)"; tail -n 40 "$WORK/$name.log"; done
cat "$WORK/study/choice.json" "$WORK/study/verdict.json" 2>/dev/null
echo "total $SECONDS s"
