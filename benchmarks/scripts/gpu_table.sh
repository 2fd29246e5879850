#!/bin/bash
# Table runs in pieces on one GPU: for each DATASET:DATADIR:PROCS, PROCS processes under CUDA MPS share
# the runs (--claim) and start none that would end after BUDGET_S seconds. Copy the runs folders back
# (untar $OUT/r/runs_*.tgz in the repo root) between calls, or finished runs are made again.
# usage: [METHODS="sgd sam ..."] [VAL=0.05] [SUFFIX=_full] [PAD=zeros] [EXTRA="--tag x ..."] [MPS=0] \
#        benchmarks/scripts/gpu_table.sh BUDGET_S DATASET:DATADIR:PROCS [...]
# VAL is the validation hold-out; SUFFIX names the results folder <dataset>_resnet18_e30<SUFFIX>
# (use one for any VAL other than 0.05, so the runs of the main tables are not replaced).
# MPS=0 leaves the MPS daemon alone: start it once yourself to run several of these side by side.
# PAD is the crop padding (default reflect, benchmarks.train's default): with reflect and no SUFFIX the
# folder is <dataset>_resnet18_e30_reflect, so the zero-padded main tables' runs are not mixed in;
# PAD=zeros adds to the main tables.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RLOPT_CACHE_DIR=/tmp/rlcache
export RLOPT_COMMIT=${RLOPT_COMMIT:-$(cat data/COMMIT 2>/dev/null)}  # run logs name the code (no .git travels)
if [ "${VAL:-0.05}" != 0.05 ] && [ -z "$SUFFIX" ]; then
  echo "VAL=$VAL needs a SUFFIX: the run names do not hold the hold-out, the main tables' runs would be replaced"; exit 2
fi
PAD=${PAD:-reflect}
if [ "$PAD" != zeros ] && [ -z "$SUFFIX" ]; then SUFFIX=_$PAD; fi
B=$1; shift
mkdir -p $OUT/r
[ "${MPS:-1}" = 0 ] || { nvidia-cuda-mps-control -d; sleep 1; }
for spec in "$@"; do
  IFS=: read -r D DD P <<< "$spec"
  R=benchmarks/results/${D}_resnet18_e30${SUFFIX}
  rm -f $R/runs/*.claim
  for i in $(seq 1 $P); do
    timeout $((B + 40)) python3 -m benchmarks.table --dataset $D --data-dir $DD --val-fraction ${VAL:-0.05} --epochs 30 \
      --seeds 3 --claim --time-budget $B --out $R --pad-mode $PAD ${METHODS:+--methods $METHODS} $EXTRA > /tmp/table_${D}${SUFFIX}_$i.log 2>&1 &
    sleep 2
  done
done
wait
[ "${MPS:-1}" = 0 ] || echo quit | nvidia-cuda-mps-control
LOGS=$(for spec in "$@"; do IFS=: read -r D DD P <<< "$spec"; echo /tmp/table_${D}${SUFFIX}_*.log; done)
grep -h "final test acc\|not started\|skipped\|Error\|error" $LOGS
tail -n 3 $LOGS > $OUT/r/table_logs${SUFFIX}.txt
for spec in "$@"; do
  IFS=: read -r D DD P <<< "$spec"
  R=benchmarks/results/${D}_resnet18_e30${SUFFIX}
  tar czf $OUT/r/runs_${D}${SUFFIX}_$(date +%s).tgz $R/runs
  echo "$D$SUFFIX: $(ls $R/runs/*.json | wc -l) runs"
done
