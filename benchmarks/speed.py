"""Speed bars: seconds per training epoch of SGD and SAM (and any other method) on the benchmark.

``python -m benchmarks.speed --dataset cifar10 --data-dir data/cifar10-jpeg.tar.gz``

Each method trains alone, in this one process, with the benchmark's settings (ResNet-18 CIFAR stem,
batch 512, bf16 autocast, channels_last, data and augmentation on the GPU) on the whole training
set (``--val-fraction 0``: 50,000 CIFAR-10 images per epoch, as the reference script). The figure
per method is the median training time of epochs 2..E: epoch 1 holds cuDNN's autotuning and the
lazy allocations. Evaluation is timed apart and not counted.

Bars (issue 3, CIFAR-10 on one H100): SGD at most 1.0 s per epoch, SAM at most 2.05x SGD. Other
data sets or devices: figures are reported, bars not applied.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List

from .data import load_dataset
from .train import METHODS, TrainConfig, environment, resolve_device, train

SGD_BAR_S = 1.0
SAM_RATIO_BAR = 2.05


def measure(methods: List[str], base: TrainConfig, log=print) -> Dict[str, Any]:
    data = load_dataset(base.dataset, base.data_dir, base.download, base.val_fraction, seed=0,
                        cache_dir=base.cache_dir)
    rows = {}
    for m in methods:
        cfg = TrainConfig(**{**base.__dict__, "method": m, "out_dir": None})
        run = train(cfg, data=data, log=log)
        secs = [e["train_seconds"] for e in run["epochs"]]
        timed = secs[1:] if len(secs) > 1 else secs
        rows[m] = {"median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed),
                   "first_epoch_s": secs[0], "all_s": secs,
                   "eval_s_median": statistics.median(e["eval_seconds"] for e in run["epochs"]),
                   "steps_per_epoch": run["summary"]["steps"] // cfg.epochs,
                   "grad_evals": run["summary"]["grad_evals"]}
    return {"rows": rows, "data": data.summary(), "environment": run["environment"]}


def bars(result: Dict[str, Any], dataset: str) -> Dict[str, Any]:
    rows, env = result["rows"], result["environment"]
    applicable = dataset == "cifar10" and "H100" in env.get("gpu", "")
    out: Dict[str, Any] = {"applicable": applicable}
    if "sgd" in rows:
        out["sgd_s"] = rows["sgd"]["median_s"]
        out["sgd_ok"] = out["sgd_s"] <= SGD_BAR_S
    if "sgd" in rows and "sam" in rows:
        out["sam_ratio"] = rows["sam"]["median_s"] / rows["sgd"]["median_s"]
        out["sam_ok"] = out["sam_ratio"] <= SAM_RATIO_BAR
    return out


def to_markdown(result: Dict[str, Any], b: Dict[str, Any], command: str, epochs: int) -> str:
    env, rows = result["environment"], result["rows"]
    sgd = rows.get("sgd", {}).get("median_s")
    lines = ["# Training speed per epoch", "",
             f"- command: `{command}`",
             f"- hardware: {env.get('gpu', env['cpu'])} ({env['device']}, {env['cpu_count']} CPU cores); "
             f"torch {env['torch']}, torchvision {env.get('torchvision', '?')}",
             f"- data: {result['data']}",
             f"- {epochs} epochs per method, each method alone on the device; figure: median training seconds of "
             f"epochs 2..{epochs} (epoch 1 holds cuDNN autotuning), evaluation excluded", ""]
    lines += ["| method | s/epoch (median) | min-max | x SGD | first epoch s | eval s | steps/epoch |",
              "|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        ratio = f"{r['median_s'] / sgd:.2f}" if sgd else "-"
        lines.append(f"| {m} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {ratio} | "
                     f"{r['first_epoch_s']:.2f} | {r['eval_s_median']:.3f} | {r['steps_per_epoch']} |")
    lines.append("")
    if b["applicable"]:
        if "sgd_ok" in b:
            lines.append(f"- bar: SGD epoch <= {SGD_BAR_S} s: **{'met' if b['sgd_ok'] else 'NOT met'}** "
                         f"({b['sgd_s']:.3f} s)")
        if "sam_ok" in b:
            lines.append(f"- bar: SAM <= {SAM_RATIO_BAR}x SGD: **{'met' if b['sam_ok'] else 'NOT met'}** "
                         f"({b['sam_ratio']:.2f}x)")
    else:
        lines.append("- bars (CIFAR-10 on one H100) not applicable to this run: figures reported only")
    lines.append("- reference (plain PyTorch script, ../shared/data/README.md, H100): SGD 0.95-1.06 s, SAM 1.89-2.16 s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict[str, Any]:
    from .train import add_config_args, config_from_args

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["sgd", "sam"], choices=list(METHODS))
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/speed_<dataset>_<device>)")
    add_config_args(ap, skip=("method", "out_dir", "epochs", "val_fraction"))
    ap.add_argument("--epochs", type=int, default=4, help="epochs per method (default 4; epoch 1 is not counted)")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="held-out share (default 0: all training images)")
    args = ap.parse_args(argv)
    base = config_from_args(args, method=args.methods[0], out_dir=None)
    result = measure(args.methods, base)
    b = bars(result, base.dataset)
    command = "python -m benchmarks.speed " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    dev = "gpu" if resolve_device(base.device).type == "cuda" else "cpu"
    stem = Path(args.out or f"benchmarks/results/speed_{base.dataset}_{dev}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    md = to_markdown(result, b, command, base.epochs)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "bars": b, **result}, indent=1))
    print(md)
    return {"bars": b, **result}


if __name__ == "__main__":
    main()
