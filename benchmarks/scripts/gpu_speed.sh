#!/bin/bash
# The speed study on one machine start: the GPU's clocks and the host, a profile of the plain
# ResNet-18 step (is it bound by the device or by the host launching kernels?), then
# benchmarks.speed for SGD and SAM in each variant (eager, torch.compile modes), REPEATS rotating
# rounds in one process (a round cut off by the time limit keeps the runs it finished). Everything
# comes back as one archive under $OUT/r. Run tests/test_cuda.py first: it checks the CUDA-graph path.
# usage: [VARIANTS="eager cuda-graph reduce-overhead"] [REPEATS=2] [EPOCHS=9] [PROFILE=1] [PAD_MODE=reflect] \
#        [DATASET=cifar10] [DATA=data/cifar10-jpeg.tar.gz] [EXTRA="more benchmarks.speed flags"] \
#        benchmarks/scripts/gpu_speed.sh
# (a dry run on a CPU, where cuda-graph cannot run: OUT=/tmp/o DATASET=fmnist-subset PROFILE=0 EPOCHS=2
#  REPEATS=1 VARIANTS="eager reduce-overhead" EXTRA="--model small-cnn --max-steps-per-epoch 2" \
#  bash benchmarks/scripts/gpu_speed.sh)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RLOPT_CACHE_DIR=/tmp/rlcache
export RLOPT_COMMIT=${RLOPT_COMMIT:-$(cat data/COMMIT 2>/dev/null)}  # run logs name the code (no .git travels)
export TORCH_LOGS=${TORCH_LOGS:-perf_hints,recompiles}  # why torch.compile skips CUDA graphs or recompiles
VARIANTS=${VARIANTS:-eager cuda-graph reduce-overhead}
REPEATS=${REPEATS:-2}  # 3 variants x 2 methods x 2 rounds of 9 epochs fit in one call
EPOCHS=${EPOCHS:-9}
mkdir -p $OUT/r
exec > >(tee $OUT/r/speed.log) 2>&1
TEE=$!
trap 'exec >&- 2>&-; wait $TEE' EXIT
clocks() {
  command -v nvidia-smi >/dev/null || { echo "no nvidia-smi"; return; }
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu,pstate --format=csv,noheader
}
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
lscpu | grep -E "Model name|^CPU\(s\)|MHz" ; uptime
echo "gpu before: $(clocks)"
if [ "${PROFILE:-1}" != 0 ]; then  # device time vs host time of 20 plain steps (footer of each table)
  timeout 120 python3 -m benchmarks.overhead --cases resnet18 --repeats 0 --block 50 --profile 20 \
    --out $OUT/r/step_profile 2>&1 | grep -E "^==|Self CPU time total|Self CUDA time total|operations per"
fi
PAD=${PAD_MODE:+--pad-mode $PAD_MODE}
DATASET=${DATASET:-cifar10}
DATA=${DATA:-data/cifar10-jpeg.tar.gz}
DATA_ARGS=""
[ "$DATASET" = fmnist-subset ] || DATA_ARGS="--data-dir $DATA"  # the embedded subset needs none
timeout $(( 560 - SECONDS )) python3 -m benchmarks.speed --dataset $DATASET $DATA_ARGS --methods sgd sam \
  --variants $VARIANTS --repeats $REPEATS --epochs $EPOCHS $PAD $EXTRA --out $OUT/r/speed_${DATASET}_gpu_${RLOPT_COMMIT:-local} 2>&1 | grep -v "^  epoch"
echo "gpu after: $(clocks)"
(cd $OUT/r && shopt -s nullglob && tar czf speed_$(date +%s).tgz speed.log *.md *.json; rm -f *.md *.json)
