#!/bin/bash
# A first GPU check: CUDA tests, speed, overhead, and a probe of 3 concurrent runs with and
# without CUDA MPS. Run from the repo root with the data in data/ (see benchmarks/README.md); writes into $OUT/r.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 RLOPT_CACHE_DIR=/tmp/rlcache
nvidia-smi -L
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name())"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -25
python3 -c "
from benchmarks.data import load_dataset
for n, d in (('cifar10', 'data/cifar10-jpeg.tar.gz'), ('fashion-mnist', 'data/fashion-mnist')):
    print(load_dataset(n, d, val_fraction=0.05).summary())"
mkdir -p $OUT/r
timeout 150 python3 -m benchmarks.speed --dataset cifar10 --data-dir data/cifar10-jpeg.tar.gz --methods sgd sam sam-last ppo-sgd-sam --epochs 4 --out $OUT/r/speed_cifar10_gpu 2>&1 | grep -v "^  epoch"
timeout 100 python3 -m benchmarks.speed --dataset fashion-mnist --data-dir data/fashion-mnist --methods sgd sam --epochs 4 --out $OUT/r/speed_fashion-mnist_gpu 2>&1 | grep -v "^  epoch"
timeout 150 python3 -m benchmarks.overhead --out $OUT/r/overhead_gpu 2>&1 | tail -12
probe() {
  for i in 0 1 2; do timeout 90 python3 -m benchmarks.train --dataset cifar10 --data-dir data/cifar10-jpeg.tar.gz --val-fraction 0.05 --method sgd --epochs 3 --seed $i --out-dir "" > /tmp/conc$1$i.log 2>&1 & done; wait
  grep -h "epoch   [23]/" /tmp/conc$1*.log
}
echo "== 3 concurrent processes, no MPS"; probe a
if nvidia-cuda-mps-control -d; then sleep 2; echo "== 3 concurrent processes, MPS"; probe b; echo quit | nvidia-cuda-mps-control; fi
tar czf $OUT/r/logs.tgz /tmp/conc*.log 2>/dev/null
ls $OUT/r
