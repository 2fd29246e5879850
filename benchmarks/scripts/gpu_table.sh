#!/bin/bash
# A table run in pieces on one GPU: PROCS processes under CUDA MPS share the runs (--claim) and start
# none that would end after BUDGET_S seconds. Copy the runs folder back between calls.
# usage: METHODS="sgd sam ..." benchmarks/scripts/gpu_table.sh DATASET DATADIR PROCS BUDGET_S [speed]
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RLOPT_CACHE_DIR=/tmp/rlcache
D=$1; DD=$2; P=$3; B=$4
mkdir -p $OUT/r
if [ "$5" = speed ]; then
  timeout 120 python3 -m benchmarks.speed --dataset $D --data-dir $DD --methods sgd sam --epochs 4 --out $OUT/r/speed_${D}_gpu 2>&1 | grep -v "^  epoch"
fi
python3 -c "from benchmarks.data import load_dataset; print(load_dataset('$D', '$DD', val_fraction=0.05).summary())"
rm -f benchmarks/results/${D}_resnet18_e30/runs/*.claim
nvidia-cuda-mps-control -d; sleep 1
for i in $(seq 1 $P); do
  timeout $((B + 40)) python3 -m benchmarks.table --dataset $D --data-dir $DD --val-fraction 0.05 --epochs 30 --seeds 3 --claim --time-budget $B ${METHODS:+--methods $METHODS} > /tmp/table_$i.log 2>&1 &
  sleep 2
done
wait
echo quit | nvidia-cuda-mps-control
grep -h "final test acc\|not started\|skipped\|Error\|error" /tmp/table_*.log
tail -n 3 /tmp/table_*.log > $OUT/r/table_logs.txt
tar czf $OUT/r/runs_${D}_$(date +%s).tgz benchmarks/results/${D}_resnet18_e30/runs
ls benchmarks/results/${D}_resnet18_e30/runs | wc -l
