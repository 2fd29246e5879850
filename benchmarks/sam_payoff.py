"""Does SAM pay off in the meta-training task distribution, and can anything observable predict when?

``python -m benchmarks.sam_payoff --tasks 300 --variant-tasks 100``   (about 8-10 min on one CPU thread)
``python -m benchmarks.sam_payoff --from-json benchmarks/results/sam_payoff/default.json``   (report only)

What it measures. Tasks are drawn exactly as :func:`rlopt.meta.train_policy.train_policy` draws them
(``TaskDistribution.sample(g, seed * 100003 + e)`` with ``g = torch.Generator().manual_seed(seed)``,
so with ``--seed 0`` task ``e`` is the ``e``-th task the shipped ``switch-sgd-sam`` policy was
meta-trained on). Every task is run several times from scratch with ``build_task`` (same data,
same label noise, same initial weights, same batch order) and ``run_episode``, through the very
optimizer meta-training builds (``train_policy._make_optimizer``: an ``RLSwitchingOptimizer``
over ``("sgd", "sam")`` at the task's lr, interval and budget, with its default
``share_momentum=True``: the ``sgd`` and ``sam`` choices share one momentum buffer per parameter),
with a fixed policy instead of the learning one:

* ``sgd``: ``policy="constant:sgd"``;
* ``sam``: ``policy="constant:sam"``;
* ``sam_last``: SGD, then SAM for the last 30% of the epochs (from epoch
  ``epochs - round(0.3 * epochs)`` on, the rule of ``benchmarks/train.py``'s ``sam-last``). Here it
  is a policy that reads only the ``progress`` feature of its observation, so it switches at the
  first decision point at or after that epoch, as a learned policy could. As in the benchmark's
  ``sam-last``, SGD and SAM share one momentum buffer, so the switch carries the velocity on
  (``sam_last - sgd`` is SAM's own effect in the last 30%);
* ``sam_last_separate``: the ``sam_last`` schedule with ``share_momentum=False`` (each choice its
  own buffer, rlopt's behaviour before ``share_momentum``), so SAM's inner SGD starts from a zero
  momentum buffer at the switch; ``sam_last - sam_last_separate`` is what the shared buffer changes.
  ``_make_optimizer`` takes no ``share_momentum``, so this arm's optimizer is built by
  :func:`make_optimizer` with the same arguments plus ``share_momentum=False``;
* ``sgd_reorder``: ``constant:sgd`` with the task's batch-order generator (``Task.generator``)
  re-seeded, i.e. the same task, data and initial weights with another batch order: the noise
  of a single paired comparison.

Per task it records final validation accuracy and loss, the episode's return under the default
``SwitchingReward`` (what the policy is paid), the share of steps run with SAM, and the
observation vectors the policy saw (after the first epoch, and at ``sam_last``'s switch, where
the ``sgd``, ``sam_last`` and ``sam_last_separate`` runs are still identical). The report gives
mean differences to ``sgd`` with 95% t-intervals, win/loss shares beyond 1 point, breakdowns by
task factor, Spearman correlations of observation features with the differences, and a 5-fold
cross-validated ridge regression that predicts the difference from what the policy observes.
Needs numpy and torch only (the t quantiles come from ``benchmarks/table.py``'s table, Spearman's
correlation is computed here).

``--variant-tasks`` also runs a variant distribution (longer budgets, more label noise;
``--variant-epochs``, ``--variant-noise``; any other ``TaskDistribution`` field with a repeatable
``--variant-set FIELD=VALUES`` as ``train_policy --task`` (``TaskDistribution.with_overrides``), e.g.
``--variant-set mlp_width=128,256 --variant-set data=fmnist``; ``--tasks 0`` skips the default
distribution). Results: ``--out`` (default the git-ignored ``benchmarks/runs/sam_payoff``) ``.md``
and ``.json`` (one row per task); the committed study is ``benchmarks/results/sam_payoff/``.
Runs on the CPU with one thread.

``python -m benchmarks.sam_payoff --tasks 0 --variant-tasks 100 --variant-name overfit-mlp --variant-epochs
20,30,40 --variant-noise 0.2,0.4 --variant-set n_train=512,1024 --variant-set n_val=1024 --variant-set
mlp_width=128,256 --variant-set cnn_share=0 --variant-set batch_size=32,64 --out
benchmarks/runs/sam_payoff_overfit_mlp``: a variant in the overfitting regime alone (about 8 min).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.cli import parser, runs_path
from benchmarks.table import _T95  # two-sided 95% Student-t quantiles for 1-30 degrees of freedom
from rlopt import RLSwitchingOptimizer
from rlopt.meta.tasks import TaskConfig, TaskDistribution, build_task, run_episode
from rlopt.meta.train_policy import _make_optimizer  # the optimizer meta-training builds, exactly
from rlopt.policies import Policy

CHOICES = ("sgd", "sam")


def observation_layout(choices: Sequence[str] = CHOICES) -> dict[str, Any]:
    """The observation layout a switching policy over ``choices`` sees (read from the optimizer's
    public ``observation_layout`` property)."""
    opt = RLSwitchingOptimizer([torch.nn.Parameter(torch.zeros(1))], choices=list(choices), policy="constant:sgd")
    return opt.observation_layout


ARMS = ("sgd", "sam", "sam_last", "sam_last_separate", "sgd_reorder")
SWITCH_ARMS = ("sam_last", "sam_last_separate")
COMPARISONS = (
    ("sam", "sgd"),
    ("sam_last", "sgd"),
    ("sam_last_separate", "sgd"),
    ("sam_last", "sam_last_separate"),
    ("sgd_reorder", "sgd"),
    ("sam", "sgd_reorder"),
    ("sam_last", "sgd_reorder"),
)
BY_FACTOR = (("sam", "sgd"), ("sam_last", "sgd"), ("sam_last", "sam_last_separate"), ("sgd_reorder", "sgd"))
REORDER_OFFSET = 1_000_003  # batch-order seed of sgd_reorder: task seed + this


class ProgressSwitchPolicy(Policy):
    """SGD until the budget's progress reaches ``switch_at``, SAM from then on. It reads the
    ``progress`` feature of the observation only (``2 p - 1``), so it is a policy that a learned
    one could represent."""

    kind = "progress-switch"  # not registered: never saved or loaded

    def __init__(self, switch_at: float):
        layout = observation_layout(CHOICES)
        super().__init__(len(layout["names"]), CHOICES, seed=0, obs_layout=layout, train=False)
        self.switch_at = float(switch_at)
        self._progress_index = layout["names"].index("progress")

    def act(self, obs: torch.Tensor) -> int:
        obs = self._check_obs(obs)
        progress = (float(obs[self._progress_index]) + 1.0) / 2.0
        return CHOICES.index("sam" if progress >= self.switch_at - 1e-6 else "sgd")


def sam_from_epoch(epochs: int, fraction: float) -> int:
    """First SAM epoch of "SAM in the last ``fraction`` of the epochs" (as benchmarks/train.py)."""
    return epochs - int(round(fraction * epochs))


def sam_step_share(history: Sequence[dict[str, Any]], total_steps: int) -> float:
    """Share of the steps run with SAM: decision k's choice runs until decision k + 1."""
    steps = [h["step"] for h in history] + [total_steps]
    sam = sum(max(0, min(b, total_steps) - a) for h, a, b in zip(history, steps, steps[1:]) if h["choice"] == "sam")
    return sam / max(1, total_steps)


@torch.no_grad()
def _fit(task) -> dict[str, float]:
    """Loss and accuracy on the training set as trained on (noisy labels), after the episode."""
    out = task.model(task.train_x)
    return {
        "train_loss": float(F.cross_entropy(out, task.train_y)),
        "train_acc": float((out.argmax(1) == task.train_y).float().mean()),
    }


def make_optimizer(task, policy: Any, seed: int, share_momentum: bool = True) -> RLSwitchingOptimizer:
    """The optimizer of one arm. ``share_momentum=True`` (rlopt's default): exactly what meta-training
    builds, ``_make_optimizer("switching", ...)``. False: the same construction (same arguments as
    ``_make_optimizer``'s switching branch) with ``share_momentum=False``, which ``_make_optimizer``
    does not take."""
    if share_momentum:
        return _make_optimizer("switching", task, CHOICES, policy, seed)
    cfg = task.config
    return RLSwitchingOptimizer(
        task.model.parameters(),
        choices=list(CHOICES),
        lr=cfg.lr,
        policy=policy,
        interval=cfg.interval,
        seed=seed,
        total_steps=cfg.total_steps,
        total_epochs=cfg.epochs,
        train_policy=True,
        share_momentum=False,
    )


def run_arm(
    cfg: TaskConfig, fmnist: Optional[Path], arm: str, policy_seed: int, last_fraction: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    task = build_task(cfg, fmnist)
    if arm == "sgd_reorder":
        task.generator.manual_seed(cfg.seed + REORDER_OFFSET)
    if arm in ("sgd", "sgd_reorder"):
        policy: Any = "constant:sgd"
    elif arm == "sam":
        policy = "constant:sam"
    else:
        policy = ProgressSwitchPolicy(sam_from_epoch(cfg.epochs, last_fraction) / cfg.epochs)
    shared = arm != "sam_last_separate"
    opt = make_optimizer(task, policy, policy_seed, share_momentum=shared)
    start = time.perf_counter()
    summary = run_episode(task, opt)
    seconds = time.perf_counter() - start
    row = {
        "val_acc": summary["val_acc"],
        "val_loss": summary["val_loss"],
        "return": summary["return"],
        "diverged": summary["diverged"],
        "decisions": summary["decisions"],
        "sam_step_share": sam_step_share(opt.history, cfg.total_steps),
        "seconds": seconds,
        "share_momentum": shared,
        **_fit(task),
    }
    return row, opt.history


def _obs_dict(names: Sequence[str], entry: Optional[dict[str, Any]]) -> Optional[dict[str, float]]:
    if entry is None:
        return None
    return {n: float(v) for n, v in zip(names, entry["observation"])} | {"_progress": entry["signals"]["progress"]}


def run_task(cfg: TaskConfig, fmnist: Optional[Path], policy_seed: int, last_fraction: float) -> dict[str, Any]:
    names = observation_layout(CHOICES)["names"]
    arms, histories = {}, {}
    for arm in ARMS:
        arms[arm], histories[arm] = run_arm(cfg, fmnist, arm, policy_seed, last_fraction)
    # Observables: the first decision that saw validation metrics (after epoch 1) in the sgd run,
    # and the decision at which sam_last switched (identical to the sgd run up to there).
    first_val = next((h for h in histories["sgd"][1:] if h["signals"]["val_fresh"]), None)
    switch = next((h for h in histories["sam_last"] if h["choice"] == "sam"), None)

    # Pairing check: before the switch, sam_last and sam_last_separate ran exactly the sgd run.
    def same_prefix(arm: str) -> bool:
        return switch is None or all(
            a["signals"]["loss"] == b["signals"]["loss"]
            or (math.isnan(a["signals"]["loss"]) and math.isnan(b["signals"]["loss"]))
            for a, b in zip(histories["sgd"], histories[arm])
            if a["decision"] <= switch["decision"]
        )

    return {
        "seed": cfg.seed,
        "task": cfg.short(),
        "config": dataclasses.asdict(cfg),
        "arms": arms,
        "obs_after_epoch1": _obs_dict(names, first_val),
        "obs_at_switch": _obs_dict(names, switch),
        "sam_last_from_epoch": sam_from_epoch(cfg.epochs, last_fraction),
        "paired_prefix_identical": {arm: same_prefix(arm) for arm in SWITCH_ARMS},
    }


# ------------------------------------------------------------------------------ statistics
def t95(df: int) -> float:
    """Two-sided 95% Student-t quantile: ``benchmarks/table.py``'s table up to 30 degrees of freedom;
    beyond, the Cornish-Fisher expansion of t around the normal quantile (error < 2e-4 at df 31, where
    table.py's own fallback, 1.96, would make intervals 4% too narrow)."""
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959963984540054
    return (
        z
        + (z**3 + z) / (4 * df)
        + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
        + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
    )


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given the average of the ranks they span."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho (Pearson correlation of average ranks) and its two-sided p-value.

    The p-value uses the usual t approximation, t = r sqrt((n - 2) / (1 - r^2)), with a normal tail
    instead of Student's t with n - 2 degrees of freedom: fine for the n >= 100 tasks of this study
    (slightly small p for small n)."""
    rx, ry = average_ranks(np.asarray(x, dtype=float)), average_ranks(np.asarray(y, dtype=float))
    n = len(rx)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    if n < 3 or denom == 0.0:
        return math.nan, math.nan
    r = max(-1.0, min(1.0, float((rx * ry).sum()) / denom))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return r, math.erfc(abs(t) / math.sqrt(2.0))


def mean_ci(x: Sequence[float]) -> dict[str, float]:
    x = np.asarray(x, dtype=float)
    n = len(x)
    m = float(x.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": m, "lo": math.nan, "hi": math.nan, "sd": math.nan}
    sd = float(x.std(ddof=1))
    h = t95(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "lo": m - h, "hi": m + h, "sd": sd}


def diffs(rows: Sequence[dict[str, Any]], arm: str, base: str = "sgd", key: str = "val_acc", scale: float = 100.0):
    return np.array([scale * (r["arms"][arm][key] - r["arms"][base][key]) for r in rows])


def lr_bin(lr: float, edges: Sequence[float]) -> str:
    for lo, hi in zip(edges, edges[1:]):
        if lr < hi:
            return f"[{lo:.3g}, {hi:.3g})"
    return f"[{edges[-2]:.3g}, {edges[-1]:.3g}]"


def factor_values(rows, lr_edges) -> dict[str, list[str]]:
    c = [r["config"] for r in rows]
    return {
        "label_noise": [f"{x['label_noise']:.2f}" for x in c],
        "data": [x["data"] for x in c],
        "model": [x["model"] for x in c],
        "width": [f"{x['model']} {x['width']}" for x in c],
        "epochs": [str(x["epochs"]) for x in c],
        "lr": [lr_bin(x["lr"], lr_edges) for x in c],
        "n_train": [str(x["n_train"]) for x in c],
        "batch_size": [str(x["batch_size"]) for x in c],
        "interval": [str(x["interval"]) for x in c],
        # after the fact, not observable when deciding: how far SGD fitted its (noisy) training labels
        # beyond validation accuracy at the end of the budget
        "sgd_train_minus_val_acc (pt)": [
            _gap_bin(100 * (r["arms"]["sgd"]["train_acc"] - r["arms"]["sgd"]["val_acc"])) for r in rows
        ],
    }


def _gap_bin(gap: float) -> str:
    for lo, hi in ((-math.inf, -5), (-5, 0), (0, 5), (5, 15), (15, math.inf)):
        if gap < hi:
            return f"[{lo:g}, {hi:g})"
    return "?"


def _sort_key(v: str):
    try:
        return (0, float(v.strip("[").split(",")[0]))
    except ValueError:
        return (1, v)


def ridge_cv(X: np.ndarray, y: np.ndarray, alpha: float = 10.0, folds: int = 5, seed: int = 0) -> dict[str, float]:
    """Out-of-fold predictions of a standardised ridge regression; R^2 and what choosing by them gives."""
    n = len(y)
    fold = np.random.default_rng(seed).permutation(n) % folds
    pred = np.zeros(n)
    for k in range(folds):
        tr, te = fold != k, fold == k
        mu, sd = X[tr].mean(0), X[tr].std(0)
        sd[sd == 0] = 1.0
        A = (X[tr] - mu) / sd
        ym = y[tr].mean()
        w = np.linalg.solve(A.T @ A + alpha * np.eye(A.shape[1]), A.T @ (y[tr] - ym))
        pred[te] = ((X[te] - mu) / sd) @ w + ym
    r2 = 1.0 - float(((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    chosen = pred > 0
    return {
        "r2_out_of_fold": r2,
        "spearman_pred_vs_actual": spearman(pred, y)[0],
        "share_chosen": float(chosen.mean()),
        "gain_choosing_by_prediction": float(np.where(chosen, y, 0.0).mean()),
    }


def analyse(rows: list[dict[str, Any]]) -> dict[str, Any]:
    noise = diffs(rows, "sgd_reorder")
    out: dict[str, Any] = {"tasks": len(rows)}
    out["mean_acc"] = {a: 100 * float(np.mean([r["arms"][a]["val_acc"] for r in rows])) for a in ARMS}
    out["mean_train_acc"] = {a: 100 * float(np.mean([r["arms"][a]["train_acc"] for r in rows])) for a in ARMS}
    out["mean_return"] = {a: float(np.mean([r["arms"][a]["return"] for r in rows])) for a in ARMS}
    out["diverged"] = {a: int(sum(r["arms"][a]["diverged"] for r in rows)) for a in ARMS}
    out["sam_step_share"] = {a: float(np.mean([r["arms"][a]["sam_step_share"] for r in rows])) for a in ARMS}
    out["seconds"] = {a: float(np.sum([r["arms"][a]["seconds"] for r in rows])) for a in ARMS}
    steps = [r["config"]["epochs"] * max(1, r["config"]["n_train"] // r["config"]["batch_size"]) for r in rows]
    sgd_fit = np.array([r["arms"]["sgd"]["train_acc"] - r["arms"]["sgd"]["val_acc"] for r in rows])
    out["regime"] = {
        "total_steps_median": float(np.median(steps)),
        "total_steps_min": int(min(steps)),
        "total_steps_max": int(max(steps)),
        "sgd_train_acc_gt_90": float(np.mean([r["arms"]["sgd"]["train_acc"] > 0.9 for r in rows])),
        "sgd_train_minus_val_gt_5pt": float(np.mean(sgd_fit > 0.05)),
    }
    out["prefix_identical"] = {a: int(sum(r["paired_prefix_identical"][a] for r in rows)) for a in SWITCH_ARMS}
    out["share_momentum"] = {a: sorted({bool(r["arms"][a]["share_momentum"]) for r in rows}) for a in ARMS}
    comp = {}
    for arm, base in COMPARISONS:
        d = diffs(rows, arm, base)
        dl = diffs(rows, arm, base, key="val_loss", scale=1.0)
        dr = diffs(rows, arm, base, key="return", scale=1.0)
        comp[f"{arm} - {base}"] = {
            "acc": mean_ci(d),
            "loss": mean_ci(dl),
            "return": mean_ci(dr),
            "win_gt_1pt": float((d > 1.0).mean()),
            "loss_gt_1pt": float((d < -1.0).mean()),
            "tie_within_1pt": float((np.abs(d) <= 1.0).mean()),
            "median": float(np.median(d)),
            # spread of the difference beyond the spread of sgd vs sgd with another batch order
            "heterogeneity_sd": math.sqrt(max(0.0, float(d.var(ddof=1)) - float(noise.var(ddof=1)))),
            # best case: an oracle that picks this arm exactly where it beat sgd (noise included)
            "oracle_gain": float(np.maximum(d, 0.0).mean()),
        }
    out["paired"] = comp
    lrs = sorted(r["config"]["lr"] for r in rows)
    lo, hi = lrs[0], lrs[-1]
    edges = [0.01, 0.03, 0.07, 0.2] if lo >= 0.01 and hi <= 0.2 else list(np.quantile(lrs, [0, 1 / 3, 2 / 3, 1]))
    factors = factor_values(rows, edges)
    by = {}
    for fname, vals in factors.items():
        by[fname] = {}
        for v in sorted(set(vals), key=_sort_key):
            sel = [r for r, x in zip(rows, vals) if x == v]
            by[fname][v] = {f"{arm} - {base}": mean_ci(diffs(sel, arm, base)) for arm, base in BY_FACTOR}
            by[fname][v]["sgd_acc"] = 100 * float(np.mean([r["arms"]["sgd"]["val_acc"] for r in sel]))
    out["by_factor"] = by
    # Observable predictors: Spearman correlation of each observation feature with the difference.
    pred = {}
    for where, arm in (
        ("obs_after_epoch1", "sam"),
        ("obs_after_epoch1", "sam_last"),
        ("obs_at_switch", "sam_last"),
        ("obs_at_switch", "sam"),
    ):
        sel = [r for r in rows if r[where] is not None]
        d = diffs(sel, arm)
        names = [k for k in sel[0][where] if not k.startswith("prev_action") and not k.startswith("_")]
        corr = {}
        for k in names:
            x = np.array([r[where][k] for r in sel])
            if np.ptp(x) == 0:
                continue
            rho, p = spearman(x, d)
            corr[k] = {"rho": rho, "p": p}
        X = np.array([[r[where][k] for k in corr] for r in sel])
        factor_X = np.array(
            [
                [
                    math.log(r["config"]["lr"]),
                    r["config"]["label_noise"],
                    r["config"]["epochs"],
                    math.log(r["config"]["n_train"]),
                    math.log(r["config"]["batch_size"]),
                    float(r["config"]["data"] == "fmnist"),
                    float(r["config"]["model"] == "cnn"),
                ]
                for r in sel
            ]
        )
        pred[f"{arm} - sgd @ {where}"] = {
            "n": len(sel),
            "spearman": corr,
            "ridge_observation": ridge_cv(X, d),
            "ridge_task_factors": ridge_cv(factor_X, d),
            "ridge_both": ridge_cv(np.hstack([X, factor_X]), d),
        }
    out["predictors"] = pred
    # The same ridge on the noise difference: what "predicting" pure noise looks like.
    sel = [r for r in rows if r["obs_after_epoch1"] is not None]
    X = np.array([[v for k, v in r["obs_after_epoch1"].items() if not k.startswith(("prev_action", "_"))] for r in sel])
    keep = np.ptp(X, axis=0) > 0
    out["predictors"]["sgd_reorder - sgd @ obs_after_epoch1 (noise control)"] = {
        "n": len(sel),
        "ridge_observation": ridge_cv(X[:, keep], diffs(sel, "sgd_reorder")),
    }
    return out


# ------------------------------------------------------------------------------ running
def run_distribution(
    name: str, dist: TaskDistribution, n_tasks: int, seed: int, last_fraction: float, log_every: int = 20
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    fmnist = dist.resolved_fmnist_path()
    rows = []
    start = time.perf_counter()
    for e in range(n_tasks):
        cfg = dist.sample(g, seed * 100003 + e)
        row = run_task(cfg, fmnist, seed, last_fraction)
        row["episode"] = e
        rows.append(row)
        if log_every and (e + 1) % log_every == 0:
            d = diffs(rows, "sam")
            print(
                f"[{name}] {e + 1}/{n_tasks} tasks, {time.perf_counter() - start:.0f} s; "
                f"mean SAM-SGD so far {d.mean():+.2f} pt",
                flush=True,
            )
    wall = time.perf_counter() - start
    return {
        "name": name,
        "distribution": dist.describe(),
        "seed": seed,
        "tasks": n_tasks,
        "wall_s": wall,
        "summary": analyse(rows),
        "rows": rows,
    }


# ------------------------------------------------------------------------------ report
def _ci(c: dict[str, float], fmt: str = "+.2f") -> str:
    return f"{c['mean']:{fmt}} [{c['lo']:{fmt}}, {c['hi']:{fmt}}]"


def report(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    L = [
        "# Does SAM pay off in the meta-training task distribution?",
        "",
        "Written by `benchmarks/sam_payoff.py` (its docstring says how); every number below comes from this run.",
        "",
        f"* Command: `{meta['command']}` (from the repository root, `PYTHONPATH=.`)"
        + (
            f"; report rebuilt from its JSON with `{meta['report_rebuilt_with']}`"
            if meta.get("report_rebuilt_with")
            else ""
        ),
        f"* Hardware: {meta['hardware']}; torch {meta['torch']}, Python {meta['python']}; "
        f"total wall time {meta['wall_s']:.0f} s",
        f"* Seeds: task sampler `torch.Generator().manual_seed({meta['seed']})`, task `e` has seed "
        f"`{meta['seed']} * 100003 + e` (as `rlopt.meta.train_policy`); policy seed {meta['seed']}; "
        f"`sgd_reorder` re-seeds the batch order with `task seed + {REORDER_OFFSET}`; ridge folds seed 0.",
        f"* Arms (all run by `run_episode` with the `RLSwitchingOptimizer` that `train_policy._make_optimizer` builds, "
        f"choices sgd/sam, rho 0.05, "
        f"momentum 0.9, no weight decay): `sgd` = constant:sgd, `sam` = constant:sam, `sam_last` = SGD then "
        f"SAM from epoch `epochs - round({meta['last_fraction']} * epochs)` (a policy reading only the progress "
        f"feature), `sam_last_separate` = the same schedule with `share_momentum=False` (SAM's momentum buffer "
        f"starts at zero at the switch), `sgd_reorder` = constant:sgd with another batch order. "
        f"All arms but `sam_last_separate` "
        f"run rlopt's default `share_momentum=True` (`sgd` and `sam` share one momentum buffer per parameter, so "
        f"`sam_last`'s switch carries the velocity on, as `benchmarks/train.py`'s sam-last does); `_make_optimizer` "
        f"takes no `share_momentum`, so `sam_last_separate`'s optimizer is built with its arguments plus "
        f"`share_momentum=False`.",
        "* Noise of one comparison: `sgd_reorder - sgd` varies the batch order only. Initial weights and data are tied "
        "to the task seed in `build_task`, so initialisation noise is not measured separately (it would add to it).",
        "* Differences are in accuracy points (validation accuracy x 100, 256 clean validation examples, "
        "so one example = 0.39 pt), paired per task; 95% CIs are t-intervals over tasks. Spearman p-values use "
        "t = r sqrt((n-2)/(1-r^2)) with a normal tail.",
        "",
    ]
    for res in results:
        s = res["summary"]
        dd = res["distribution"]
        L += [
            f"## Distribution `{res['name']}` ({s['tasks']} tasks, {res['wall_s']:.0f} s)",
            "",
            "`TaskDistribution` fields: "
            + ", ".join(f"{k} {v}" for k, v in dd.items() if k not in ("note", "fmnist_path", "fmnist_available"))
            + f" (fmnist available: {dd['fmnist_available']}).",
            "",
            "| arm | mean val acc (%) | mean train acc (%, noisy labels) | mean return | SAM share of steps | "
            "diverged | CPU s (all tasks) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for a in ARMS:
            L.append(
                f"| {a} | {s['mean_acc'][a]:.2f} | {s['mean_train_acc'][a]:.2f} | {s['mean_return'][a]:.3f} | "
                f"{s['sam_step_share'][a]:.2f} | {s['diverged'][a]} | {s['seconds'][a]:.0f} |"
            )
        g = s["regime"]
        L += [
            "",
            f"Regime: median budget {g['total_steps_median']:.0f} steps (range {g['total_steps_min']}-"
            f"{g['total_steps_max']}); `sgd` ends with training accuracy (on its noisy labels) above 90% in "
            f"{100 * g['sgd_train_acc_gt_90']:.0f}% of tasks, and more than 5 pt above its validation accuracy in "
            f"{100 * g['sgd_train_minus_val_gt_5pt']:.0f}%.",
            "",
            f"Pairing check: in {s['prefix_identical']['sam_last']}/{s['tasks']} tasks the `sam_last` run's and in "
            f"{s['prefix_identical']['sam_last_separate']}/{s['tasks']} the `sam_last_separate` run's training "
            "losses before the switch equal the `sgd` run's exactly. `share_momentum` as run: "
            + ", ".join(f"`{a}` {'/'.join(str(v) for v in s['share_momentum'][a])}" for a in ARMS)
            + ".",
            "",
            "Paired differences (the `sgd_reorder - sgd` row is the noise of one comparison, and the "
            "`- sgd_reorder` rows compare against that second SGD run, a check on the luck of the first; "
            "`sam_last - sgd` is SAM's "
            "own effect in the last 30% with the momentum buffer carried on at the switch; `sam_last - "
            "sam_last_separate` is what sharing the buffer changes against restarting SAM's from zero):",
            "",
            "| comparison | acc diff, mean [95% CI] (pt) | median | wins > 1 pt | losses > 1 pt | within 1 pt | "
            "val loss diff [95% CI] | return diff [95% CI] | SD of acc diff | SD beyond noise | oracle gain (pt) |",
            "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|",
        ]
        for a, c in s["paired"].items():
            L.append(
                f"| {a} | {_ci(c['acc'])} | {c['median']:+.2f} | {100 * c['win_gt_1pt']:.0f}% | "
                f"{100 * c['loss_gt_1pt']:.0f}% | {100 * c['tie_within_1pt']:.0f}% | {_ci(c['loss'], '+.3f')} | "
                f"{_ci(c['return'], '+.3f')} | {c['acc']['sd']:.2f} | {c['heterogeneity_sd']:.2f} | "
                f"{c['oracle_gain']:.2f} |"
            )
        L += [
            "",
            "*SD beyond noise*: sqrt(var(arm - sgd) - var(sgd_reorder - sgd)), the spread of the per-task "
            "effect that is not batch-order noise (assumes SAM runs are as seed-sensitive as SGD runs). "
            "*Oracle gain*: mean of max(diff, 0), what picking the arm exactly where it won would add; "
            "compare the `sgd_reorder` row, where it is pure noise.",
            "",
            "### By task factor (paired acc differences, mean [95% CI], pt)",
            "",
        ]
        for fname, groups in s["by_factor"].items():
            cols = [f"{a} - {b}" for a, b in BY_FACTOR]
            L += [
                f"**{fname}**",
                "",
                "| value | n | sgd acc (%) | " + " | ".join(cols) + " |",
                "|---|---:|---:|" + "---|" * len(cols),
            ]
            for v, g in groups.items():
                L.append(
                    f"| {v} | {g[cols[0]]['n']} | {g['sgd_acc']:.1f} | " + " | ".join(_ci(g[c]) for c in cols) + " |"
                )
            L.append("")
        L += [
            "### Can the observation predict the difference?",
            "",
            "Spearman correlation of each observation feature (as the policy sees it) with the accuracy "
            "difference; features with |rho| >= 0.15 or p < 0.01 are listed (with ~20 features per block, "
            "p < 0.0025 survives a Bonferroni correction). Then a 5-fold cross-validated ridge regression "
            "(standardised, alpha 10) predicting the difference from the observation, from the task factors "
            "(log lr, noise, epochs, log n_train, log batch, data, model, which the policy does not see), and "
            "from both: out-of-fold R^2, and the mean gain (pt per task) of using the arm where the prediction is "
            "> 0.",
            "",
            "| difference / observation | n | notable features (rho, p) | R^2 obs | gain obs | R^2 factors | "
            "gain factors | R^2 both | gain both |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for key, p in s["predictors"].items():
            if "spearman" not in p:
                r = p["ridge_observation"]
                L.append(
                    f"| {key} | {p['n']} | - | {r['r2_out_of_fold']:.3f} | {r['gain_choosing_by_prediction']:+.2f} "
                    f"| - | - | - | - |"
                )
                continue
            notable = sorted(
                ((k, v) for k, v in p["spearman"].items() if abs(v["rho"]) >= 0.15 or v["p"] < 0.01),
                key=lambda kv: -abs(kv[1]["rho"]),
            )
            txt = "; ".join(f"{k} {v['rho']:+.2f} ({v['p']:.1g})" for k, v in notable) or "none"
            ro, rf, rb = p["ridge_observation"], p["ridge_task_factors"], p["ridge_both"]
            L.append(
                f"| {key} | {p['n']} | {txt} | {ro['r2_out_of_fold']:.3f} | {ro['gain_choosing_by_prediction']:+.2f} | "
                f"{rf['r2_out_of_fold']:.3f} | {rf['gain_choosing_by_prediction']:+.2f} | {rb['r2_out_of_fold']:.3f} | "
                f"{rb['gain_choosing_by_prediction']:+.2f} |"
            )
        L.append("")
    return "\n".join(L) + "\n"


def write_json(path: Path, meta: dict[str, Any], results: list[dict[str, Any]]) -> None:
    """``{"meta": ..., "results": [...]}``: summaries indented, one line per task row."""
    blocks = []
    for res in results:
        head = json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1, default=float)
        rows = ",\n".join(json.dumps(r, separators=(",", ":"), default=float) for r in res["rows"])
        blocks.append(head[:-2] + ',\n "rows": [\n' + rows + "\n]}")
    path.write_text('{"meta": ' + json.dumps(meta, indent=1) + ',\n"results": [\n' + ",\n".join(blocks) + "\n]}\n")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("sam_payoff", __doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=300, help="tasks of the default TaskDistribution()")
    ap.add_argument("--variant-tasks", type=int, default=100, help="tasks of the variant distribution (0: skip)")
    ap.add_argument("--variant-epochs", default="10,15,20", help="variant: epochs options")
    ap.add_argument("--variant-noise", default="0.2,0.4", help="variant: label_noise options")
    ap.add_argument(
        "--variant-set",
        action="append",
        default=[],
        metavar="FIELD=VALUES",
        help="variant: set a TaskDistribution field as train_policy --task does "
        "(TaskDistribution.with_overrides; repeatable)",
    )
    ap.add_argument("--variant-name", default="long-noisy", help="variant: name in the report")
    ap.add_argument("--seed", type=int, default=0, help="task sampler seed, as train_policy --seed")
    ap.add_argument("--last-fraction", type=float, default=0.3, help="sam_last: SAM for this fraction of the epochs")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=str(runs_path("sam_payoff")), help="output stem, .md and .json are added")
    ap.add_argument(
        "--from-json",
        default=None,
        metavar="PATH",
        help="no training: re-analyse the per-task rows of a saved .json and write the report to --out "
        "(default: train)",
    )
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        for res in saved["results"]:
            res["summary"] = analyse(res["rows"])
        saved["meta"]["report_rebuilt_with"] = shlex.join(["python", "-m", "benchmarks.sam_payoff", *argv])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(report(saved["results"], saved["meta"]))
        write_json(out.with_suffix(".json"), saved["meta"], saved["results"])
        print(f"rewrote {out.with_suffix('.md')} from {a.from_json}")
        return saved
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=".*runs without fused kernels.*")
    start = time.perf_counter()
    plan = [("default", TaskDistribution(), a.tasks)]
    if a.variant_tasks > 0:
        settings = [f"epochs={a.variant_epochs}", f"label_noise={a.variant_noise}", *a.variant_set]
        try:
            variant = TaskDistribution().with_overrides(settings)  # a later setting of a field wins
        except ValueError as err:
            ap.error(str(err))
        plan.append((f"{a.variant_name} ({', '.join(settings)})", variant, a.variant_tasks))
    results = [run_distribution(name, dist, n, a.seed, a.last_fraction) for name, dist, n in plan if n > 0]
    meta = {
        "command": shlex.join(["python", "-m", "benchmarks.sam_payoff", *argv]),
        "hardware": f"CPU ({platform.processor() or platform.machine()}, {_cpu_name()}), "
        f"{torch.get_num_threads()} torch thread",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "seed": a.seed,
        "last_fraction": a.last_fraction,
        "wall_s": time.perf_counter() - start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report(results, meta))
    write_json(out.with_suffix(".json"), meta, results)
    for res in results:
        c = res["summary"]["paired"]
        print(
            f"{res['name']}: {res['tasks']} tasks in {res['wall_s']:.0f} s; SAM-SGD {_ci(c['sam - sgd']['acc'])} pt, "
            f"SAM_last-SGD {_ci(c['sam_last - sgd']['acc'])} pt, SGD'-SGD {_ci(c['sgd_reorder - sgd']['acc'])} pt"
        )
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')} ({meta['wall_s']:.0f} s)")
    return {"meta": meta, "results": results}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
