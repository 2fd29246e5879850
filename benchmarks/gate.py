"""The gate before any policy training: is there something for a SAM-switching policy to learn?

On the ResNet meta-training tasks (:mod:`rlopt.meta.tasks`, preset ``resnet``), three questions,
each answered with paired differences (same initial weights, same batches, same augmentation) and
95% t-intervals over tasks (each task's seeds averaged first):

1. **SAM - SGD**: final validation accuracy and loss of SAM on every step against SGD.
2. **SAM-late - random at the same share**: the rule ``"sam-late"`` against ``"ss-sam"`` (SAM on a
   random share of the steps), both under ``compute_budget=b``, so both spend exactly the same
   extra compute. If the timing of SAM does not matter, a policy has nothing to learn about *when*.
3. **Does the sharpness signal predict the gain of SAM over a window?** Along a plain SGD run
   (torch SGD, momentum 0.9, the task's weight decay and schedule), at several points the run is
   branched: a copy runs SAM (the ascent step around the same SGD, sharing its momentum) for one
   window on the same batches while the original continues with SGD; the window's gain is the
   log-ratio of the validation losses at its end, ``log(L_SGD / L_SAM)`` (positive when SAM helps). At the
   branch point the sharpness ``(L(w + e) - L(w)) / (rho |g|)`` is measured on a fixed training
   batch (:func:`rlopt.control.sharpness.measure_sharpness`, on a copy of the model). The gain is
   regressed on the sharpness, on the run's progress, and on both; R^2 is out of sample, k-fold
   cross-validated with the folds split by task (a task's windows are never in training and test).

The gate passes when (1) SAM's accuracy gain is positive (95% interval above 0), (2) SAM-late's
interval against random at the same share lies above 0, or (3) the sharpness has a positive
cross-validated R^2 beyond what progress explains. (1) is needed for anything; (2) or (3) says a
schedule or a signal carries information a policy could use.

Usage::

    python -m benchmarks.gate                       # 10 tasks x 2 seeds, budget 0.3, 2 processes
    python -m benchmarks.gate --tasks 4 --seeds 1 --out benchmarks/runs/gate_small
    python -m benchmarks.gate --task label_noise=0.4 --out benchmarks/results/gate/noise40

Each instance's figures are appended to ``runs.jsonl`` as it ends (a re-run with the same
``--out`` skips the instances already there); ``gate.json`` and ``gate.md`` hold the analysis.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn import functional as F

from .cli import REPO_DIR, parser, runs_path

ARMS = ("sgd", "sam", "sam-late", "random")


# ------------------------------------------------------------------------------------ statistics
def t_interval(x: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two ends of its t-interval (NaN ends for fewer than two values)."""
    from scipy import stats

    x = np.asarray(list(x), dtype=float)
    m = float(x.mean()) if len(x) else math.nan
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def cv_r2(X: np.ndarray, y: np.ndarray, groups: Sequence[Any], folds: int = 5, seed: int = 0) -> float:
    """Out-of-sample R^2 of a least-squares fit of ``y`` on ``X`` (with an intercept), k-fold by
    group: ``1 - sum (y - yhat)^2 / sum (y - mean_train)^2`` over the held-out folds, where each
    prediction and each reference mean come from the other folds only. 0: no better than the
    training folds' mean; negative: worse."""
    X = np.asarray(X, dtype=float).reshape(len(y), -1)
    y = np.asarray(y, dtype=float)
    names = sorted(set(groups), key=str)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    fold_of = {names[i]: k % folds for k, i in enumerate(order)}
    fold = np.asarray([fold_of[g] for g in groups])
    sse = sst = 0.0
    for k in range(min(folds, len(names))):
        test, train = fold == k, fold != k
        if not test.any() or train.sum() < X.shape[1] + 2:
            continue
        A = np.column_stack([np.ones(train.sum()), X[train]])
        coef, *_ = np.linalg.lstsq(A, y[train], rcond=None)
        pred = np.column_stack([np.ones(test.sum()), X[test]]) @ coef
        sse += float(((y[test] - pred) ** 2).sum())
        sst += float(((y[test] - y[train].mean()) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else math.nan


# ------------------------------------------------------------------------------------ one instance
class _SamOverSgd:
    """SAM around a torch SGD optimizer (its momentum buffer, weight decay and learning rate):
    ``g' = grad L(w + rho g / |g|)``, then the SGD step with ``g'`` at ``w``."""

    def __init__(self, sgd: torch.optim.Optimizer, rho: float = 0.05):
        self.sgd, self.rho, self.param_groups = sgd, rho, sgd.param_groups

    def zero_grad(self) -> None:
        self.sgd.zero_grad()

    def step(self, closure):
        loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            eps = [p.grad * (self.rho / norm.clamp_min(1e-12)) for p in params]
            for p, e in zip(params, eps):
                p.add_(e)
        closure()
        with torch.no_grad():
            for p, e in zip(params, eps):
                p.sub_(e)
        self.sgd.step()
        return loss


def _arm(cfg, arm: str, budget: float, interval: int, cifar10) -> dict[str, Any]:
    from rlopt import RLSwitchingOptimizer
    from rlopt.meta.tasks import build_task, run_episode

    task = build_task(cfg, cifar10_path=cifar10)
    policy = {"sgd": "constant:sgd", "sam": "constant:sam", "sam-late": "sam-late", "random": "ss-sam"}[arm]
    kw = {"compute_budget": budget} if arm in ("sam-late", "random") else {}
    opt = RLSwitchingOptimizer(
        task.model.parameters(),
        choices=["sgd", "sam"],
        policy=policy,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        interval=interval,
        seed=cfg.seed,
        total_steps=cfg.total_steps,
        total_epochs=cfg.epochs,
        process_group=None,
        train_policy=False,
        **kw,
    )
    t0 = time.perf_counter()
    out = run_episode(task, opt)
    last = opt.history[-1] if opt.history else {}
    return {
        "val_loss": out["val_loss"],
        "val_acc": out["val_acc"],
        "diverged": out["diverged"],
        "budget_used": last.get("budget_used", 1.0 if arm == "sam" else 0.0),
        "sam_share": out["action_share"].get("sam", 0.0),
        "seconds": time.perf_counter() - t0,
    }


def _windows(cfg, fracs: Sequence[float], window: int, rho: float, cifar10) -> list[dict[str, Any]]:
    from rlopt.control.sharpness import measure_sharpness
    from rlopt.meta.tasks import _evaluate, build_task, lr_factor, train_steps

    task = build_task(cfg, cifar10_path=cifar10)
    spe, E = cfg.steps_per_epoch, cfg.epochs
    sgd = torch.optim.SGD(task.model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    branch_at = sorted({min(E - window, max(1, round(f * E))) for f in fracs})
    probe = (task.train_x[:256], task.train_y[:256])
    pending: dict[int, dict[str, Any]] = {}
    rows = []
    for e in range(E):
        if e in branch_at:
            twin_task, twin_sgd = copy.deepcopy((task, sgd))
            probe_model = copy.deepcopy(task.model).train()

            def closure(probe_model: torch.nn.Module = probe_model) -> torch.Tensor:
                probe_model.zero_grad()
                loss = F.cross_entropy(probe_model(probe[0]), probe[1])
                loss.backward()
                return loss

            sharp = float(measure_sharpness(probe_model.parameters(), closure, rho=rho))
            train_steps(twin_task, _SamOverSgd(twin_sgd, rho), range(e * spe, (e + window) * spe))
            sam_loss, sam_acc = _evaluate(twin_task.model, twin_task.val_x, twin_task.val_y)
            pending[e + window - 1] = {
                "epoch": e,
                "progress": e / E,
                "sharpness": sharp,
                "lr_factor": lr_factor(cfg.schedule, e * spe, cfg.total_steps, cfg.warmup),
                "sam_val_loss": sam_loss,
                "sam_val_acc": sam_acc,
            }
        train_steps(task, sgd, range(e * spe, (e + 1) * spe))
        if e in pending:
            sgd_loss, sgd_acc = _evaluate(task.model, task.val_x, task.val_y)
            row = pending.pop(e)
            row.update(
                sgd_val_loss=sgd_loss,
                sgd_val_acc=sgd_acc,
                gain_loss=math.log(sgd_loss / row["sam_val_loss"])
                if min(sgd_loss, row["sam_val_loss"]) > 0 and math.isfinite(sgd_loss + row["sam_val_loss"])
                else math.nan,
                gain_acc=row["sam_val_acc"] - sgd_acc,
            )
            rows.append(row)
    return rows


def run_instance(job: dict[str, Any]) -> dict[str, Any]:
    """All arms and the branched windows of one (task, seed) instance."""
    from rlopt.meta.tasks import TaskConfig

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*runs without fused kernels.*")
    cfg = TaskConfig(**job["config"])
    t0 = time.perf_counter()
    arms = {a: _arm(cfg, a, job["budget"], job["interval"], job["cifar10"]) for a in ARMS}
    windows = _windows(cfg, job["fracs"], max(1, round(job["window_frac"] * cfg.epochs)), job["rho"], job["cifar10"])
    return {
        "key": job["key"],
        "task": job["task"],
        "seed": cfg.seed,
        "config": job["config"],
        "short": cfg.short(),
        "arms": arms,
        "windows": windows,
        "seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------ analysis
def analyse(rows: list[dict[str, Any]], folds: int = 5) -> dict[str, Any]:
    """Paired differences per task (seeds averaged) with 95% t-intervals, by noise level too,
    and the cross-validated R^2 of the window gains."""
    by_task: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)

    def diffs(a: str, b: str, metric: str, subset=None) -> list[float]:
        out = []
        for _task, rs in sorted(by_task.items()):
            if subset is not None and not subset(rs[0]):
                continue
            sign = -1.0 if metric == "val_loss" else 1.0  # loss: b - a, so positive is better for a
            out.append(float(np.mean([sign * (r["arms"][a][metric] - r["arms"][b][metric]) for r in rs])))
        return out

    comparisons = {
        "SAM - SGD": ("sam", "sgd"),
        "SAM-late - random (same budget)": ("sam-late", "random"),
        "SAM-late - SGD": ("sam-late", "sgd"),
        "random - SGD": ("random", "sgd"),
        "SAM - SAM-late": ("sam", "sam-late"),
    }
    noise_levels = sorted({r["config"]["label_noise"] for r in rows})
    table = {}
    for name, (a, b) in comparisons.items():
        entry = {}
        for metric in ("val_acc", "val_loss"):
            scale = 100.0 if metric == "val_acc" else 1.0
            m, lo, hi = t_interval([scale * d for d in diffs(a, b, metric)])
            entry[metric] = {"mean": m, "lo": lo, "hi": hi, "n": len(diffs(a, b, metric))}
            for nl in noise_levels:
                d = [scale * x for x in diffs(a, b, metric, lambda r, nl=nl: r["config"]["label_noise"] == nl)]
                m, lo, hi = t_interval(d)
                entry[f"{metric} noise={nl:g}"] = {"mean": m, "lo": lo, "hi": hi, "n": len(d)}
        table[name] = entry
    budget = {a: float(np.mean([r["arms"][a]["budget_used"] for r in rows])) for a in ARMS}

    win = [(r["key"], w) for r in rows for w in r["windows"]]
    groups = [k for k, _ in win]
    y = np.asarray([w["gain_loss"] for _, w in win])
    sharp = np.asarray([w["sharpness"] for _, w in win])
    prog = np.asarray([w["progress"] for _, w in win])
    finite = np.isfinite(y) & np.isfinite(sharp)
    y, sharp, prog = y[finite], sharp[finite], prog[finite]
    groups = [g for g, f in zip(groups, finite) if f]
    task_groups = [g.split("/")[0] for g in groups]  # folds by task: a task's seeds stay together
    r2 = {}
    if len(y) >= 10:
        r2 = {
            "sharpness": cv_r2(sharp, y, task_groups, folds),
            "log sharpness": cv_r2(np.log(np.clip(sharp, 1e-6, None)), y, task_groups, folds),
            "progress": cv_r2(prog, y, task_groups, folds),
            "progress + sharpness": cv_r2(np.column_stack([prog, sharp]), y, task_groups, folds),
        }
    from scipy import stats

    rho_s = float(stats.spearmanr(sharp, y).statistic) if len(y) > 2 else math.nan
    gain_acc = [100.0 * w["gain_acc"] for _, w in win]
    summary = {
        "instances": len(rows),
        "tasks": len(by_task),
        "comparisons": table,
        "budget_used": budget,
        "windows": {
            "n": int(len(y)),
            "cv_r2": r2,
            "spearman_sharpness_gain": rho_s,
            "folds": folds,
            "gain_loss": t_interval(list(y)),
            "gain_acc_points": t_interval(gain_acc),
        },
    }
    sam = table["SAM - SGD"]["val_acc"]
    late = table["SAM-late - random (same budget)"]["val_acc"]
    predicts = bool(r2) and r2["progress + sharpness"] > max(0.0, r2["progress"]) and r2["sharpness"] > 0
    summary["verdict"] = {
        "sam_beats_sgd": bool(sam["lo"] > 0),
        "sam_late_beats_random": bool(late["lo"] > 0),
        "sharpness_predicts_gain": predicts,
    }
    summary["verdict"]["passes"] = summary["verdict"]["sam_beats_sgd"] and (
        summary["verdict"]["sam_late_beats_random"] or predicts
    )
    return summary


def _fmt(e: dict[str, float], unit: str = "") -> str:
    return f"{e['mean']:+.2f}{unit} [{e['lo']:+.2f}, {e['hi']:+.2f}] (n={e['n']})"


def report(summary: dict[str, Any], rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Gate: {meta['title']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Commit {meta['commit']}; {meta['hardware']}; {summary['instances']} instances "
        f"({summary['tasks']} tasks x seeds), budget {meta['budget']}, decisions every {meta['interval']} "
        f"steps; {meta['wall_s'] / 60:.1f} min.",
        "",
        "Paired differences (first arm minus second; accuracy in points, loss as second minus first, so "
        "positive favours the first arm), mean [95% t-interval] over tasks, each task's seeds averaged:",
        "",
        "| comparison | metric | all | "
        + " | ".join(
            k.split(" ", 1)[1]
            for k in next(iter(summary["comparisons"].values()))
            if "noise" in k and k.startswith("val_acc")
        )
        + " |",
        "|---|---|---|"
        + "---|" * sum(1 for k in next(iter(summary["comparisons"].values())) if k.startswith("val_acc noise")),
    ]
    for name, entry in summary["comparisons"].items():
        for metric in ("val_acc", "val_loss"):
            cols = [_fmt(entry[metric])] + [_fmt(v) for k, v in entry.items() if k.startswith(metric + " noise")]
            lines.append(f"| {name} | {metric} | " + " | ".join(cols) + " |")
    w = summary["windows"]
    lines += [
        "",
        "Compute used (extra gradient evaluations per step, mean): "
        + ", ".join(f"{a} {v:.3f}" for a, v in summary["budget_used"].items()),
        "",
        f"Window study: {w['n']} branched windows; gain of SAM over SGD, log(val loss SGD / val loss SAM) "
        f"{w['gain_loss'][0]:+.4f} [{w['gain_loss'][1]:+.4f}, {w['gain_loss'][2]:+.4f}], on accuracy "
        f"{w['gain_acc_points'][0]:+.2f} pt [{w['gain_acc_points'][1]:+.2f}, {w['gain_acc_points'][2]:+.2f}]; "
        f"Spearman(sharpness, gain) {w['spearman_sharpness_gain']:+.3f}.",
        "",
        f"Cross-validated R^2 of the window's loss gain ({w['folds']}-fold by task):",
        "",
        "| predictors | CV R^2 |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:+.3f} |" for k, v in w["cv_r2"].items()]
    v = summary["verdict"]
    lines += [
        "",
        "Verdict: " + ("PASSES" if v["passes"] else "FAILS") + f" (SAM beats SGD: {v['sam_beats_sgd']}; "
        f"SAM-late beats random at the same budget: {v['sam_late_beats_random']}; sharpness predicts the "
        f"window gain beyond progress: {v['sharpness_predicts_gain']}).",
        "",
        "## Instances",
        "",
        "| task | seed | config | SGD acc | SAM acc | SAM-late acc | random acc | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["task"], r["seed"])):
        a = r["arms"]
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['short']} | "
            + " | ".join(f"{100 * a[k]['val_acc']:.1f}" for k in ARMS)
            + f" | {r['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from rlopt.meta.tasks import TaskDistribution

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("gate", __doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10, help="tasks drawn from the distribution")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per task (data subset, init, noise, batches)")
    ap.add_argument("--task-seed", type=int, default=0, help="seed of the task draw")
    ap.add_argument("--preset", default="resnet", help="task distribution preset (rlopt.meta.tasks.PRESETS)")
    ap.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="FIELD=VALUES",
        help="override a TaskDistribution field (repeatable), e.g. --task label_noise=0.4",
    )
    ap.add_argument("--budget", type=float, default=0.3, help="compute budget of SAM-late and random")
    ap.add_argument("--interval", type=int, default=2, help="decision interval (steps) of the rule arms")
    ap.add_argument("--fracs", default="0.2,0.4,0.6,0.8", help="branch points, as shares of the run")
    ap.add_argument("--window-frac", type=float, default=0.1, help="window length, as a share of the epochs")
    ap.add_argument("--rho", type=float, default=0.05, help="SAM radius (branches and sharpness probe)")
    ap.add_argument("--folds", type=int, default=5, help="cross-validation folds (by task)")
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--cifar10", default=None, help="CIFAR-10 subset file (default: rlopt.meta.tasks' lookup)")
    ap.add_argument(
        "--title", default="is there something for a SAM-switching policy to learn?", help="the report's title"
    )
    ap.add_argument("--out", default=str(runs_path("gate")), help="output folder (default %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument(
        "--analyse-only",
        action="store_true",
        help="run nothing: analyse the instances already in --out's runs.jsonl (those of this command's "
        "tasks and seeds)",
    )
    a = ap.parse_args(argv)

    commit = _commit()  # the code the runs are made with
    dist = TaskDistribution.preset(a.preset, **({"cifar10_path": a.cifar10} if a.cifar10 else {}))
    dist = dist.with_overrides(a.task)
    cifar10 = dist.resolved_cifar10_path()
    if "cifar10" in dist.data and cifar10 is None:
        print(
            "warning: no CIFAR-10 subset found: its tasks fall back to Fashion-MNIST (build it with "
            "python -m benchmarks.make_subset --dataset cifar10 --data-dir ...)",
            file=sys.stderr,
        )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(a.task_seed)
    fracs = [float(f) for f in a.fracs.split(",")]
    jobs = []
    for t in range(a.tasks):
        cfg = dist.sample(g, 1000 * a.task_seed + t)
        for s in range(a.seeds):
            c = dataclasses.replace(cfg, seed=1000 * a.task_seed + 100 * t + s)
            jobs.append(
                {
                    "key": f"{t}/{s}",
                    "task": t,
                    "config": dataclasses.asdict(c),
                    "budget": a.budget,
                    "interval": a.interval,
                    "fracs": fracs,
                    "window_frac": a.window_frac,
                    "rho": a.rho,
                    "cifar10": None if cifar10 is None else os.fspath(cifar10),
                }
            )
    runs_file = out / "runs.jsonl"
    done = {}
    if runs_file.is_file():
        for line in runs_file.read_text().splitlines():
            r = json.loads(line)
            done[r["key"]] = r
    todo = [j for j in jobs if j["key"] not in done or done[j["key"]]["config"] != j["config"]]
    if a.analyse_only:
        jobs = [j for j in jobs if j not in todo]
        todo = []
        if not jobs:
            ap.error(f"no finished instance of these tasks in {runs_file}")
    start = time.perf_counter()
    bar = None
    if not a.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="gate", unit="run")
    ctx = mp.get_context("spawn")
    with ctx.Pool(max(1, a.workers)) as pool, runs_file.open("a") as f:
        for r in pool.imap_unordered(run_instance, todo) if todo else ():
            done[r["key"]] = r
            f.write(json.dumps(r) + "\n")
            f.flush()
            if bar is not None:
                bar.set_postfix_str(r["short"][:40])
                bar.update()
    if bar is not None:
        bar.close()
    wall = (
        time.perf_counter()
        - start
        + sum(r["seconds"] for k, r in done.items() if k not in {j["key"] for j in todo}) / max(1, a.workers)
    )
    rows = [done[j["key"]] for j in jobs]
    summary = analyse(rows, a.folds)
    meta = {
        "title": a.title,
        "command": "python -m benchmarks.gate " + " ".join(argv),
        "commit": commit,
        "hardware": f"CPU ({platform.machine()}, {os.cpu_count()} cores shared, nice 19), {a.workers} processes "
        f"x 1 torch thread, torch {torch.__version__}",
        "budget": a.budget,
        "interval": a.interval,
        "wall_s": wall,
        "distribution": dist.describe(),
    }
    (out / "gate.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1) + "\n")
    (out / "gate.md").write_text(report(summary, rows, meta))
    print(f"wrote {out / 'gate.md'}: " + ("PASSES" if summary["verdict"]["passes"] else "FAILS"))
    return summary


if __name__ == "__main__":
    main()
