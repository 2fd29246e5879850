#!/bin/bash
# GPU check after a change to the step path: CUDA tests, overhead, CIFAR-10 speed bars; then, with the
# time left before DEADLINE_S seconds, table runs (METHODS; DATASET:DATADIR:PROCS as in gpu_table.sh).
# usage: [METHODS="..."] [COMPILE_SPEED=1] benchmarks/scripts/gpu_check.sh DEADLINE_S [DATASET:DATADIR:PROCS ...]
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RLOPT_CACHE_DIR=/tmp/rlcache
export RLOPT_COMMIT=${RLOPT_COMMIT:-$(cat data/COMMIT 2>/dev/null)}  # run logs name the code (no .git travels)
mkdir -p $OUT/r
exec > >(tee $OUT/r/check.log) 2>&1  # the whole log comes back, not only the reply's tail
TEE=$!
trap 'exec >&- 2>&-; wait $TEE' EXIT  # let tee finish writing the log before the command returns
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -5
timeout 120 python3 -m benchmarks.overhead --out $OUT/r/overhead_gpu 2>&1 | tail -4
timeout 130 python3 -m benchmarks.speed --dataset cifar10 --data-dir data/cifar10-jpeg.tar.gz --methods sgd sam \
  --epochs 9 --out $OUT/r/speed_cifar10_gpu 2>&1 | grep -v "^  epoch"
if [ -n "$COMPILE_SPEED" ]; then  # the same bars with torch.compile'd model (compilation falls in epoch 1)
  timeout 200 python3 -m benchmarks.speed --dataset cifar10 --data-dir data/cifar10-jpeg.tar.gz --methods sgd sam \
    --epochs 9 --compile --out $OUT/r/speed_cifar10_gpu_compile 2>&1 | grep -v "^  epoch"
fi
# $OUT returns at most 8 files: the measurements go back as one archive (untar it in /tmp)
(cd $OUT/r && shopt -s nullglob && tar czf checks_$(date +%s).tgz check.log *.md *.json; rm -f *.md *.json)
B=$(( $1 - SECONDS - 60 ))
echo "table budget: $B s"
shift
if [ $B -gt 60 ] && [ $# -gt 0 ]; then bash benchmarks/scripts/gpu_table.sh $B "$@"; fi
