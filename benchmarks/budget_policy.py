"""Pick a budgeted SAM-switching policy by measurement against SAM-late at the same budget.

At a fixed ``compute_budget`` every candidate is scored as :class:`rlopt.rewards.FinalReward` pays
it: on each task, ``10 * (acc - acc_ref) + log(L_ref / L)`` from the final validation accuracy
``acc`` and loss ``L``, where the reference is the rule ``"sam-late"`` at the same budget on the
same task (same initial weights, batches and augmentation). 0: as good as SAM-late.

1. **Tune** (CMA-ES, the ``cmaes`` package) a small parameterised rule on training tasks: AE-SAM's
   gradient-norm rule (:class:`rlopt.policies.rules.AdaptiveSamConfig`: ``threshold`` moving
   linearly to ``threshold_end`` over the run, EMA ``decay``) under the budget, which caps what
   it spends. SAM-late's references on the training tasks are computed once.
2. **Evaluate** on held-out tasks (other task seeds): SAM-late, random at the budget's share
   (``ss-sam``), AE-SAM with its defaults, the tuned rule, and any policy checkpoints given with
   ``--policy`` (e.g. a PPO meta-trained with ``--reward final``); each against SAM-late, paired,
   mean and 95% t-interval over tasks.

The tuned rule is saved as a policy checkpoint (``tuned.pt`` in ``--out``, loadable with ``rlopt.load_policy``);
whether it deserves a registry entry is for the reader of ``budget_policy.md`` to decide.

Usage::

    python -m benchmarks.budget_policy --budget 0.3 --out benchmarks/results/budget_policy
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .cli import parser, runs_path
from .gate import _commit, t_interval

#: the cheap end of the ResNet preset (tuning runs many episodes)
DEFAULT_TASKS = ("resnet_width=8", "resnet_n_train=500,1000", "resnet_epochs=12")


def _policy_arg(spec: Any):
    from rlopt.policies.rules import AdaptiveSamConfig

    if isinstance(spec, dict) and spec.get("kind") == "ae-sam":
        return AdaptiveSamConfig(threshold=spec["threshold"], threshold_end=spec["threshold_end"], decay=spec["decay"])
    return spec  # a name ("sam-late", "ss-sam", "ae-sam") or a checkpoint path


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One task trained by one policy under the budget: final validation metrics and spending."""
    from rlopt import RLSwitchingOptimizer
    from rlopt.meta.tasks import TaskConfig, build_task, run_episode

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*runs without fused kernels.*")
    cfg = TaskConfig(**job["config"])
    task = build_task(cfg, cifar10_path=job["cifar10"])
    kw = {"weight_decay": cfg.weight_decay} if cfg.weight_decay else {}
    opt = RLSwitchingOptimizer(
        task.model.parameters(),
        choices=["sgd", "sam"],
        policy=_policy_arg(job["policy"]),
        lr=cfg.lr,
        interval=cfg.interval,
        seed=cfg.seed,
        total_steps=cfg.total_steps,
        total_epochs=cfg.epochs,
        process_group=None,
        train_policy=False,
        compute_budget=job["budget"],
        **kw,
    )
    t0 = time.perf_counter()
    out = run_episode(task, opt)
    return {
        "key": job["key"],
        "val_loss": out["val_loss"],
        "val_acc": out["val_acc"],
        "budget_used": opt.history[-1].get("budget_used", math.nan),
        "sam_share": out["action_share"]["sam"],
        "seconds": time.perf_counter() - t0,
    }


def score(res: dict[str, Any], ref: dict[str, Any]) -> float:
    """What :class:`rlopt.rewards.FinalReward` pays at the end (defaults acc=10, loss=1)."""
    return 10.0 * (res["val_acc"] - ref["val_acc"]) + math.log(
        max(ref["val_loss"], 1e-12) / max(res["val_loss"], 1e-12)
    )


def _decode(x: Sequence[float]) -> dict[str, Any]:
    return {
        "kind": "ae-sam",
        "threshold": round(float(x[0]), 4),
        "threshold_end": round(float(x[1]), 4),
        "decay": round(float(1.0 / (1.0 + math.exp(-x[2]))), 4),
    }


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    from rlopt.meta.tasks import TaskDistribution

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser("budget_policy", __doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=0.3, help="compute budget of every run")
    ap.add_argument("--interval", type=int, default=2, help="decision interval in steps")
    ap.add_argument("--train-tasks", type=int, default=4, help="tasks the rule is tuned on (task seed 1)")
    ap.add_argument("--test-tasks", type=int, default=10, help="held-out tasks (task seed 2)")
    ap.add_argument("--popsize", type=int, default=6, help="CMA-ES population")
    ap.add_argument("--generations", type=int, default=4, help="CMA-ES generations (0: no tuning)")
    ap.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also evaluate this policy checkpoint on the held-out tasks (repeatable)",
    )
    ap.add_argument(
        "--task",
        action="append",
        default=None,
        metavar="FIELD=VALUES",
        help=f"TaskDistribution overrides of the resnet preset (default: {' '.join(DEFAULT_TASKS)})",
    )
    ap.add_argument("--workers", type=int, default=2, help="processes (one torch thread each)")
    ap.add_argument("--out", default=str(runs_path("budget_policy")), help="output folder (default %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)

    overrides = list(DEFAULT_TASKS if a.task is None else a.task) + [f"interval={a.interval}"]
    dist = TaskDistribution.preset("resnet").with_overrides(overrides)
    cifar10 = dist.resolved_cifar10_path()
    cifar10 = None if cifar10 is None else os.fspath(cifar10)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def tasks(n: int, task_seed: int):
        g = torch.Generator().manual_seed(task_seed)
        return [dataclasses.asdict(dist.sample(g, 1000 * task_seed + i)) for i in range(n)]

    train, test = tasks(a.train_tasks, 1), tasks(a.test_tasks, 2)
    cache_file = out / "runs.jsonl"
    cache: dict[str, dict[str, Any]] = {}
    if cache_file.is_file():
        for line in cache_file.read_text().splitlines():
            r = json.loads(line)
            cache[r["key"]] = r
    pool = mp.get_context("spawn").Pool(max(1, a.workers))
    bar = None
    if not a.no_progress:
        from tqdm.auto import tqdm

        total = a.train_tasks * (1 + a.popsize * a.generations) + a.test_tasks * (4 + len(a.policy))
        bar = tqdm(total=total, desc="budget_policy", unit="run")

    def run_all(specs: list[Any], cfgs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        jobs = []
        for spec in specs:
            for cfg in cfgs:
                key = json.dumps([spec, cfg["seed"], a.budget, cfg["interval"]], sort_keys=True)
                jobs.append({"key": key, "policy": spec, "config": cfg, "budget": a.budget, "cifar10": cifar10})
        todo = [j for j in jobs if j["key"] not in cache]
        if bar is not None:
            bar.update(len(jobs) - len(todo))
        with cache_file.open("a") as f:
            for r in pool.imap_unordered(run_one, todo):
                cache[r["key"]] = r
                f.write(json.dumps(r) + "\n")
                f.flush()
                if bar is not None:
                    bar.update()
        return [[cache[jobs[i * len(cfgs) + j]["key"]] for j in range(len(cfgs))] for i in range(len(specs))]

    start = time.perf_counter()
    ref_train = run_all(["sam-late"], train)[0]
    history = []
    best = {"spec": {"kind": "ae-sam", "threshold": 0.0, "threshold_end": None, "decay": 0.9}, "score": -math.inf}
    if a.generations > 0:
        from cmaes import CMA

        es = CMA(
            mean=np.array([0.0, 0.0, 2.2]),
            sigma=1.0,
            population_size=a.popsize,
            seed=0,
            bounds=np.array([[-3.0, 3.0], [-3.0, 3.0], [-1.0, 5.0]]),
        )
        for gen in range(a.generations):
            xs = [es.ask() for _ in range(a.popsize)]
            specs = [_decode(x) for x in xs]
            results = run_all(specs, train)
            scores = [float(np.mean([score(r, ref) for r, ref in zip(res, ref_train)])) for res in results]
            es.tell([(x, -s) for x, s in zip(xs, scores)])
            for spec, s, res in zip(specs, scores, results):
                history.append(
                    {
                        "generation": gen,
                        "spec": spec,
                        "train_score": s,
                        "sam_share": float(np.mean([r["sam_share"] for r in res])),
                    }
                )
                if s > best["score"]:
                    best = {"spec": spec, "score": s}
    arms = {
        "sam-late": "sam-late",
        "random (ss-sam)": "ss-sam",
        "ae-sam (defaults)": "ae-sam",
        "ae-sam (tuned)": best["spec"],
    }
    arms.update(dict(p.split("=", 1) for p in a.policy))
    results = dict(zip(arms, run_all(list(arms.values()), test)))
    pool.close()
    if bar is not None:
        bar.close()
    ref = results["sam-late"]
    table = {}
    for name, res in results.items():
        acc = [100.0 * (r["val_acc"] - q["val_acc"]) for r, q in zip(res, ref)]
        loss = [q["val_loss"] - r["val_loss"] for r, q in zip(res, ref)]
        sc = [score(r, q) for r, q in zip(res, ref)]
        table[name] = {
            "acc_vs_sam_late": t_interval(acc),
            "loss_vs_sam_late": t_interval(loss),
            "score": t_interval(sc),
            "val_acc": float(np.mean([r["val_acc"] for r in res])),
            "budget_used": float(np.mean([r["budget_used"] for r in res])),
            "sam_share": float(np.mean([r["sam_share"] for r in res])),
        }
    wall = time.perf_counter() - start
    summary = {
        "budget": a.budget,
        "interval": a.interval,
        "best": best,
        "history": history,
        "table": table,
        "train_tasks": train,
        "test_tasks": test,
        "command": "python -m benchmarks.budget_policy " + " ".join(argv),
        "commit": _commit(),
        "wall_s": wall,
        "hardware": f"CPU ({platform.machine()}, {os.cpu_count()} cores shared, nice 19), {a.workers} "
        f"processes x 1 torch thread, torch {torch.__version__}",
    }
    (out / "budget_policy.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"# Budgeted policies against SAM-late at budget {a.budget}",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Commit {summary['commit']}; {summary['hardware']}; {wall / 60:.1f} min (cached runs not counted). "
        f"Tasks: resnet preset with {' '.join(overrides)}; tuning on {a.train_tasks} tasks (task seed 1), "
        f"evaluation on {a.test_tasks} held-out tasks (task seed 2).",
        "",
        f"Tuned rule (CMA-ES, population {a.popsize}, {a.generations} generations): `{best['spec']}`, "
        f"training score {best['score']:+.3f}.",
        "",
        "Held-out tasks, each arm minus SAM-late at the same budget (paired; mean [95% t-interval] over "
        "tasks); score = 10 * accuracy difference + log-ratio of the validation losses (FinalReward):",
        "",
        "| policy | val acc | acc - SAM-late (pt) | loss: SAM-late - policy | score | compute used "
        "| SAM chosen (share of decisions) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in table.items():

        def f3(t: Any, k: int = 2) -> str:
            return f"{t[0]:+.{k}f} [{t[1]:+.{k}f}, {t[2]:+.{k}f}]"

        lines.append(
            f"| {name} | {100 * e['val_acc']:.2f} | {f3(e['acc_vs_sam_late'])} | "
            f"{f3(e['loss_vs_sam_late'], 3)} | {f3(e['score'], 3)} | {e['budget_used']:.3f} | "
            f"{e['sam_share']:.3f} |"
        )
    (out / "budget_policy.md").write_text("\n".join(lines) + "\n")
    if a.generations > 0:
        from rlopt import RLSwitchingOptimizer
        from rlopt.policies.rules import AdaptiveSamConfig, AdaptiveSamPolicy  # noqa: F401

        probe = RLSwitchingOptimizer(
            [torch.nn.Parameter(torch.zeros(1))],
            choices=["sgd", "sam"],
            policy=_policy_arg(best["spec"]),
            total_steps=10,
            compute_budget=a.budget,
            process_group=None,
            interval=a.interval,
        )
        probe.policy.save(
            out / "tuned.pt",
            trained_with="benchmarks.budget_policy",
            command=summary["command"],
            compute_budget=a.budget,
            interval=a.interval,
            tuned=best,
            held_out=table["ae-sam (tuned)"],
        )
    print(f"wrote {out / 'budget_policy.md'}")
    return summary


if __name__ == "__main__":
    main()
