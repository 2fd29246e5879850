"""How fast does a learned update rule reach tuned Adam's loss, and what does its step cost?

``python -m benchmarks.learned_eval --out benchmarks/results/learned_eval``  (about 30-60 min on one
CPU thread of a busy 2-core machine; ``--no-speed`` / ``--no-tasks`` run one half)

Protocol.

* Tasks: :mod:`rlopt.learned.tasks`, full batch (deterministic losses). The rule's meta-training
  families (quadratic, rosenbrock, logistic, mlp) with *odd* seeds, which meta-training never
  draws (it uses even seeds), and the held-out families (mlp_deep, cnn). MLP/CNN tasks use the
  embedded Fashion-MNIST subset (``--data``).
* Baselines: SGD with momentum 0.9 and Adam (torch defaults), each tuned per family on the
  half-decade grid ``--lrs`` with the ``--tune-seeds`` (3 seeds); the score of a learning rate at
  horizon ``h`` is the mean over those seeds of ``log L_h`` (a non-finite loss scores +inf). The
  tuned learning rates are then run on 5 fresh ``--eval-seeds``, as are the learned rules at
  their shipped learning rate (never tuned here) and the controls.
* Horizons ``h`` = 1x, 2x, 5x, 10x the meta-training length ``--horizon`` (50 steps). Each run
  is 10x long; the baseline's learning rate is re-tuned for each ``h``.
* Metric: steps to reach tuned Adam's loss at ``h`` on the same task (``min k <= h`` with
  ``L_k <= L^adam_h``); Adam's own count is the first step it gets there. A rule *speeds up* a
  task when it reaches the target in fewer steps than Adam; a diverged run (a non-finite loss,
  or ``L_h > L_0``) fails. Also the paired difference ``log L_h(rule) - log L_h(Adam)`` with a
  95% t-interval over the tasks of a group.
* Cost: ``step()`` time (median of interleaved repeats, gradients preset, one thread; the
  thread's CPU time as well as wall time, since other jobs share the machine) and the
  bytes of optimizer state, for Adam (torch's default, foreach and fused) and the rule, at about
  1e4 .. 1e7 parameters (four equal tensors).

Writes ``results.json`` (everything), ``table.md``, ``curves.png``, ``speedup.png``, ``speed.png``
to ``--out`` (default: the git-ignored ``benchmarks/runs/learned_eval``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from rlopt.learned import LearnedOptimizer, LearnedRule, load_rule
from rlopt.learned.tasks import HELDOUT_FAMILIES, TRAIN_FAMILIES, load_fmnist, sample_task

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
]  # two-sided 95% Student t quantiles, df = 1..30


def _t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96


def run(family: str, seed: int, make_opt, steps: int, data) -> list[float]:
    """Losses ``L_0 .. L_steps`` of one optimizer on one task (nan after a non-finite loss)."""
    task = sample_task(family, seed, data)
    params = [torch.nn.Parameter(p) for p in task.init()]
    opt = make_opt(params)
    losses = []
    for k in range(steps + 1):
        opt.zero_grad()
        loss = task.loss(params)
        value = float(loss)
        losses.append(value)
        if not math.isfinite(value):
            losses += [float("nan")] * (steps - k)
            break
        if k == steps:
            break
        loss.backward()
        opt.step()
    return losses


def _maker(kind: str, lr: float, rule: Optional[LearnedRule] = None):
    if kind == "adam":
        return lambda ps: torch.optim.Adam(ps, lr=lr)
    if kind == "sgd":
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9)
    return lambda ps: LearnedOptimizer(ps, policy=rule, lr=lr)


def _log(v: float) -> float:
    """Tuning score of a final loss: its log; a non-finite loss is the worst score."""
    return math.log(v) if math.isfinite(v) and v > 0 else (-50.0 if v == 0 else math.inf)


def _thin(curve: Sequence[float], dense: int) -> list[float]:
    """Every step up to ``dense``, every 5th after; 4 significant digits (for results.json)."""
    idx = list(range(min(dense + 1, len(curve)))) + list(range(dense + 5, len(curve), 5))
    return [float(f"{curve[i]:.4g}") for i in idx]


def _diverged(losses: Sequence[float], h: int) -> bool:
    return not all(math.isfinite(x) for x in losses[: h + 1]) or losses[h] > losses[0]


def _steps_to(losses: Sequence[float], h: int, target: float) -> Optional[int]:
    if _diverged(losses, h):
        return None
    for k in range(h + 1):
        if losses[k] <= target:
            return k
    return None


def _ci(xs: list[float]) -> dict[str, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if len(xs) < 2:
        return {"mean": xs[0] if xs else float("nan"), "lo": float("nan"), "hi": float("nan"), "n": len(xs)}
    m, s = statistics.mean(xs), statistics.stdev(xs)
    half = _t95(len(xs) - 1) * s / math.sqrt(len(xs))
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(xs)}


def tasks_study(args, rules: dict[str, LearnedRule], data, progress) -> dict:
    H = args.horizon
    horizons = [H, 2 * H, 5 * H, 10 * H]
    steps = horizons[-1]
    families = list(TRAIN_FAMILIES) + list(HELDOUT_FAMILIES)
    tuning, tuned = {}, {}
    jobs = len(families) * 2 * len(args.lrs) * len(args.tune_seeds)
    bar = progress(jobs, "tuning")
    for fam in families:
        for kind in ("sgd", "adam"):
            for lr in args.lrs:
                for seed in args.tune_seeds:
                    losses = run(fam, seed, _maker(kind, lr), steps, data)
                    tuning[f"{fam}/{kind}/{lr:g}/{seed}"] = [losses[h] for h in horizons]
                    bar.update(1)
            for h_i, h in enumerate(horizons):
                scores = {
                    lr: statistics.mean(_log(tuning[f"{fam}/{kind}/{lr:g}/{s}"][h_i]) for s in args.tune_seeds)
                    for lr in args.lrs
                }
                tuned[f"{fam}/{kind}/{h}"] = min(args.lrs, key=lambda lr: (scores[lr], lr))
    bar.close()
    curves = {}
    bar = progress(len(families) * len(args.eval_seeds), "evaluation")
    for fam in families:
        for seed in args.eval_seeds:
            for kind in ("sgd", "adam"):
                for lr in sorted({tuned[f"{fam}/{kind}/{h}"] for h in horizons}):
                    curves[f"{fam}/{seed}/{kind}@{lr:g}"] = run(fam, seed, _maker(kind, lr), steps, data)
            for name, rule in rules.items():
                curves[f"{fam}/{seed}/{name}"] = run(fam, seed, _maker("rule", rule.lr, rule), steps, data)
            bar.update(1)
    bar.close()
    # metrics
    rows = []
    methods = ["sgd"] + list(rules)
    for fam in families:
        for seed in args.eval_seeds:
            for h in horizons:
                adam = curves[f"{fam}/{seed}/adam@{tuned[f'{fam}/adam/{h}']:g}"]
                target = adam[h]
                adam_steps = _steps_to(adam, h, target)
                for m in methods:
                    c = (
                        curves[f"{fam}/{seed}/sgd@{tuned[f'{fam}/sgd/{h}']:g}"]
                        if m == "sgd"
                        else curves[f"{fam}/{seed}/{m}"]
                    )
                    s = _steps_to(c, h, target)
                    ok = math.isfinite(c[h]) and c[h] > 0 and math.isfinite(target) and target > 0
                    rows.append(
                        {
                            "family": fam,
                            "group": "train" if fam in TRAIN_FAMILIES else "heldout",
                            "seed": seed,
                            "horizon": h,
                            "method": m,
                            "steps": s,
                            "adam_steps": adam_steps,
                            "diverged": _diverged(c, h),
                            "adam_diverged": _diverged(adam, h),
                            "sped_up": s is not None and adam_steps is not None and s < adam_steps,
                            "log_diff": math.log(c[h]) - math.log(target) if ok else float("nan"),
                        }
                    )
    return {
        "horizons": horizons,
        "tuned_lr": tuned,
        "tuning": tuning,
        "curves": curves,
        "rows": rows,
        "families": families,
    }


def thin_study(study: dict, dense: int) -> dict:
    """The study with its curves thinned for results.json (the metrics use the full curves)."""
    step_index = list(range(dense + 1)) + list(range(dense + 5, study["horizons"][-1] + 1, 5))
    return {**study, "curve_steps": step_index, "curves": {k: _thin(c, dense) for k, c in study["curves"].items()}}


def summarise(study: dict, methods: list[str]) -> list[dict]:
    out = []
    for group in ("train", "heldout"):
        for h in study["horizons"]:
            for m in methods:
                rs = [r for r in study["rows"] if r["group"] == group and r["horizon"] == h and r["method"] == m]
                if not rs:
                    continue
                ratios = [
                    (r["adam_steps"] / r["steps"] if r["steps"] else (math.inf if r["steps"] == 0 else 0.0))
                    if r["steps"] is not None and r["adam_steps"] is not None
                    else 0.0
                    for r in rs
                ]
                out.append(
                    {
                        "group": group,
                        "horizon": h,
                        "method": m,
                        "tasks": len(rs),
                        "sped_up": sum(r["sped_up"] for r in rs),
                        "reached": sum(r["steps"] is not None for r in rs),
                        "diverged": sum(r["diverged"] for r in rs),
                        "adam_diverged": sum(r["adam_diverged"] for r in rs),
                        "median_speedup": statistics.median(ratios),
                        "log_diff": _ci([r["log_diff"] for r in rs]),
                    }
                )
    return out


def per_family(study: dict, methods: list[str], h: int) -> list[dict]:
    out = []
    for fam in study["families"]:
        for m in methods:
            rs = [r for r in study["rows"] if r["family"] == fam and r["horizon"] == h and r["method"] == m]
            out.append(
                {
                    "family": fam,
                    "method": m,
                    "tasks": len(rs),
                    "sped_up": sum(r["sped_up"] for r in rs),
                    "diverged": sum(r["diverged"] for r in rs),
                    "log_diff": _ci([r["log_diff"] for r in rs]),
                    "adam_lr": study["tuned_lr"][f"{fam}/adam/{h}"],
                    "sgd_lr": study["tuned_lr"][f"{fam}/sgd/{h}"],
                }
            )
    return out


# --------------------------------------------------------------------------- cost
def speed_study(sizes: Sequence[int], rule: LearnedRule, repeats: int, progress) -> list[dict]:
    rows = []
    bar = progress(len(sizes), "speed")
    for n in sizes:
        makers = {
            "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
            "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
            "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
            "learned": lambda ps: LearnedOptimizer(ps, policy=rule),
        }
        opts = {}
        g = torch.Generator().manual_seed(0)
        for name, make in makers.items():
            ps = [torch.nn.Parameter(torch.randn(n // 4, generator=g)) for _ in range(4)]
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
            opts[name] = make(ps)
            opts[name].step()  # state allocated
        reps = max(3, min(repeats, int(repeats * 1e6 / n))) if n > 1e6 else repeats
        times = {k: [] for k in opts}
        cpu = {k: [] for k in opts}
        for _ in range(reps):
            for name, opt in opts.items():
                c, t = time.thread_time(), time.perf_counter()
                opt.step()
                times[name].append(time.perf_counter() - t)
                cpu[name].append(time.thread_time() - c)
        for name, opt in opts.items():
            state = sum(
                v.numel() * v.element_size()
                for st in opt.state.values()
                for v in st.values()
                if isinstance(v, torch.Tensor)
            )
            rows.append(
                {
                    "params": 4 * (n // 4),
                    "optimizer": name,
                    "step_ms": 1e3 * statistics.median(times[name]),
                    "step_ms_min": 1e3 * min(times[name]),
                    "cpu_ms": 1e3 * statistics.median(cpu[name]),
                    "state_bytes": state,
                    "repeats": reps,
                }
            )
        del opts
        bar.update(1)
    bar.close()
    return rows


# --------------------------------------------------------------------------- report
def _fmt_ci(d):
    if not math.isfinite(d["lo"]):
        return f"{d['mean']:+.2f}" if math.isfinite(d["mean"]) else "-"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def write_report(out: Path, result: dict) -> None:
    lines = [
        f"# learned_eval: {result['policy']} vs tuned Adam and SGD-momentum",
        "",
        f"commit {result['commit']}, {result['hardware']}, torch {result['torch']}; "
        f"horizon T = {result['horizon']}, tuning seeds {result['tune_seeds']}, eval seeds {result['eval_seeds']}",
        "",
    ]
    if "summary" in result:
        lines += [
            "## Steps to reach tuned Adam's loss at horizon h (per task = family x eval seed)",
            "",
            "| group | h | method | sped up | reached | diverged (Adam) | median speed-up "
            "| log L_h - log L_h(Adam), mean [95% CI] |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in result["summary"]:
            lines.append(
                f"| {r['group']} | {r['horizon']} | {r['method']} | {r['sped_up']}/{r['tasks']} | "
                f"{r['reached']}/{r['tasks']} | {r['diverged']} ({r['adam_diverged']}) | "
                f"{r['median_speedup']:.2f} | {_fmt_ci(r['log_diff'])} |"
            )
        lines += [
            "",
            f"## Per family at h = {result['horizon']} (tuned lrs: Adam / SGD)",
            "",
            "| family | method | sped up | diverged | log-loss diff [95% CI] | Adam lr | SGD lr |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in result["per_family"]:
            lines.append(
                f"| {r['family']} | {r['method']} | {r['sped_up']}/{r['tasks']} | {r['diverged']} | "
                f"{_fmt_ci(r['log_diff'])} | {r['adam_lr']:g} | {r['sgd_lr']:g} |"
            )
    if "speed" in result:
        lines += [
            "",
            "## Step time and optimizer state (one thread; median of interleaved repeats; CPU ms = the "
            "thread's CPU time, robust to other jobs on a shared machine)",
            "",
            "| params | optimizer | CPU ms (median) | x Adam (CPU) | wall ms (median) | wall ms (min) | x Adam (wall) "
            "| state MB | x Adam state |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        base = {r["params"]: r for r in result["speed"] if r["optimizer"] == "adam"}
        for r in result["speed"]:
            b = base[r["params"]]
            lines.append(
                f"| {r['params']:.0e} | {r['optimizer']} | {r['cpu_ms']:.3f} | {r['cpu_ms'] / b['cpu_ms']:.2f} | "
                f"{r['step_ms']:.3f} | {r['step_ms_min']:.3f} | {r['step_ms'] / b['step_ms']:.2f} | "
                f"{r['state_bytes'] / 1e6:.2f} | {r['state_bytes'] / max(b['state_bytes'], 1):.2f} |"
            )
    if "es_vs_td3" in result:
        c = result["es_vs_td3"]
        lines += [
            "",
            "## Meta-training: ES against TD3 (validation meta-objective, mean log(L_t/L_0) over 50 steps "
            "on 8 fixed training-family tasks; lower is better)",
            "",
            "| learner | best validation | training | wall time (s) |",
            "|---|---|---|---|",
            f"| ES | {c['es_best']:.3f} | {c['es'][-1]['iteration'] if c['es'] else 0} iterations "
            f"| {c['es_elapsed_s']:.0f} |",
            f"| TD3 | {c['td3_best']:.3f} | {c['td3_episodes']} episodes, {c['td3_updates']} updates | "
            f"{c['td3'][-1]['elapsed_s'] if c['td3'] else 0:.0f} |",
        ]
    (out / "table.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, result: dict, methods: list[str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if "study" in result:
        study = result["study"]  # full curves
        fams = study["families"]
        H10 = study["horizons"][-1]
        fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
        for ax, fam in zip(axes.flat, fams):
            series = {
                "adam": f"adam@{study['tuned_lr'][f'{fam}/adam/{H10}']:g}",
                "sgd-m": f"sgd@{study['tuned_lr'][f'{fam}/sgd/{H10}']:g}",
                **{m: m for m in methods if m != "sgd"},
            }
            for label, key in series.items():
                cs = torch.tensor([study["curves"][f"{fam}/{s}/{key}"] for s in result["eval_seeds"]])
                rel = (cs / cs[:, :1]).clamp(min=1e-12)
                med = rel.log().nan_to_num(nan=math.log(1e3)).median(0).values.exp()
                ax.plot(med.numpy(), label=label, lw=1.2)
            for h in study["horizons"][:-1]:
                ax.axvline(h, color="0.85", lw=0.8, zorder=0)
            ax.set_yscale("log")
            ax.set_title(f"{fam} ({'held-out family' if fam in HELDOUT_FAMILIES else 'training family'})", fontsize=9)
            ax.set_xlabel("step")
        axes.flat[0].set_ylabel("median L_k / L_0")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(
            "Loss curves on held-out tasks (median over 5 eval seeds; baselines tuned for 10x horizon)", fontsize=10
        )
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=80)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        for ax, group in zip(axes, ("train", "heldout")):
            for m in methods:
                rs = [r for r in result["summary"] if r["group"] == group and r["method"] == m]
                ax.plot([r["horizon"] for r in rs], [r["sped_up"] / r["tasks"] for r in rs], "o-", label=m)
            ax.axhline(0.5, color="0.6", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_xticks(study["horizons"], [str(h) for h in study["horizons"]])
            ax.set_title(
                {"train": "training families, held-out seeds", "heldout": "held-out families"}[group], fontsize=9
            )
            ax.set_xlabel("horizon h (steps)")
        axes[0].set_ylabel("fraction of tasks faster than tuned Adam")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "speedup.png", dpi=80)
        plt.close(fig)
    if "speed" in result:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name in sorted({r["optimizer"] for r in result["speed"]}):
            rs = [r for r in result["speed"] if r["optimizer"] == name]
            ax.plot([r["params"] for r in rs], [r["cpu_ms"] for r in rs], "o-", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel("step() CPU ms (median, one thread)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "speed.png", dpi=80)
        plt.close(fig)


def es_vs_td3(out: Path, es_state: str, td3_log: str) -> dict:
    """Validation meta-objective against training wall time for ES (its ``.state.pt``) and TD3
    (its ``.json``); writes ``es_vs_td3.png``. ES validates every ``--eval-every`` iterations; its
    times are interpolated from the total at the last save (iterations cost alike)."""
    sd = torch.load(es_state, weights_only=True)
    hist = sd["trainer"]["history"]
    per_it = float(sd["elapsed_s"]) / max(len(hist), 1)
    es = [
        {"iteration": r["iteration"], "elapsed_s": round(r["iteration"] * per_it, 1), "validation": r["validation"]}
        for r in hist
        if "validation" in r
    ]
    with open(td3_log) as f:
        td3 = json.load(f)
    res = {
        "es": es,
        "es_elapsed_s": float(sd["elapsed_s"]),
        "es_best": float(sd["best_objective"]),
        "td3": td3["history"],
        "td3_best": td3["best_validation"],
        "td3_episodes": td3["episodes"],
        "td3_updates": td3["updates"],
    }
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["elapsed_s"] / 60 for r in es], [r["validation"] for r in es], "o-", label="ES (antithetic)")
        ax.plot(
            [r["elapsed_s"] / 60 for r in td3["history"]],
            [r["validation"] for r in td3["history"]],
            "s-",
            label="TD3 (coordinate-wise)",
        )
        ax.set_xlabel("training wall time (min, shared CPU)")
        ax.set_ylabel("validation meta-objective (lower is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "es_vs_td3.png", dpi=80)
        plt.close(fig)
    except ImportError:
        pass
    return res


def _progress(enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None

    def make(total, desc):
        if tqdm is None or not enabled:

            class _Null:
                def update(self, n=1):
                    pass

                def close(self):
                    pass

            return _Null()
        return tqdm(total=total, desc=desc)

    return make


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.learned_eval",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--policy", default="learned-es", help="the rule under test (registry name or path)")
    ap.add_argument(
        "--controls",
        default="untrained",
        help="comma-separated extra rules: 'untrained' (the rule's initial weights) and/or name=path",
    )
    ap.add_argument("--data", default="rlopt/meta/data/fmnist_subset.npz", help="Fashion-MNIST subset (.npz)")
    ap.add_argument("--horizon", type=int, default=50, help="meta-training horizon T")
    ap.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1", help="lr grid of the baselines")
    ap.add_argument("--tune-seeds", default="1,3,5", help="task seeds for tuning the baselines (odd: unseen)")
    ap.add_argument("--eval-seeds", default="7,9,11,13,15", help="fresh task seeds for the evaluation (odd)")
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7", help="parameter counts of the cost study")
    ap.add_argument("--repeats", type=int, default=30, help="timed steps per optimizer (fewer above 1e6)")
    ap.add_argument("--no-speed", action="store_true", help="skip the cost study")
    ap.add_argument("--no-tasks", action="store_true", help="skip the task study")
    ap.add_argument("--es-state", default=None, help="ES trainer state (.state.pt) for the ES-vs-TD3 curve")
    ap.add_argument("--td3-log", default=None, help="TD3 training log (.json) for the ES-vs-TD3 curve")
    ap.add_argument("--out", default="benchmarks/runs/learned_eval", help="output folder")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.tune_seeds = [int(x) for x in args.tune_seeds.split(",")]
    args.eval_seeds = [int(x) for x in args.eval_seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = _progress(not args.no_progress)
    rule = load_rule(args.policy)
    rules = {"learned": rule}
    for c in [c for c in args.controls.split(",") if c]:
        if c == "untrained":
            rules["untrained"] = LearnedRule(
                rule.spec, rule.spec.init_theta(torch.Generator().manual_seed(0)), lr=rule.lr
            )
        else:
            name, path = c.split("=", 1)
            rules[name] = load_rule(path)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    result = {
        "policy": args.policy,
        "rule_lr": rule.lr,
        "commit": commit,
        "torch": torch.__version__,
        "hardware": f"CPU {platform.machine()} ({os.cpu_count()} cores, shared), 1 thread",
        "horizon": args.horizon,
        "tune_seeds": args.tune_seeds,
        "eval_seeds": args.eval_seeds,
        "lrs": args.lrs,
    }
    start = time.perf_counter()
    methods = ["sgd"] + list(rules)
    if not args.no_tasks:
        data = load_fmnist(args.data) if args.data and os.path.isfile(args.data) else None
        result["data"] = "fmnist" if data is not None else "teacher"
        study = tasks_study(args, rules, data, progress)
        result["summary"] = summarise(study, methods)
        result["per_family"] = per_family(study, methods, args.horizon)
        plot(out, {**result, "study": study}, methods)
        result["study"] = thin_study(study, args.horizon)
    if not args.no_speed:
        result["speed"] = speed_study([int(float(s)) for s in args.sizes.split(",")], rule, args.repeats, progress)
    if args.es_state and args.td3_log:
        result["es_vs_td3"] = es_vs_td3(out, args.es_state, args.td3_log)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    with open(out / "results.json", "w") as f:
        json.dump(result, f, allow_nan=True, separators=(",", ":"), default=str)
    write_report(out, result)
    plot(out, {k: v for k, v in result.items() if k != "study"}, methods)
    print((out / "table.md").read_text())
    return result


if __name__ == "__main__":
    main()
