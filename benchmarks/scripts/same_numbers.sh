#!/bin/bash
# Do two commits train alike? Runs the same small CPU configs (embedded Fashion-MNIST subset, small CNN,
# 3 epochs, one thread) on worktrees of OLD and NEW (default HEAD), then compares every epoch's losses and
# accuracies and every decision (choice, reward, observation) for exact equality; exit status 1 if any differ.
# Use it before aggregating table runs made on two commits into one table.
# NEW_ARGS: flags for NEW's runs only, e.g. NEW_ARGS="--pad-mode zeros" against a commit from before reflect
# padding became the default (the older one pads with zeros and may not know the flag).
# usage: [NEW_ARGS="..."] benchmarks/scripts/same_numbers.sh OLD [NEW] [-- METHOD ...]
set -e
OLD=$1; NEW=HEAD; shift
if [ $# -gt 0 ] && [ "$1" != -- ]; then NEW=$1; shift; fi
[ "$1" = -- ] && shift
METHODS=${*:-"sgd sam adamw sam-last sam-every-k ppo-sgd-sam dqn-sgd-sam random-sgd-sam pre-sgd-sam ppo-sgd-sam-adam pre-sgd-sam-adam ppo-sgd-sam-adamw lr-dqn lr-dqn-online"}
HERE=$(git rev-parse --show-toplevel)
TMP=$(mktemp -d)
trap 'git -C "$HERE" worktree remove --force "$TMP/old" 2>/dev/null; git -C "$HERE" worktree remove --force "$TMP/new" 2>/dev/null; rm -rf "$TMP"' EXIT
git -C "$HERE" worktree add -q --detach "$TMP/old" "$OLD"
git -C "$HERE" worktree add -q --detach "$TMP/new" "$NEW"
echo "old $(git -C "$TMP/old" rev-parse --short HEAD), new $(git -C "$TMP/new" rev-parse --short HEAD)"
for side in old new; do
  EXTRA=; [ $side = new ] && EXTRA=$NEW_ARGS
  for m in $METHODS; do
    (cd "$TMP/$side" && PYTHONPATH="$TMP/$side" python -m benchmarks.train --dataset fmnist-subset --model small-cnn \
      --method "$m" --epochs 3 --seed 1 --threads 1 --val-fraction 0.1 --sam-share 0.5 \
      --out-dir "$TMP/out_$side" $EXTRA > /dev/null)
  done
done
python - "$TMP/out_old" "$TMP/out_new" $METHODS <<'PY'
import json, sys
from pathlib import Path
old, new, methods = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
def key(run):
    return ([{k: v for k, v in e.items() if not k.endswith("seconds")} for e in run["epochs"]],
            [(d["choice"], d["reward"], d.get("observation")) for d in run["decisions"]])
differ = 0
for m in methods:
    pattern = f"fmnist-subset_small-cnn_{m}_e3_s1*.json"  # a padding suffix where a commit pads by reflection
    a, b = (next(iter(sorted(d.glob(pattern)))) for d in (old, new))
    same = key(json.loads(a.read_text())) == key(json.loads(b.read_text()))
    differ += not same
    print(f"{m}: {'identical' if same else 'DIFFERENT'}")
sys.exit(1 if differ else 0)
PY
