"""QLearningRateOptimizer against hand-made learning-rate schedules on a small CNN on Fashion-MNIST.

Every method trains the same model from the same initialisation with SGD (momentum 0.9,
weight decay 5e-4) for the same number of steps; only the learning rate differs:

* ``constant``: lr fixed.
* ``step``: lr x 0.1 after 50% and 75% of the epochs (MultiStepLR).
* ``cosine``: cosine annealing to 0 over all steps (CosineAnnealingLR, stepped every batch).
* ``plateau``: ReduceLROnPlateau on the validation loss (factor 0.5, patience 0), per epoch.
* ``agent-<reward>``: QLearningRateOptimizer(policy="dqn", control=("lr",)), deciding every
  ``interval`` steps, learning online from scratch within the run, one run per reward.

Writes into ``--out`` (default the git-ignored ``benchmarks/runs/lr_control/``) the table
``lr_control.md``, the agent's learning-rate trajectories ``lr_control_lr.png`` and the raw runs
``lr_control.json``; the committed study is in ``benchmarks/results/lr_control/``.

    python -m benchmarks.lr_control --data-dir <Fashion-MNIST folder>   # the full benchmark (3 seeds)
    python -m benchmarks.lr_control --smoke                              # a few seconds, nothing written
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cli import fail, missing_data_message, parser, runs_path
from benchmarks.data import MissingDataError, iterate_batches, load_dataset, normalize
from rlopt import QLearningRateOptimizer
from rlopt.rewards import InverseDistanceReward, LogImprovementReward

METHODS = ("constant", "step", "cosine", "plateau", "agent-log_improvement", "agent-inverse_distance")


@dataclass
class Config:
    data_dir: Optional[str] = None
    """Folder with Fashion-MNIST (idx .gz files or the torchvision layout); None: $RLOPT_DATA_DIR or data/ at
    the repository root."""
    download: bool = False
    """Let torchvision download Fashion-MNIST when data_dir holds none."""
    max_train: int = 15000
    """Training images (stratified subset, before the 10% validation split)."""
    epochs: int = 5
    batch_size: int = 128
    lr: float = 0.05
    """Initial (and constant) learning rate of every method."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    interval: int = 10
    """Agent decision interval (steps)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    threads: int = 1
    """torch CPU threads (1: on shared cores, more threads ran up to 8x slower here)."""
    methods: tuple[str, ...] = METHODS


class SmallCNN(nn.Module):
    """conv(1->16) pool conv(16->32) pool linear(32*7*7 -> 10): 20 k parameters."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@torch.no_grad()
def evaluate(model, x, y, batch: int = 1000) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch):
        out = model(x[i : i + batch])
        loss += float(F.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(1) == y[i : i + batch]).sum())
    model.train()
    return loss / len(y), correct / len(y)


def run(method: str, seed: int, cfg: Config, data) -> dict:
    torch.manual_seed(seed)
    model = SmallCNN()
    params = model.parameters()
    steps_per_epoch = math.ceil(len(data["train_y"]) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    sched, plateau = None, False
    if method.startswith("agent-"):
        reward = {"log_improvement": LogImprovementReward(wd=0.0), "inverse_distance": InverseDistanceReward(wd=0.0)}[
            method.split("-", 1)[1]
        ]
        opt = QLearningRateOptimizer(
            params,
            base="sgd",
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.momentum,
            control=("lr",),
            policy="dqn",
            interval=cfg.interval,
            seed=seed,
            total_steps=total,
            reward=reward,
        )
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        if method == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(
                opt, [cfg.epochs // 2 * steps_per_epoch, (3 * cfg.epochs) // 4 * steps_per_epoch], 0.1
            )
        elif method == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        elif method == "plateau":
            sched, plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0), True
        elif method != "constant":
            raise ValueError(f"Unknown method {method!r}")
    gen = torch.Generator().manual_seed(1000 + seed)
    lrs: list[tuple[int, float]] = []
    epochs_log = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        loss_sum = torch.zeros(())
        n = 0
        for xb, yb in iterate_batches(data["train_x"], data["train_y"], cfg.batch_size, shuffle=True, generator=gen):

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            lrs.append((step, opt.lr if isinstance(opt, QLearningRateOptimizer) else opt.param_groups[0]["lr"]))
            loss = opt.step(closure)
            loss_sum += loss.detach()
            n += 1
            step += 1
            if sched is not None and not plateau:
                sched.step()
        val_loss, val_acc = evaluate(model, data["val_x"], data["val_y"])
        if plateau:
            sched.step(val_loss)
        if isinstance(opt, QLearningRateOptimizer):
            opt.epoch_end(val_loss=val_loss, val_acc=val_acc)
        epochs_log.append(
            {"epoch": epoch + 1, "train_loss": float(loss_sum) / n, "val_loss": val_loss, "val_acc": val_acc}
        )
    wall = time.perf_counter() - t0
    test_loss, test_acc = evaluate(model, data["test_x"], data["test_y"])
    out = {
        "method": method,
        "seed": seed,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "final_train_loss": epochs_log[-1]["train_loss"],
        "wall_s": wall,
        "epochs": epochs_log,
        "lrs": lrs,
    }
    if isinstance(opt, QLearningRateOptimizer):
        out["choices"] = [h["choice"] for h in opt.history]
        out["rewards"] = [h["reward"] for h in opt.history]
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def write_report(cfg: Config, runs: list[dict], command: str, data_summary: str, total_wall: float) -> str:
    rows = []
    for m in cfg.methods:
        rs = [r for r in runs if r["method"] == m]
        acc = mean_std([100 * r["test_acc"] for r in rs])
        tl = mean_std([r["final_train_loss"] for r in rs])
        wall = mean_std([r["wall_s"] for r in rs])
        rows.append((m, acc, tl, wall))
    best = max(rows, key=lambda r: r[1][0])
    agents = [r for r in rows if r[0].startswith("agent-")]
    chosen = max(agents, key=lambda r: (r[1][0], -r[2][0])) if agents else None
    lines = [
        "# QLearningRateOptimizer vs learning-rate schedules (Fashion-MNIST, small CNN)",
        "",
        f"- Command: `{command}`",
        f"- Hardware: {cpu_name()}, {cfg.threads} torch thread(s), {os.cpu_count()} cores shared with other jobs "
        f"(wall times are indicative only); torch {torch.__version__}, Python {platform.python_version()}",
        f"- Data: {data_summary}",
        f"- Model: SmallCNN (conv16-pool-conv32-pool-linear, {sum(p.numel() for p in SmallCNN().parameters())} "
        f"parameters); SGD momentum {cfg.momentum}, weight decay {cfg.weight_decay}, batch {cfg.batch_size}, "
        f"initial lr {cfg.lr}, {cfg.epochs} epochs, no augmentation",
        f"- Seeds: {list(cfg.seeds)} (model init and data order; the agent's policy is seeded with the same "
        "seed and learns online from scratch in each run)",
        f"- Agent: `QLearningRateOptimizer(base='sgd', control=('lr',), policy='dqn', interval={cfg.interval})`, "
        "actions keep / halve / reset, lr factor in [2^-10, 1]",
        f"- Total wall time of the benchmark: {total_wall / 60:.1f} min",
        "",
        "| method | test accuracy (%) | final train loss | wall time per run (s) |",
        "|---|---|---|---|",
    ]
    for m, acc, tl, wall in rows:
        lines.append(
            f"| {m} | {acc[0]:.2f} ± {acc[1]:.2f} | {tl[0]:.4f} ± {tl[1]:.4f} | {wall[0]:.1f} ± {wall[1]:.1f} |"
        )
    lines += [
        "",
        "Mean ± sample standard deviation over the seeds. Final train loss: mean mini-batch loss of the "
        "last epoch. Test accuracy: the full 10 000-image test set after the last epoch.",
        "",
        f"Best mean test accuracy: **{best[0]}** ({best[1][0]:.2f} %).",
    ]
    if chosen is not None:
        lines.append(f"Better agent reward (higher mean test accuracy, ties by train loss): **{chosen[0]}**.")
    lines += ["", "Learning-rate trajectories of the agent: `lr_control_lr.png`.", ""]
    return "\n".join(lines)


def plot(runs: list[dict], cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = [m for m in cfg.methods if m.startswith("agent-")]
    fig, axes = plt.subplots(1, max(1, len(agents)), figsize=(6 * max(1, len(agents)), 3.8), squeeze=False)
    for ax, m in zip(axes[0], agents):
        for r in runs:
            if r["method"] == m:
                steps, lr = zip(*r["lrs"])
                ax.step(steps, lr, where="post", label=f"seed {r['seed']} ({100 * r['test_acc']:.1f} %)")
        for base in ("cosine", "step"):
            r = next((r for r in runs if r["method"] == base and r["seed"] == cfg.seeds[0]), None)
            if r is not None:
                steps, lr = zip(*r["lrs"])
                ax.plot(steps, lr, "--", color="grey" if base == "cosine" else "black", lw=1, label=base)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.set_title(f"{m}: lr chosen by the agent")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    d = Config()
    ap = parser("lr_control", __doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny run (1,200 images, 1 epoch, seed 0), nothing written")
    ap.add_argument("--epochs", type=int, help=f"training epochs (default {d.epochs})")
    ap.add_argument("--seeds", type=int, nargs="+", help=f"seeds (default {' '.join(map(str, d.seeds))})")
    ap.add_argument("--methods", nargs="+", choices=METHODS, help=f"methods (default all: {' '.join(METHODS)})")
    ap.add_argument(
        "--max-train", type=int, help=f"training images before the validation split (default {d.max_train})"
    )
    ap.add_argument("--threads", type=int, help=f"torch CPU threads (default {d.threads})")
    ap.add_argument("--data-dir", help="Fashion-MNIST folder (default $RLOPT_DATA_DIR or data/ at the repository root)")
    ap.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision if missing")
    ap.add_argument(
        "--out",
        default=str(runs_path("lr_control")),
        help="output folder for lr_control.md, lr_control_lr.png and lr_control.json",
    )
    args = ap.parse_args(argv)
    cfg = Config()
    if args.smoke:
        cfg.max_train, cfg.epochs, cfg.seeds = 1200, 1, (0,)
    for key in ("epochs", "seeds", "methods", "max_train", "threads", "data_dir"):
        v = getattr(args, key)
        if v is not None:
            setattr(cfg, key, tuple(v) if isinstance(v, list) else v)
    cfg.download = cfg.download or args.download
    torch.set_num_threads(cfg.threads)
    try:
        ds = load_dataset(
            "fashion-mnist", data_dir=cfg.data_dir, download=cfg.download, max_train=cfg.max_train, seed=0
        )
    except MissingDataError as e:
        fail(ap, missing_data_message(e, "or --smoke --data-dir PATH for a quick check"))
    mean = torch.tensor(ds.mean).view(1, -1, 1, 1)
    std = torch.tensor(ds.std).view(1, -1, 1, 1)
    data = {
        k: normalize(getattr(ds, k), mean, std) if k.endswith("_x") else getattr(ds, k)
        for k in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
    }
    summary = (
        f"Fashion-MNIST, stratified subset: {len(ds.train_y)} train / {len(ds.val_y)} validation "
        f"(held out of {cfg.max_train}) / {len(ds.test_y)} test images"
    )
    print(summary, flush=True)
    runs = []
    t0 = time.perf_counter()
    for seed in cfg.seeds:
        for m in cfg.methods:
            r = run(m, seed, cfg, data)
            runs.append(r)
            print(
                f"{m:24s} seed {seed}: test acc {100 * r['test_acc']:.2f} %, final train loss "
                f"{r['final_train_loss']:.4f}, {r['wall_s']:.1f} s",
                flush=True,
            )
    total = time.perf_counter() - t0
    command = "python -m benchmarks.lr_control" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    report = write_report(cfg, runs, command, summary, total)
    print(report)
    if args.smoke:
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_control.md").write_text(report)
    plot(runs, cfg, out / "lr_control_lr.png")
    with open(out / "lr_control.json", "w") as f:
        json.dump({"config": asdict(cfg), "command": command, "runs": runs}, f)
    print(f"wrote {out / 'lr_control.md'}, {out / 'lr_control_lr.png'} and {out / 'lr_control.json'}")


if __name__ == "__main__":
    main()
