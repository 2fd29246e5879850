"""Held-out evaluation of frozen switching policies on cheap CPU tasks, against paired controls.

``python -m benchmarks.policy_eval switch-sgd-sam path/to/candidate.pt --tasks 100 --seed 7
--task epochs=20,30,40 ...``   (about 8 s per task and policy on one CPU thread for overfit-mlp tasks)

Tasks are drawn as :func:`rlopt.meta.train_policy.train_policy` draws them (``TaskDistribution.sample(g,
seed * 100003 + e)``), with ``--task FIELD=VALUES`` overrides as there. Pick a ``--seed`` other
than the policies' meta-training seed: the task seeds then differ from every training task's.

Every task is run from scratch (same data, initial weights and batch order: ``build_task``) by:

* ``sgd`` and ``sam``: ``constant:sgd`` / ``constant:sam``;
* each policy, frozen (greedy), through the optimizer meta-training builds (an
  ``RLSwitchingOptimizer`` over ``("sgd", "sam")`` at the task's lr, interval and budget);
* ``random@<policy>``: a random policy that picks SAM with the share of steps that policy gave
  SAM on this task (the control for "any mix at that share would do as well").

The report gives, per arm, the final validation accuracy's mean difference to ``sgd`` and to
``sam`` (points, 95% t-intervals over tasks), each policy against its random control, the SAM
share of steps, and the gradient evaluations relative to SGD. Results: ``--out`` (.md, .json).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import rlopt
from rlopt.meta.tasks import TaskDistribution, build_task, run_episode
from rlopt.policies import RandomConfig

from .cli import parser, runs_path
from .sam_payoff import CHOICES, _ci, mean_ci, sam_step_share


def _run(cfg, fmnist, policy: Any, seed: int) -> dict[str, float]:
    task = build_task(cfg, fmnist)
    opt = rlopt.RLSwitchingOptimizer(
        task.model.parameters(),
        choices=list(CHOICES),
        lr=cfg.lr,
        policy=policy,
        interval=cfg.interval,
        seed=seed,
        total_steps=cfg.total_steps,
        total_epochs=cfg.epochs,
        train_policy=False,
    )
    out = run_episode(task, opt)
    return {
        "val_acc": out["val_acc"],
        "val_loss": out["val_loss"],
        "diverged": out["diverged"],
        "sam_share": sam_step_share(opt.history, cfg.total_steps),
    }


def evaluate(
    policies: dict[str, Any], dist: TaskDistribution, n_tasks: int, seed: int, log_every: int = 10
) -> list[dict[str, Any]]:
    """One row per task: ``{"seed", "task", "arms": {arm: {"val_acc", "val_loss", "sam_share", ...}}}``."""
    g = torch.Generator().manual_seed(seed)
    fmnist = dist.resolved_fmnist_path()
    rows, start = [], time.perf_counter()
    for e in range(n_tasks):
        cfg = dist.sample(g, seed * 100003 + e)
        arms = {"sgd": _run(cfg, fmnist, "constant:sgd", seed), "sam": _run(cfg, fmnist, "constant:sam", seed)}
        for name, policy in policies.items():
            arms[name] = run = _run(cfg, fmnist, policy, seed)
            share = run["sam_share"]
            arms[f"random@{name}"] = _run(cfg, fmnist, RandomConfig(probs=(1.0 - share, share)), seed + e)
        rows.append({"seed": cfg.seed, "task": cfg.short(), "arms": arms})
        if log_every and (e + 1) % log_every == 0:
            print(f"{e + 1}/{n_tasks} tasks, {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    def diff(arm: str, base: str) -> dict[str, float]:
        return mean_ci([100 * (r["arms"][arm]["val_acc"] - r["arms"][base]["val_acc"]) for r in rows])

    out = {}
    for arm in rows[0]["arms"]:
        share = np.mean([r["arms"][arm]["sam_share"] for r in rows])
        out[arm] = {
            "val_acc": float(np.mean([r["arms"][arm]["val_acc"] for r in rows])),
            "sam_share": float(share),
            "grad_evals_x_sgd": float(1.0 + share),
            "vs_sgd": diff(arm, "sgd"),
            "vs_sam": diff(arm, "sam"),
            "diverged": sum(r["arms"][arm]["diverged"] for r in rows),
        }
        if f"random@{arm}" in rows[0]["arms"]:
            out[arm]["vs_random_same_share"] = diff(arm, f"random@{arm}")
    return out


def report(summary: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Frozen switching policies on held-out CPU tasks",
        "",
        f"- command: `{meta['command']}`",
        f"- {meta['tasks']} tasks, task seeds `{meta['seed']} * 100003 + e`; distribution: "
        f"`{json.dumps(meta['distribution'])}`",
        f"- one CPU thread, torch {meta['torch']}, {meta['wall_s']:.0f} s",
        "- final validation accuracy; differences in points, mean [95% t-interval] over tasks",
        "",
        "| arm | val acc % | - sgd | - sam | - random at the same SAM share | SAM share of steps | "
        "gradient evaluations (x SGD) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, s in summary.items():
        rnd = _ci(s["vs_random_same_share"]) if "vs_random_same_share" in s else "-"
        lines.append(
            f"| {arm} | {100 * s['val_acc']:.2f} | {_ci(s['vs_sgd'])} | {_ci(s['vs_sam'])} | {rnd} | "
            f"{100 * s['sam_share']:.0f}% | {s['grad_evals_x_sgd']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("policy_eval", __doc__.splitlines()[0])
    ap.add_argument("policies", nargs="+", help="switching policies over sgd,sam: pretrained names or checkpoint paths")
    ap.add_argument("--tasks", type=int, default=50, help="held-out tasks")
    ap.add_argument("--seed", type=int, default=7, help="task seed (not the policies' meta-training seed)")
    ap.add_argument("--data", default="teacher,fmnist", help="task data sources, comma-separated")
    ap.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="FIELD=VALUES",
        help="override a TaskConfig field's options, as train_policy --task (repeatable)",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=str(runs_path("policy_eval")), help="output stem, .md and .json are added")
    a = ap.parse_args(argv)
    if a.tasks < 1:
        ap.error(f"--tasks must be at least 1, got {a.tasks}")
    try:
        dist = TaskDistribution(data=tuple(s for s in a.data.split(",") if s)).with_overrides(a.task)
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(a.threads)
    policies = {}
    for p in a.policies:
        policy = rlopt.load_policy(p)
        if tuple(policy.action_names) != CHOICES:
            ap.error(f"{p}: actions {list(policy.action_names)}, expected {list(CHOICES)}")
        name = Path(p).stem if Path(p).suffix else p
        if name in policies:
            ap.error(f"two policies named {name!r}: give checkpoints distinct file names")
        if not getattr(getattr(policy, "config", None), "deterministic_eval", True):
            ap.error(f"{p}: a frozen policy that samples its actions would make results depend on task order")
        policies[name] = policy
    start = time.perf_counter()
    rows = evaluate(policies, dist, a.tasks, a.seed)
    meta = {
        "command": "python -m benchmarks.policy_eval " + shlex.join(argv),
        "tasks": a.tasks,
        "seed": a.seed,
        "distribution": dist.describe(),
        "torch": torch.__version__,
        "wall_s": time.perf_counter() - start,
        "policies": a.policies,
    }
    summary = summarize(rows)
    md = report(summary, meta)
    print(md)
    stem = Path(a.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1, default=str)
    )
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return {"meta": meta, "summary": summary, "rows": rows}


if __name__ == "__main__":
    main()
