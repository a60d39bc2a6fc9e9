#!/usr/bin/env bash
# The GPU checks of the issues, as one prepared run for a lent GPU machine (see CONTRIBUTING):
#   1. the test suite's CUDA tests and the loss tests;
#   2. the loss benchmark at B = 4096 and 16384, fp32 and bf16;
#   2b. the low-rank and sparse forms against the dense form (their thresholds come from a CPU);
#   2c. the distributed loss's per-rank share (EmbeddingLoss) against plain autograd;
#   3. a Flickr30K-size synthetic set (29,000 / 1,014 / 1,000 images, 36 x 2048 regions);
#   4. training throughput (images/s) with AMP, --loss selhn and --loss hn side by side;
#   5. evaluation of a 5,000 x 25,000 problem;
#   6. the comparison of the four losses at batch 128 on that set (one seed).
# Every stage has its own time limit; all output goes to $OUT/log.txt, so one failure loses one stage.
# STAGES="tests bench forms distributed" runs only the named stages (these loss checks took 3.6
# minutes on an H200).
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
STEPS=${STEPS:-400}
STAGES=${STAGES:-tests bench forms distributed data throughput eval compare}
stage() {
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  case " $STAGES " in *" $name "*) ;; *) echo "== $name: skipped (not in STAGES)"; return ;; esac
  echo "== $name"
  timeout "$limit" "$@"
  echo "== $name: exit $? after $((SECONDS - start)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
stage tests 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_core.py tests/test_functional.py tests/test_losses.py
stage bench 130 bash -c "python3 benchmarks/bench_losses.py --device cuda --sizes 4096 16384 --rounds 10 --min-seconds 2 --dtype float32 && python3 benchmarks/bench_losses.py --device cuda --sizes 4096 16384 --rounds 10 --min-seconds 2 --dtype bfloat16"
stage forms 90 python3 benchmarks/bench_forms.py --device cuda --sizes 4096 16384 --rounds 5
stage distributed 60 bash -c "python3 benchmarks/bench_distributed.py --device cuda --local 1024 --candidates 8192 && python3 benchmarks/bench_distributed.py --device cuda --local 4096 --candidates 32768"
stage data 120 python3 -m examples.rvsepp.synthetic --root /tmp/data --train 29000 --dev 1014 --test 1000
FLICKR=(--synthetic-train 29000 --synthetic-dev 1014 --synthetic-test 1000)
common=(--preset paper --root /tmp/data --max-steps 200 --no-eval-test --tensorboard off --workers 8 --log-every 50 ${FLICKR[*]})
stage throughput 100 bash -c "for loss in selhn hn; do python3 -m examples.rvsepp.train ${common[*]} --loss \$loss --out /tmp/tp_\$loss > /dev/null && python3 -c \"import json; r = json.load(open('/tmp/tp_\$loss/results.json')); print('\$loss', round(128 / r['step_seconds']), 'images/s (median step', round(1000 * r['step_seconds'], 1), 'ms)')\"; done"
stage eval 40 python3 benchmarks/eval_scale.py --images 5000 --device cuda
stage compare 170 python3 -m examples.selection_study.compare --out "$OUT/compare" --root /tmp/data --preset paper --seeds 0 --epsilons --steps "$STEPS" --eval-steps 100 --log-every 10 -- --workers 8 ${FLICKR[*]}
cp "$OUT"/compare/comparison.md "$OUT"/compare/comparison.png "$OUT"/compare/dev.csv "$OUT"/ 2>/dev/null
rm -rf "$OUT/compare"
