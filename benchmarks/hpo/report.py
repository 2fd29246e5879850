"""Metrics and figures of a set of search runs.

- regret: oracle value of the incumbent minus the best oracle value; *normalised* regret divides it
  by (median configuration - best configuration) of the task, so tasks of different scales average.
- mean rank: per task and budget, samplers ranked by their mean regret over seeds (ties share the
  average rank), then averaged over tasks; a Friedman test over tasks says whether the ranks differ
  at all; a Wilcoxon signed-rank test over tasks compares two samplers' mean normalised regrets.
- paired differences: sampler minus baseline in normalised regret, per task (mean over seeds), with a
  95% bootstrap interval over tasks.
- evaluations to reach within ``delta`` (normalised) of the oracle: median over runs (runs that never
  reach it count as budget + 1).
- sampler time per trial: mean seconds per evaluation spent outside the table look-up.
"""

from __future__ import annotations

import numpy as np


def ranks(mean_regret: dict[str, float]) -> dict[str, float]:
    from scipy.stats import rankdata

    names = list(mean_regret)
    r = rankdata([mean_regret[n] for n in names])
    return dict(zip(names, r))


def bootstrap_ci(x: np.ndarray, n_boot: int = 10000, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    means = rng.choice(x, size=(n_boot, len(x)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(
    norm: dict[str, dict[str, np.ndarray]], budgets: list[int], baselines=("random", "tpe"), focus=None
) -> dict:
    """``norm[task][sampler]``: (seeds, budget) normalised regret curves. Returns the tables as dicts."""
    from scipy.stats import friedmanchisquare, wilcoxon

    tasks = sorted(norm)
    samplers = list(next(iter(norm.values())))
    out = {"budgets": {}}
    for b in budgets:
        per_task = {t: {s: float(norm[t][s][:, b - 1].mean()) for s in samplers} for t in tasks}
        rk = {t: ranks(per_task[t]) for t in tasks}
        mean_rank = {s: float(np.mean([rk[t][s] for t in tasks])) for s in samplers}
        mean_norm = {s: float(np.mean([per_task[t][s] for t in tasks])) for s in samplers}
        entry = {"mean_rank": mean_rank, "mean_norm_regret": mean_norm}
        mat = np.array([[per_task[t][s] for t in tasks] for s in samplers])
        if len(tasks) >= 3 and len(samplers) >= 3:
            entry["friedman_p"] = float(friedmanchisquare(*mat).pvalue)
        comps = {}
        for s in focus or samplers:
            for base in baselines:
                if base == s or base not in samplers:
                    continue
                d = np.array([per_task[t][s] - per_task[t][base] for t in tasks])
                lo, hi = bootstrap_ci(d)
                p = float(wilcoxon(d).pvalue) if np.any(d != 0) and len(d) >= 5 else float("nan")
                comps[f"{s} - {base}"] = {
                    "mean_diff": float(d.mean()),
                    "ci95": [lo, hi],
                    "wilcoxon_p": p,
                    "wins": int((d < 0).sum()),
                    "losses": int((d > 0).sum()),
                }
        entry["paired"] = comps
        out["budgets"][b] = entry
    return out


def evals_to_reach(curves: np.ndarray, delta: float) -> float:
    """Median over runs of the first evaluation (1-based) with normalised regret <= delta."""
    hit = curves <= delta
    first = np.where(hit.any(1), hit.argmax(1) + 1, curves.shape[1] + 1)
    return float(np.median(first))


def plot_curves(norm, costs, samplers, path: str, title: str) -> None:
    """Mean normalised best-so-far regret against evaluations and against cumulative sampler time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted(norm)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("tab20")
    for k, s in enumerate(samplers):
        curve = np.mean([norm[t][s].mean(0) for t in tasks], 0)
        secs = np.mean([np.cumsum(costs[t][s], 1).mean(0) for t in tasks], 0)
        x = np.arange(1, len(curve) + 1)
        style = "-" if s.startswith(("q-", "reinforce", "meta")) else "--"
        axes[0].plot(x, curve, style, color=cmap(k), label=s, lw=1.5)
        axes[1].plot(np.maximum(secs, 1e-5), curve, style, color=cmap(k), label=s, lw=1.5)
    for ax in axes:
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_ylabel("normalised regret (mean over tasks)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("evaluations")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("cumulative sampler time [s] (noisy: shared 2-core CPU)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
