"""Benchmark table: several methods x several seeds on one data set, aggregated.

``python -m benchmarks.table --dataset cifar10 --data-dir /path --methods sgd sam ppo-sgd-sam --epochs 30 --seeds 3``

Writes into ``--out`` (default the git-ignored ``benchmarks/runs/<dataset>_<model>_e<epochs>``):
``table.md`` (header with hardware, torch version, command, epochs, seeds), ``table.csv``,
``summary.json``, one JSON log per run under ``runs/``, and figures ``curves.png`` (test accuracy,
losses, macro F1, macro precision; mean over seeds with +-1 std band), ``rewards.png`` (reward per
decision of the RL methods) and ``choices.png`` (optimizer used at each step, one row per run).

``--smoke`` runs every method for a few batches of a tiny slice of the embedded Fashion-MNIST
subset on the CPU (checks the code paths, not the numbers).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from .cli import fail, missing_data_message, parser, runs_path
from .data import MissingDataError, load_dataset
from .train import (
    CONVERGENCE_DEFINITION,
    METHODS,
    RL_METHODS,
    TrainConfig,
    add_config_args,
    config_from_args,
    logged_config,
    train,
)

__all__ = ["aggregate", "write_outputs", "compare_pairs", "CONTROL_PAIRS", "main", "SMOKE"]

# two-sided 95% Student t quantiles, df = 1..30
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]

#: settings of --smoke (tiny data, a few batches per epoch, CPU)
SMOKE = dict(
    dataset="fmnist-subset",
    model="small-cnn",
    width=8,
    max_train=600,
    max_test=200,
    batch_size=64,
    eval_batch_size=256,
    epochs=2,
    max_steps_per_epoch=3,
    warmup_epochs=0.5,
    lr=0.05,
    interval=2,
    device="cpu",
    sam_every=2,
)


def _mean_std(xs: Sequence[float]):
    xs = [x for x in xs if x is not None]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan
    m = sum(xs) / n
    if n == 1:
        return m, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = _T95[n - 2] if n - 1 <= len(_T95) else 1.96
    return m, sd, t * sd / math.sqrt(n)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the runs of one method (different seeds)."""
    s = [r["summary"] for r in runs]
    out: dict[str, Any] = {
        "method": runs[0]["config"]["method"],
        "n": len(runs),
        "seeds": [r["config"]["seed"] for r in runs],
    }
    for key in (
        "final_test_acc",
        "best_test_acc",
        "final_val_acc",
        "final_test_f1",
        "final_test_precision",
        "final_test_recall",
        "convergence_epoch",
        "train_seconds_total",
        "grad_evals",
    ):
        m, sd, ci = _mean_std([x[key] for x in s])
        out[key] = {"mean": m, "std": sd, "ci95": ci}
    med = [x["seconds_per_epoch_median"] for x in s]
    out["seconds_per_epoch"] = {
        "min_of_medians": min(med),
        "max_of_medians": max(med),
        "min": min(x["seconds_per_epoch_min"] for x in s),
        "max": max(x["seconds_per_epoch_max"] for x in s),
    }
    out["train_seconds_all_seeds"] = sum(x["train_seconds_total"] for x in s)
    out["wall_seconds_all_seeds"] = sum(x["wall_seconds"] for x in s)
    per_s = [100 * x["final_test_acc"] / x["train_seconds_total"] for x in s if x["train_seconds_total"] > 0]
    out["acc_points_per_second"] = _mean_std(per_s)[0]
    names = sorted({n for x in s for n in x["step_share"]})
    out["step_share"] = {n: sum(x["step_share"].get(n, 0.0) for x in s) / len(s) for n in names}
    return out


#: methods that run one optimizer throughout (the "best static" comparison draws from these)
STATIC_METHODS = ("sgd", "sam", "adam", "adamw")


def welch_diff(a: dict[str, float], b: dict[str, float], n_a: int, n_b: int) -> tuple[float, float]:
    """Mean difference ``a - b`` of two groups given their means and sample stds, and the half-width of
    its 95% interval (Welch's t; the t quantile at the Welch-Satterthwaite df rounded down, and at most
    30, so slightly wide). NaN half-width when a group has fewer than two runs."""
    diff = a["mean"] - b["mean"]
    if n_a < 2 or n_b < 2:
        return diff, math.nan
    va, vb = a["std"] ** 2 / n_a, b["std"] ** 2 / n_b
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, 0.0
    df = (va + vb) ** 2 / (va**2 / (n_a - 1) + vb**2 / (n_b - 1))
    t = _T95[min(max(1, int(df)), len(_T95)) - 1]
    return diff, t * se


def compare_to_best_static(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: each method's final test accuracy against the static method with the highest
    mean, with a Welch 95% interval of the difference and a verdict that the interval decides."""
    static = [r for r in rows if r["method"] in STATIC_METHODS and r["n"] > 0]
    if not static or len(rows) < 2:
        return []
    best = max(static, key=lambda r: r["final_test_acc"]["mean"])
    b_acc, b_ge = best["final_test_acc"], best["grad_evals"]["mean"]
    md = [
        "",
        f"Against the best static method, `{best['method']}` (highest mean final test accuracy): "
        'difference in final test accuracy with its 95% interval (Welch\'s t over seeds). "better" or '
        '"worse" only where the interval excludes 0; "not separable" otherwise. Cost: gradient '
        "evaluations per run over the best static method's.",
        "",
        "| method | n | difference (points) | 95% interval | verdict | cost (x best static) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r is best:
            continue
        diff, half = welch_diff(r["final_test_acc"], b_acc, r["n"], best["n"])
        if math.isnan(half):
            interval, verdict = "-", "too few runs"
        else:
            interval = f"[{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}]"
            verdict = "better" if diff - half > 0 else "worse" if diff + half < 0 else "not separable"
        cost = r["grad_evals"]["mean"] / b_ge if b_ge else math.nan
        md.append(f"| {r['method']} | {r['n']} | {100 * diff:+.2f} | {interval} | {verdict} | {cost:.2f} |")
    return md


#: the comparisons a sceptic asks for, shown when both methods are in a table: each learned method
#: against its control (random switching at its share, the same agent learning online, its base optimizer)
CONTROL_PAIRS = (
    "dqn-sgd-sam:random-sgd-sam",
    "ppo-sgd-sam:random-sgd-sam",
    "pre-sgd-sam:ppo-sgd-sam",
    "pre-sgd-sam-adam:random-sgd-sam-adam",
    "pre-sgd-sam-adam:ppo-sgd-sam-adam",
    "lr-dqn:lr-dqn-online",
    "lr-dqn:sgd",
    "sam:sgd",
)


def compare_pairs(rows: list[dict[str, Any]], pairs: Sequence[str]) -> list[str]:
    """Markdown lines: final test accuracy of A minus B for each "A:B" in ``pairs`` whose methods are
    both in ``rows``, with a Welch 95% interval and the verdict it decides (as against the best static)."""
    by = {r["method"]: r for r in rows}
    md = []
    for pair in pairs:
        a, b = pair.split(":")
        if a not in by or b not in by:
            continue
        diff, half = welch_diff(by[a]["final_test_acc"], by[b]["final_test_acc"], by[a]["n"], by[b]["n"])
        if math.isnan(half):
            interval, verdict = "-", "too few runs"
        else:
            interval = f"[{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}]"
            verdict = "A better" if diff - half > 0 else "B better" if diff + half < 0 else "not separable"
        md.append(f"| {a} | {b} | {100 * diff:+.2f} | {interval} | {verdict} |")
    if not md:
        return []
    return [
        "",
        "Controls: final test accuracy of method A minus method B, with its 95% interval (Welch's t over seeds).",
        "",
        "| A | B | difference (points) | 95% interval | verdict |",
        "|---|---|---|---|---|",
    ] + md


def _pct(d, digits=2):
    m, sd = d["mean"], d["std"]
    if m is None or (isinstance(m, float) and math.isnan(m)):
        return "-"
    if sd is None or math.isnan(sd):
        return f"{100 * m:.{digits}f}"
    return f"{100 * m:.{digits}f} ± {100 * sd:.{digits}f}"


def _ci(d):
    m, ci = d["mean"], d["ci95"]
    if ci is None or math.isnan(ci):
        return "-"
    return f"[{100 * (m - ci):.2f}, {100 * (m + ci):.2f}]"


def write_outputs(
    out: Path, rows: list[dict[str, Any]], runs: dict[str, list[dict[str, Any]]], header: dict[str, Any]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    unit = "GPU-s" if header["environment"]["device"].startswith("cuda") else "CPU-s"
    cols = [
        "method",
        "n",
        "test acc % (mean ± std)",
        "95% CI",
        "best test acc %",
        "macro F1 %",
        "macro precision %",
        "macro recall %",
        "convergence epoch",
        "s/epoch (min-max of run medians)",
        "train time total (s, all seeds)",
        f"acc points per {unit}",
        "grad evals / run",
        "steps per optimizer",
    ]
    lines = []
    for r in rows:
        share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["step_share"].items())
        spe = r["seconds_per_epoch"]
        conv = r["convergence_epoch"]
        lines.append(
            [
                r["method"],
                str(r["n"]),
                _pct(r["final_test_acc"]),
                _ci(r["final_test_acc"]),
                _pct(r["best_test_acc"]),
                _pct(r["final_test_f1"]),
                _pct(r["final_test_precision"]),
                _pct(r["final_test_recall"]),
                f"{conv['mean']:.1f}" if not math.isnan(conv["mean"]) else "-",
                f"{spe['min_of_medians']:.3g}-{spe['max_of_medians']:.3g}",
                f"{r['train_seconds_all_seeds']:.1f}",
                f"{r['acc_points_per_second']:.3g}",
                f"{r['grad_evals']['mean']:.0f}",
                share,
            ]
        )
    env = header["environment"]
    hw = env.get("gpu", env.get("cpu"))
    smoke = "SMOKE TEST: code paths only, numbers meaningless"
    md = [
        f"# {header['dataset']} benchmark ({smoke if header['smoke'] else 'results'})",
        "",
        f"- command: `{header['command']}`",
        f"- hardware: {hw} ({env['device']}, {env['cpu_count']} CPU cores, {env['torch_threads']} torch threads); "
        f"torch {env['torch']}, torchvision {env.get('torchvision', '?')}, Python {env['python']}",
        f"- data: {header['data']}",
        f"- model {header['config']['model']}, {header['config']['epochs']} epochs, "
        f"batch {header['config']['batch_size']}, "
        f"seeds {header['seeds']}, peak lr {header['config']['lr']} (Adam/AdamW {header['config']['adam_lr']}), "
        f"warm-up {header['config']['warmup_epochs']} epochs then cosine, "
        f"RL decision interval {header['config']['interval']}",
        "- test accuracy after the last epoch, mean ± sample std over seeds; 95% CI: Student t over seeds",
        f"- {CONVERGENCE_DEFINITION}",
        f"- s/epoch: training time per epoch (synchronized; evaluation excluded); acc points per {unit}: "
        f"final test accuracy (%) / training seconds of the run, mean over seeds",
        f"- total wall time of the runs (sum over runs, evaluation and set-up included): "
        f"{header['wall_seconds']:.1f} s",
        *[f"- {n}" for n in header.get("notes", [])],
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    md += ["| " + " | ".join(cells) + " |" for cells in lines]
    md += compare_to_best_static(rows)
    md += compare_pairs(rows, header.get("pairs", CONTROL_PAIRS))
    md += ["", "Methods:", ""] + [f"- `{r['method']}`: {METHODS[r['method']]}" for r in rows]
    (out / "table.md").write_text("\n".join(md) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(lines)
    (out / "summary.json").write_text(json.dumps({"header": header, "methods": rows}, indent=1, default=str))
    plot_figures(out, runs)


def plot_figures(out: Path, runs: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """curves.png, rewards.png, choices.png from the run logs; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        ("test_acc", "test accuracy (%)", 100),
        ("val_loss", "validation loss (dashed: train)", 1),
        ("test_f1", "test macro F1 (%)", 100),
        ("test_precision", "test macro precision (%)", 100),
    ]
    for ax, (key, title, scale) in zip(axes.flat, panels):
        for i, (method, rs) in enumerate(runs.items()):
            color = f"C{i % 10}"
            curves = np.array([[e[key] if e[key] is not None else np.nan for e in r["epochs"]] for r in rs]) * scale
            ep = np.arange(1, curves.shape[1] + 1)
            with warnings.catch_warnings():  # no validation split: an all-NaN curve, left unplotted
                warnings.simplefilter("ignore", RuntimeWarning)
                m, sd = np.nanmean(curves, 0), np.nanstd(curves, 0)
            ax.plot(ep, m, color=color, label=method)
            if len(rs) > 1:
                ax.fill_between(ep, m - sd, m + sd, color=color, alpha=0.15)
            if key == "val_loss":
                tr = np.array([[e["train_loss"] for e in r["epochs"]] for r in rs]).mean(0)
                ax.plot(ep, tr, color=color, ls="--", lw=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)
    paths.append(out / "curves.png")

    rl = {m: rs for m, rs in runs.items() if any(r["decisions"] for r in rs)}
    if rl:
        fig, ax = plt.subplots(figsize=(10, 4))
        for i, (method, rs) in enumerate(rl.items()):
            for j, r in enumerate(rs):
                pts = [(d["step"], d["reward"]) for d in r["decisions"] if d["reward"] is not None]
                if pts:
                    x, y = zip(*pts)
                    ax.plot(
                        x,
                        y,
                        color=f"C{i % 10}",
                        alpha=0.8 if j == 0 else 0.35,
                        marker=".",
                        label=method if j == 0 else None,
                    )
        ax.set_xlabel("step")
        ax.set_ylabel("reward")
        ax.set_title("reward per decision (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "rewards.png", dpi=80)
        plt.close(fig)
        paths.append(out / "rewards.png")

    rows = [
        (f"{m} s{r['config']['seed']}", r["choice_segments"])
        for m, rs in runs.items()
        for r in rs
        if len({seg[2] for seg in r["choice_segments"]}) > 1 or m in RL_METHODS
    ]
    if rows:
        names = sorted({seg[2] for _, segs in rows for seg in segs})
        colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
        fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
        for k, (_label, segs) in enumerate(rows):
            for n in names:
                bars = [(a, b - a) for a, b, c in segs if c == n]
                if bars:
                    ax.broken_barh(bars, (k - 0.4, 0.8), color=colors[n])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([r[0] for r in rows], fontsize=8)
        ax.set_xlabel("step")
        ax.set_title("optimizer used at each step")
        from matplotlib.patches import Patch

        ax.legend(
            handles=[Patch(color=colors[n], label=n) for n in names],
            fontsize=8,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
        fig.tight_layout()
        fig.savefig(out / "choices.png", dpi=80)
        plt.close(fig)
        paths.append(out / "choices.png")
    return paths


_NOT_COMPARED = ("threads", "out_dir", "cache_dir", "data_dir", "download")


def _reusable(cfg: TrainConfig):
    """The saved log of ``cfg``'s run if one exists with the same configuration, else None."""
    path = Path(cfg.out_dir) / f"{cfg.run_name()}.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    have = logged_config(old["config"])  # a field newer than the log: the value its runs had
    same = all(have.get(k) == v for k, v in want.items() if k not in _NOT_COMPARED)
    return old if same else None


#: the table's default rows: the reference rows, the learning-rate agent, the controls
DEFAULT_METHODS = [
    "sgd",
    "sam",
    "adamw",
    "dqn-sgd-sam",
    "ppo-sgd-sam",
    "ppo-sgd-sam-adamw",
    "pre-sgd-sam",
    "lr-dqn",
    "random-sgd-sam",
    "sam-every-k",
    "sam-last",
    "lr-dqn-online",
    "pre-sgd-sam-adam",
    "ppo-sgd-sam-adam",
    "random-sgd-sam-adam",
]


def _step_shares(path: Path) -> Optional[dict[str, float]]:
    try:
        return {k: float(v) for k, v in json.loads(path.read_text())["summary"]["step_share"].items()}
    except (OSError, ValueError, KeyError):
        return None


#: random controls: the method whose run of the same seed sets their probabilities, and how
_RANDOM_CONTROLS = {
    "random-sgd-sam": (None, lambda s: {"sam_share": round(s.get("sam", 0.0), 4)}),  # None: --match-share
    "random-sgd-sam-adam": (
        "pre-sgd-sam-adam",
        lambda s: {"random_probs": ",".join(f"{s.get(c, 0.0):.4f}" for c in ("sgd", "sam", "adam"))},
    ),
}


def _estimate(method: str, runs_dir: Path, done: dict[str, float]) -> Optional[float]:
    """Seconds a run of ``method`` is expected to take: the longest finished run of that method
    (this process's, or any saved in ``runs_dir`` by others), else the median of all finished runs."""
    seen: dict[str, list[float]] = {m: [t] for m, t in done.items()}
    for f in runs_dir.glob("*.json"):
        try:
            r = json.loads(f.read_text())
            seen.setdefault(r["config"]["method"], []).append(float(r["summary"]["wall_seconds"]))
        except (OSError, ValueError, KeyError):
            continue
    if method in seen:
        return max(seen[method])
    every = sorted(t for ts in seen.values() for t in ts)
    return every[len(every) // 2] if every else None


def main(argv=None) -> dict[str, Any]:
    ap = parser(
        "table",
        "Train and aggregate a methods x seeds benchmark into a table and figures. Needs the "
        "data set (--data-dir or --download); --smoke runs a small offline table on the embedded subset.",
    )
    ap.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"methods (space or comma separated; default {' '.join(DEFAULT_METHODS)}); all: {', '.join(METHODS)}",
    )
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default benchmarks/runs/<dataset>_<model>_e<epochs>, "
        "or benchmarks/runs/smoke_<model>_e<epochs> with --smoke; give a folder under benchmarks/results/ "
        "to commit a study)",
    )
    ap.add_argument("--smoke", action="store_true", help="every method, a few batches of tiny data, on CPU")
    ap.add_argument("--progress", action="store_true", help="tqdm progress bar per run")
    ap.add_argument(
        "--reuse",
        default=True,
        action=argparse.BooleanOptionalAction,
        help="reuse a run log in <out>/runs/ whose config equals the requested one (default on): "
        "lets a long table be run in pieces and aggregated at the end",
    )
    ap.add_argument(
        "--match-share",
        default="ppo-sgd-sam",
        metavar="METHOD",
        help="random-sgd-sam picks SAM with the SAM step share of METHOD's run of the same seed "
        "(default ppo-sgd-sam; that run must exist or be earlier in the list); 'none': --sam-share",
    )
    ap.add_argument(
        "--claim",
        action="store_true",
        help="share the runs with other processes started with the same arguments (N processes on "
        "one device): each run is claimed by creating <out>/runs/<run>.claim; no table is "
        "written. Aggregate afterwards with --aggregate-only. Delete stale .claim files "
        "left by a killed process before starting again",
    )
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no run expected to end later than SECONDS after the start (expected: the "
        "longest finished run of that method, else twice the longest of any)",
    )
    ap.add_argument(
        "--aggregate-only",
        action="store_true",
        help="train nothing: tabulate the saved runs that match (missing ones are listed)",
    )
    ap.add_argument(
        "--compare",
        nargs="+",
        default=list(CONTROL_PAIRS),
        metavar="A:B",
        help="pairs of methods whose difference A - B the table reports with a 95%% interval, "
        "where both are in the table",
    )
    ap.add_argument("--note", action="append", default=[], help="a line added to the table's header (repeatable)")
    add_config_args(ap, skip=("method", "seed", "out_dir"))
    args = ap.parse_args(argv)
    for pair in args.compare:
        if pair.count(":") != 1 or any(m not in METHODS for m in pair.split(":")):
            ap.error(f"--compare expects METHOD:METHOD pairs of {list(METHODS)}, got {pair!r}")
    default = list(METHODS) if args.smoke else DEFAULT_METHODS
    methods = [m for s in (args.methods or default) for m in s.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; expected one of {list(METHODS)}")
    base = config_from_args(args, method=methods[0], seed=0, out_dir=None)
    if args.smoke:
        base = TrainConfig(**{**base.__dict__, **SMOKE, "threads": args.threads, "method": methods[0]})
        if args.seeds == ap.get_default("seeds"):
            args.seeds = 1
    out = (
        Path(args.out)
        if args.out
        else runs_path(f"{'smoke' if args.smoke else base.dataset}_{base.model}_e{base.epochs}")
    )
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    try:
        data = (
            None
            if args.aggregate_only
            else load_dataset(
                base.dataset,
                base.data_dir,
                base.download,
                base.val_fraction,
                seed=0,
                cache_dir=base.cache_dir,
                max_train=base.max_train,
                max_test=base.max_test,
            )
        )
    except MissingDataError as e:
        fail(ap, missing_data_message(e, "or --smoke for a small offline table on the embedded Fashion-MNIST subset"))
    print(CONVERGENCE_DEFINITION)
    match = None if args.match_share == "none" else args.match_share
    # seed-major order: a budget or an interruption leaves whole seeds, not whole methods
    jobs = [(seed, m) for seed in seeds for m in methods]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    missing: list[str] = []
    took: dict[str, float] = {}
    for seed, method in jobs:
        cfg = TrainConfig(**{**base.__dict__, "method": method, "seed": seed, "out_dir": str(out / "runs")})
        ref_method = (_RANDOM_CONTROLS[method][0] or match) if method in _RANDOM_CONTROLS else None
        if ref_method and not args.smoke:
            ref = TrainConfig(**{**cfg.__dict__, "method": ref_method})
            ref_path = Path(cfg.out_dir) / f"{ref.run_name()}.json"
            shares = _step_shares(ref_path)
            ref_claim = Path(cfg.out_dir) / f"{ref.run_name()}.claim"
            while (
                shares is None
                and args.claim
                and ref_claim.exists()
                and (args.time_budget is None or time.perf_counter() - t0 < args.time_budget - (took.get(method) or 0))
            ):
                time.sleep(5.0)  # another process is making it
                shares = _step_shares(ref_path)
            if shares is None:
                print(f"[{cfg.run_name()}] skipped: needs the step shares of {ref.run_name()}, not run yet")
                missing.append(cfg.run_name())
                continue
            cfg = TrainConfig(**{**cfg.__dict__, **_RANDOM_CONTROLS[method][1](shares)})
        old = _reusable(cfg) if (args.reuse or args.aggregate_only) and not args.smoke else None
        if old is not None:
            print(f"[{cfg.run_name()}] reusing {Path(cfg.out_dir) / (cfg.run_name() + '.json')} (same config)")
            runs[method].append(old)
            continue
        if args.aggregate_only:
            missing.append(cfg.run_name())
            continue
        est = _estimate(method, Path(cfg.out_dir), took)
        if args.time_budget is not None and est is not None and time.perf_counter() - t0 + est > args.time_budget:
            print(f"[{cfg.run_name()}] not started: expected {est:.0f} s, over the time budget")
            missing.append(cfg.run_name())
            continue
        claim = Path(cfg.out_dir) / f"{cfg.run_name()}.claim"
        if args.claim:
            claim.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # another process runs it
        t_run = time.perf_counter()
        try:
            runs[method].append(train(cfg, data=data, progress=args.progress))
        finally:
            if args.claim:
                claim.unlink(missing_ok=True)
        took[method] = max(took.get(method, 0.0), time.perf_counter() - t_run)
    wall = time.perf_counter() - t0
    if missing:
        print(f"{len(missing)} run(s) missing: {', '.join(missing)}")
    runs = {m: rs for m, rs in runs.items() if rs}
    if args.claim or not runs:
        print(f"{sum(map(len, runs.values()))} run(s) done or reused in {wall:.1f} s; no table written")
        return {"runs": runs, "missing": missing, "out": out, "wall_seconds": wall}
    rows = [aggregate(rs) for rs in runs.values()]
    first = next(iter(runs.values()))[0]
    envs = {json.dumps(r["environment"].get("gpu", r["environment"].get("cpu"))) for rs in runs.values() for r in rs}
    header = {
        "dataset": base.dataset,
        "smoke": args.smoke,
        "command": "python -m benchmarks.table " + shlex.join(sys.argv[1:] if argv is None else list(argv)),
        "environment": first["environment"],
        "data": first["data"],
        "config": base.__dict__,
        "seeds": seeds,
        "wall_seconds": sum(r["summary"]["wall_seconds"] for rs in runs.values() for r in rs),
        "pairs": args.compare,
        "notes": args.note
        + ([f"runs on more than one kind of hardware: {sorted(envs)}"] if len(envs) > 1 else [])
        + ([f"missing runs: {', '.join(missing)}"] if missing else []),
    }
    write_outputs(out, rows, runs, header)
    print((out / "table.md").read_text())
    print(
        f"wrote {out}/table.md, table.csv, summary.json, curves.png, rewards.png, choices.png, runs/*.json "
        f"({wall:.1f} s)"
    )
    return {"rows": rows, "runs": runs, "out": out, "wall_seconds": wall, "missing": missing}


if __name__ == "__main__":
    main()
