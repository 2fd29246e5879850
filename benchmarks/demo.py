"""Demo: RLSwitchingOptimizer against static optimizers on the embedded Fashion-MNIST subset.

``python -m benchmarks.demo`` trains a small CNN (width 16, about 12k parameters) on 4,500 real
Fashion-MNIST images (the subset shipped in ``benchmarks/data/``, no download) with

- ``ppo-sgd-sam-adamw``: RLSwitchingOptimizer, a PPO policy choosing among SGD, SAM and AdamW every
  ``--interval`` steps, learning online from the validation signal;
- the static baselines ``sgd``, ``sam`` and ``adamw``, same model, schedule and data order;

then prints a comparison table and saves a figure (curves + the optimizer-choice timeline).
Under three minutes on a 2-core CPU with the defaults. It is a demonstration of the mechanics on a
small problem, not evidence about which optimizer is better: one seed, a few epochs, a small model.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from .data import load_dataset
from .train import CONVERGENCE_DEFINITION, METHODS, TrainConfig, environment, resolve_device, train

DEMO = dict(dataset="fmnist-subset", model="small-cnn", width=16, epochs=8, batch_size=128, lr=0.1,
            warmup_epochs=0.5, adam_lr=2e-3, interval=10, crop_pad=2)


def plot(out: Path, results: Dict[str, Dict[str, Any]]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (m, r) in enumerate(results.items()):
        ep = [e["epoch"] for e in r["epochs"]]
        axes[0].plot(ep, [100 * e["test_acc"] for e in r["epochs"]], color=f"C{i}", marker=".", label=m)
        axes[1].plot(ep, [e["train_loss"] for e in r["epochs"]], color=f"C{i}", ls="--", lw=1)
        axes[1].plot(ep, [e["val_loss"] for e in r["epochs"]], color=f"C{i}", label=m)
    axes[0].set(title="test accuracy (%)", xlabel="epoch")
    axes[1].set(title="validation loss (dashed: train loss)", xlabel="epoch")
    axes[0].legend(fontsize=8)
    rl = next((r for r in results.values() if r["decisions"]), None)
    if rl is not None:
        ax = axes[2]
        names = sorted({s[2] for s in rl["choice_segments"]})
        for k, n in enumerate(names):
            ax.broken_barh([(a, b - a) for a, b, c in rl["choice_segments"] if c == n], (k - 0.4, 0.8), color=f"C{k}")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax2 = ax.twinx()
        pts = [(d["step"], d["reward"]) for d in rl["decisions"] if d["reward"] is not None]
        if pts:
            ax2.plot(*zip(*pts), color="k", lw=0.8, alpha=0.6)
            ax2.set_ylabel("reward (black)")
        ax.set(title=f"{rl['config']['method']}: optimizer per step", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["ppo-sgd-sam-adamw", "sgd", "sam", "adamw"],
                    help=f"methods to compare: {', '.join(METHODS)}")
    ap.add_argument("--epochs", type=int, default=DEMO["epochs"])
    ap.add_argument("--interval", default=DEMO["interval"], type=lambda s: s if s == "epoch" else int(s),
                    help="RL decision interval: 'epoch' or N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: half the cores, 1 to 4: "
                    "oversubscribed OpenMP threads are much slower on a busy machine)")
    ap.add_argument("--out", default="benchmarks/runs/demo", help="folder for demo.png, demo.md and the run logs")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, min(4, (os.cpu_count() or 2) // 2)))
    out = Path(args.out)
    t0 = time.perf_counter()
    data = load_dataset("fmnist-subset")
    results: Dict[str, Dict[str, Any]] = {}
    for m in args.methods:
        cfg = TrainConfig(**{**DEMO, "epochs": args.epochs, "interval": args.interval, "method": m, "seed": args.seed,
                             "device": args.device, "out_dir": str(out / "runs")})
        results[m] = train(cfg, data=data, progress=True, log=lambda s: None)
        s = results[m]["summary"]
        print(f"{m:>20s}: test acc {100 * s['final_test_acc']:.2f}%  ({s['train_seconds_total']:.1f}s)", flush=True)
    wall = time.perf_counter() - t0
    env = environment(device)
    rows: List[str] = [
        f"# Demo: {data.summary()}", "",
        f"- command: `{' '.join(['python -m benchmarks.demo'] + list(sys.argv[1:] if argv is None else argv))}`",
        f"- hardware: {env.get('gpu', env['cpu'])} ({env['device']}, {env['cpu_count']} cores, "
        f"{torch.get_num_threads()} torch threads), torch {env['torch']}",
        f"- small CNN, {args.epochs} epochs, batch {DEMO['batch_size']}, one seed ({args.seed}); "
        f"RL decisions every {args.interval} steps; total wall time {wall:.1f} s",
        f"- {CONVERGENCE_DEFINITION}", "",
        "| method | test acc % | macro F1 % | val acc % | convergence epoch | train s | grad evals | steps per optimizer |",
        "|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        s = r["summary"]
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(s["step_share"].items()))
        rows.append(f"| {m} | {100 * s['final_test_acc']:.2f} | {100 * s['final_test_f1']:.2f} | "
                    f"{100 * s['final_val_acc']:.2f} | {s['convergence_epoch']} | {s['train_seconds_total']:.1f} | "
                    f"{s['grad_evals']} | {share} |")
    rows += ["", "One seed on a small subset: differences of a point or two are within seed-to-seed noise."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.md").write_text("\n".join(rows) + "\n")
    (out / "demo.json").write_text(json.dumps({m: r["summary"] for m, r in results.items()}, indent=1))
    fig = plot(out, results)
    print("\n".join(rows))
    print(f"\nsaved {fig}, {out / 'demo.md'}; total {wall:.1f} s")
    return results


if __name__ == "__main__":
    main()
