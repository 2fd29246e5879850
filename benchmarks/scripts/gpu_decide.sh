#!/bin/bash
# The deciding experiment (benchmarks/decide.py) on one GPU, one call: WORKERS processes under CUDA MPS
# share the runs of DATASET (SGD, SAM and the budgeted arms, SEEDS seeds, label noise NOISE), none
# started that is not expected to end BUDGET_S seconds after the start; runs already logged in
# benchmarks/results/decide/<DATASET>/runs/ are not made again. The logs come back in
# $OUT/r/runs_<DATASET>.tgz, packed every minute as well, so a call cut short returns what finished:
# untar it in the repository root and commit before the next call. Then the paired table.
# PREFLIGHT=1 first runs the pipeline for 3 epochs of 4 steps on 4,000 images (CUDA graphs, checkpoints,
# branching) and stops if that fails: for the first call on a new commit.
# FAST="" runs without --cuda-graph (EXTRA="--device cpu ...": the script itself on a CPU).
# usage: [WORKERS=4] [SEEDS=5] [NOISE="0 0.4"] [LEARNED=name] [EXTRA="--flag ..."] [MPS=0] [PREFLIGHT=1] \
#        benchmarks/scripts/gpu_decide.sh BUDGET_S DATASET:DATADIR
# BUDGET_S counts from the script's start. Keep BUDGET_S + 90 under the call's limit: a run still under
# way 60 s after the budget is stopped and lost.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RLOPT_CACHE_DIR=/tmp/rlcache
export RLOPT_COMMIT=${RLOPT_COMMIT:-$(cat data/COMMIT 2>/dev/null)}  # run logs name the code (no .git travels)
B=$1
IFS=: read -r D DD <<< "$2"
R=benchmarks/results/decide/$D
mkdir -p $OUT/r $R/runs
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader 2>&1 | head -n 2
echo "before: $(ls $R/runs/*.json 2>/dev/null | wc -l) runs in $R/runs"
pack() {  # the run logs, written whole (a .tgz in $OUT is never half a file)
  tar czf $OUT/r/.runs.tgz $R/runs/*.json 2>/dev/null && mv $OUT/r/.runs.tgz $OUT/r/runs_$D.tgz
}
[ "${MPS:-1}" = 0 ] || { nvidia-cuda-mps-control -d; sleep 1; }
if [ -n "$PREFLIGHT" ]; then  # the whole pipeline for 3 epochs of 4 steps on the GPU: stop here if it fails
  timeout 150 python3 -m benchmarks.decide run --dataset $D --data-dir $DD $EXTRA --out /tmp/preflight/$D \
    --checkpoint-dir /tmp/preflight/ckpt ${FAST---cuda-graph} --seeds 1 --noise 0.4 --workers 2 --epochs 3 \
    --max-steps-per-epoch 4 --max-train 4000 --max-test 1000 --interval 1 --warmup-epochs 0.5 \
    ${LEARNED:+--learned $LEARNED} > $OUT/r/preflight_$D.log 2>&1
  if ! tail -n 1 $OUT/r/preflight_$D.log | grep -q " done$"; then
    echo "preflight failed:"; tail -n 30 $OUT/r/preflight_$D.log
    [ "${MPS:-1}" = 0 ] || echo quit | nvidia-cuda-mps-control
    exit 1
  fi
  echo "preflight: $(tail -n 1 $OUT/r/preflight_$D.log)"
fi
B=$(( B - SECONDS ))  # the budget counts from the script's start: the preflight's time comes off it
echo "run budget: $B s"
( while sleep 60; do pack; done ) &
PACKER=$!
timeout $((B + 60)) python3 -m benchmarks.decide run --dataset $D --data-dir $DD --out $R ${FAST---cuda-graph} \
  --seeds ${SEEDS:-5} --noise ${NOISE:-0 0.4} --workers ${WORKERS:-4} --time-budget $B \
  ${LEARNED:+--learned $LEARNED} $EXTRA > $OUT/r/decide_$D.log 2>&1
echo "driver exit status $?"
kill $PACKER 2>/dev/null
[ "${MPS:-1}" = 0 ] || echo quit | nvidia-cuda-mps-control
pack
grep -v "  epoch" $OUT/r/decide_$D.log | grep -v "| RLSwitchingOptimizer" | tail -n 40
timeout 60 python3 -m benchmarks.decide analyse --out $R > /dev/null 2>&1 && cp $R/table.md $OUT/r/table_$D.md
echo "after: $(ls $R/runs/*.json | wc -l) runs in $R/runs"
