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

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .cli import parser, runs_path
from .data import load_dataset
from .train import CONVERGENCE_DEFINITION, METHODS, TrainConfig, environment, resolve_device, train

DEMO = dict(
    dataset="fmnist-subset",
    model="small-cnn",
    width=16,
    epochs=8,
    batch_size=128,
    lr=0.1,
    warmup_epochs=0.5,
    adam_lr=2e-3,
    interval=10,
    crop_pad=2,
)


#: one colour per name, the same in every panel: a method and the optimizer it is named after share one
COLOURS = {
    "sgd": "C0",
    "sam": "C1",
    "adamw": "C2",
    "adam": "C4",
    "ppo-sgd-sam-adamw": "C3",
    "ppo-sgd-sam": "C5",
    "dqn-sgd-sam": "C6",
    "ppo-sgd-sam-adam": "C8",
    "pre-sgd-sam": "C9",
    "pre-sgd-sam-adam": "C7",
}


def colour(name: str) -> str:
    """The colour of a method or optimizer choice (the default cycle for names not listed)."""
    return COLOURS.get(name, f"C{sum(map(ord, name)) % 10}")


def plot(out: Path, results: dict[str, dict[str, Any]]) -> Path:
    """demo.png: test accuracy and losses per method (top), the RL method's optimizer per step and its
    rewards (bottom). A final-decision reward (the end-of-run bonus) is marked and labelled, not
    plotted on the scale of the others, so it does not flatten them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rl = next((r for r in results.values() if r["decisions"]), None)
    fig, axes = plt.subplots(2 if rl is not None else 1, 2, figsize=(13, 8 if rl is not None else 4), squeeze=False)
    acc_ax, loss_ax = axes[0]
    for m, r in results.items():
        ep = [e["epoch"] for e in r["epochs"]]
        acc_ax.plot(ep, [100 * e["test_acc"] for e in r["epochs"]], color=colour(m), marker=".", label=m)
        loss_ax.plot(ep, [e["train_loss"] for e in r["epochs"]], color=colour(m), ls="--", lw=1)
        loss_ax.plot(ep, [e["val_loss"] for e in r["epochs"]], color=colour(m), marker=".", label=m)
    acc_ax.set(title="test accuracy (%)", xlabel="epoch")
    acc_ax.legend(fontsize=8, title="method", title_fontsize=8)
    loss_ax.set(title="loss per epoch", xlabel="epoch")
    handles = [Line2D([], [], color=colour(m), marker=".", label=m) for m in results]
    handles += [
        Line2D([], [], color="0.3", label="validation (solid)"),
        Line2D([], [], color="0.3", ls="--", lw=1, label="training (dashed)"),
    ]
    loss_ax.legend(handles=handles, fontsize=8)
    if rl is not None:
        name = rl["config"]["method"]
        ax = axes[1][0]
        names = sorted({s[2] for s in rl["choice_segments"]})
        for k, n in enumerate(names):
            ax.broken_barh(
                [(a, b - a) for a, b, c in rl["choice_segments"] if c == n], (k - 0.4, 0.8), color=colour(n), label=n
            )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names)
        ax.set(title=f"{name}: optimizer chosen at each step", xlabel="step")
        ax.legend(fontsize=8, loc="upper right", ncol=len(names))
        ax.set_ylim(-0.6, len(names) - 0.4 + 0.6)
        rax = axes[1][1]
        pts = [(d["step"], d["reward"], bool(d.get("final"))) for d in rl["decisions"] if d["reward"] is not None]
        inner = [(s, r) for s, r, f in pts if not f]
        finals = [(s, r) for s, r, f in pts if f]
        if inner:
            xs, ys = zip(*inner)
            rax.plot(xs, ys, color=colour(name), marker=".", lw=1, label="reward per decision")
            rax.axhline(0.0, color="0.5", lw=0.8)
            lo, hi = min(ys), max(ys)
            pad = 0.1 * (hi - lo or 1.0)
            rax.set_ylim(lo - pad, hi + 3 * pad)
            for s, r in finals:
                rax.annotate(
                    f"final reward {r:+.2f}\n(end-of-run bonus, off this scale)",
                    xy=(s, hi + 2 * pad),
                    ha="right",
                    va="center",
                    fontsize=8,
                    color=colour(name),
                    arrowprops=dict(arrowstyle="-", color=colour(name)),
                )
                rax.plot([s], [hi + 2 * pad], marker="^", color=colour(name), ls="")
            rax.legend(fontsize=8, loc="lower left")
        rax.set(title=f"{name}: reward of each decision", xlabel="step", ylabel="reward")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> dict[str, Any]:
    ap = parser("demo", __doc__.splitlines()[0])
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["ppo-sgd-sam-adamw", "sgd", "sam", "adamw"],
        help=f"methods to compare, any of: {', '.join(METHODS)}",
    )
    ap.add_argument("--epochs", type=int, default=DEMO["epochs"], help="training epochs per method")
    ap.add_argument(
        "--interval",
        default=DEMO["interval"],
        type=lambda s: s if s == "epoch" else int(s),
        help="RL decision interval: 'epoch' or N steps",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, data order and policy")
    ap.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cuda' or 'cpu'")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on CPU (default: half the cores, 1 to 4: "
        "oversubscribed OpenMP threads are much slower on a busy machine)",
    )
    ap.add_argument(
        "--out", default=str(runs_path("demo")), help="folder for demo.png, demo.md, demo.json and the run logs"
    )
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or max(1, min(4, (os.cpu_count() or 2) // 2)))
    out = Path(args.out)
    t0 = time.perf_counter()
    data = load_dataset("fmnist-subset")
    results: dict[str, dict[str, Any]] = {}
    for m in args.methods:
        cfg = TrainConfig(
            **{
                **DEMO,
                "epochs": args.epochs,
                "interval": args.interval,
                "method": m,
                "seed": args.seed,
                "device": args.device,
                "out_dir": str(out / "runs"),
            }
        )
        results[m] = train(cfg, data=data, progress=True, log=lambda s: None)
        s = results[m]["summary"]
        print(f"{m:>20s}: test acc {100 * s['final_test_acc']:.2f}%  ({s['train_seconds_total']:.1f}s)", flush=True)
    wall = time.perf_counter() - t0
    env = environment(device)
    rows: list[str] = [
        f"# Demo: {data.summary()}",
        "",
        f"- command: `{' '.join(['python -m benchmarks.demo'] + list(sys.argv[1:] if argv is None else argv))}`",
        f"- hardware: {env.get('gpu', env['cpu'])} ({env['device']}, {env['cpu_count']} cores, "
        f"{torch.get_num_threads()} torch threads), torch {env['torch']}; code: commit {env.get('commit', 'unknown')}",
        f"- small CNN, {args.epochs} epochs, batch {DEMO['batch_size']}, one seed ({args.seed}); "
        f"RL decisions every {args.interval} steps; total wall time {wall:.1f} s",
        f"- {CONVERGENCE_DEFINITION}",
        "",
        "| method | test acc % | macro F1 % | val acc % | convergence epoch | train s | grad evals "
        "| steps per optimizer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in results.items():
        s = r["summary"]
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(s["step_share"].items()))
        rows.append(
            f"| {m} | {100 * s['final_test_acc']:.2f} | {100 * s['final_test_f1']:.2f} | "
            f"{100 * s['final_val_acc']:.2f} | {s['convergence_epoch']} | {s['train_seconds_total']:.1f} | "
            f"{s['grad_evals']} | {share} |"
        )
    rows += ["", "One seed on a small subset: differences of a point or two are within seed-to-seed noise."]
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.md").write_text("\n".join(rows) + "\n")
    (out / "demo.json").write_text(json.dumps({m: r["summary"] for m, r in results.items()}, indent=1))
    fig = plot(out, results)
    print("\n".join(rows))
    print(f"\nwrote {fig}, {out / 'demo.md'}, {out / 'demo.json'} and {out / 'runs'}/; total {wall:.1f} s")
    return results


if __name__ == "__main__":
    main()
