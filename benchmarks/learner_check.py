"""Do rlopt's learners learn? Its PPO and DQN, default configs, on standard control tasks.

``python -m benchmarks.learner_check`` (needs ``gymnasium``: ``pip install gymnasium``)

Each run drives one policy through one gymnasium environment exactly as rlopt's optimizers drive
it: one environment step per decision, ``policy.act(obs)`` and then
``policy.observe(reward, next_obs, terminal=..., truncated=...)``; a new episode starts after a
terminal or truncated step. The score of a run is the mean return of its last ``--last`` training
episodes (exploration included, as CleanRL reports it). Besides the returns, each run logs the
learner's diagnostics from ``observe``: DQN's mean Q of its training batches against the bound
``max|r| / (1 - gamma)``, PPO's approx-KL, clip fraction, entropy and explained variance.

Published figures for comparison (CleanRL, Huang et al. 2022, 500k steps, mean ± std over seeds):
CartPole-v1, ``ppo.py`` 490.04 ± 6.12 and ``dqn.py`` 488.69 ± 16.11.

Output: one JSON per run, ``summary.json`` and ``summary.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from rlopt.policies import DQNConfig, DQNPolicy, PPOConfig, PPOPolicy

__all__ = ["run_learner", "summarise", "main", "PUBLISHED", "BAR"]

PUBLISHED = {  # CleanRL's published figures (label them as such wherever shown)
    ("CartPole-v1", "ppo"): "490.04 ± 6.12 (CleanRL ppo.py, published)",
    ("CartPole-v1", "dqn"): "488.69 ± 16.11 (CleanRL dqn.py, published)",
}
BAR = {"CartPole-v1": 195.0}  # the mean return every seed must reach
LEARNERS = {"ppo": (PPOPolicy, PPOConfig), "dqn": (DQNPolicy, DQNConfig)}


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"Invalid override {item!r}: expected key=value")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def run_learner(
    algo: str,
    env_id: str,
    seed: int,
    steps: int,
    config: Optional[dict[str, Any]] = None,
    last: int = 20,
    log_every: int = 1000,
    bar: Any = None,
) -> dict[str, Any]:
    """Train ``algo``'s policy (default config updated by ``config``) for ``steps`` environment
    steps of ``env_id``; return the episode returns, diagnostics and the score."""
    import gymnasium as gym

    policy_cls, config_cls = LEARNERS[algo]
    cfg = config_cls(**(config or {}))
    env = gym.make(env_id)
    obs_dim = int(np.prod(env.observation_space.shape))
    policy = policy_cls(obs_dim, [str(a) for a in range(env.action_space.n)], cfg, seed=seed)
    obs, _ = env.reset(seed=seed)
    obs_t = torch.as_tensor(obs, dtype=torch.float32)
    returns: list[float] = []
    ends: list[int] = []
    diagnostics: list[dict[str, float]] = []
    episode_return, window = 0.0, {}
    warned = []
    start = time.perf_counter()
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        for t in range(1, steps + 1):
            action = policy.act(obs_t)
            obs, reward, terminal, truncated, _ = env.step(action)
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            info = policy.observe(float(reward), obs_t, terminal=bool(terminal), truncated=bool(truncated))
            episode_return += float(reward)
            for key, value in info.items():
                window.setdefault(key, []).append(value)
            if terminal or truncated:
                returns.append(episode_return)
                ends.append(t)
                episode_return = 0.0
                obs, _ = env.reset()
                obs_t = torch.as_tensor(obs, dtype=torch.float32)
            if t % log_every == 0 or t == steps:
                row = {"step": t, **{k: float(np.mean(v)) for k, v in window.items()}}
                if returns:
                    row["return_last"] = float(np.mean(returns[-last:]))
                diagnostics.append(row)
                window = {}
                if bar is not None:
                    bar.update(log_every if t % log_every == 0 else t % log_every)
                    bar.set_postfix_str(f"{algo} {env_id} s{seed} R{row.get('return_last', math.nan):.0f}")
        warned = sorted({str(w.message) for w in caught if "diverging" in str(w.message)})
    wall = time.perf_counter() - start
    env.close()
    score = float(np.mean(returns[-last:])) if returns else math.nan
    q_means = [abs(r["q_mean"]) for r in diagnostics if "q_mean" in r]
    return {
        "algo": algo,
        "env": env_id,
        "seed": seed,
        "steps": steps,
        "config": vars(cfg),
        "overrides": config or {},
        "score": score,
        "last": last,
        "episodes": len(returns),
        "returns": returns,
        "episode_ends": ends,
        "diagnostics": diagnostics,
        "max_abs_mean_q": max(q_means) if q_means else None,
        "q_bound": policy.q_bound() if algo == "dqn" else None,
        "divergence_warnings": warned,
        "wall_s": wall,
        "us_per_step": 1e6 * wall / steps,
    }


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["env"], r["algo"]), []).append(r)
    rows = []
    for (env_id, algo), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        scores = [r["score"] for r in rs]
        bar = BAR.get(env_id)
        row = {
            "env": env_id,
            "algo": algo,
            "seeds": [r["seed"] for r in rs],
            "scores": scores,
            "mean": statistics.mean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "min": min(scores),
            "steps": rs[0]["steps"],
            "last": rs[0]["last"],
            "published": PUBLISHED.get((env_id, algo), "-"),
            "bar": bar,
            "bar_met": None if bar is None else all(s >= bar for s in scores),
            "us_per_step": statistics.mean(r["us_per_step"] for r in rs),
        }
        if algo == "dqn":
            row["max_abs_mean_q"] = max(
                (abs(d["q_mean"]) for r in rs for d in r["diagnostics"] if "q_mean" in d), default=math.nan
            )
            row["q_bound"] = max(r["q_bound"] for r in rs)
            row["divergence_warnings"] = sum(bool(r["divergence_warnings"]) for r in rs)
        else:
            tail = [d for r in rs for d in r["diagnostics"][-10:] if "approx_kl" in d]
            for key in ("approx_kl", "clipfrac", "entropy", "explained_variance"):
                row[f"final_{key}"] = statistics.mean(d[key] for d in tail) if tail else math.nan
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| task | learner | steps | mean return, last episodes, per seed | mean ± std | bar | published |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_seed = " / ".join(f"{s:.1f}" for s in r["scores"])
        bar = "-" if r["bar"] is None else f">= {r['bar']:g}: {'met' if r['bar_met'] else 'NOT met'}"
        lines.append(
            f"| {r['env']} | rlopt {r['algo']} | {r['steps']} | {per_seed} (seeds "
            f"{','.join(map(str, r['seeds']))}) | {r['mean']:.1f} ± {r['std']:.1f} | {bar} | {r['published']} |"
        )
    lines.append("")
    for r in rows:
        if r["algo"] == "dqn":
            lines.append(
                f"- {r['env']} dqn: largest |mean Q| of the training batches (1k-step windows) "
                f"{r['max_abs_mean_q']:.1f}, bound max|r|/(1-gamma) {r['q_bound']:.1f}; runs that warned of "
                f"divergence: {r['divergence_warnings']}; {r['us_per_step']:.0f} us/step"
            )
        else:
            lines.append(
                f"- {r['env']} ppo, last 10 logged windows: approx-KL {r['final_approx_kl']:.4f}, clip "
                f"fraction {r['final_clipfrac']:.3f}, entropy {r['final_entropy']:.3f}, explained variance "
                f"{r['final_explained_variance']:.3f}; {r['us_per_step']:.0f} us/step"
            )
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--envs", default="CartPole-v1,Acrobot-v1", help="gymnasium task ids, comma-separated")
    parser.add_argument("--algos", default="ppo,dqn", help="learners, comma-separated (ppo, dqn)")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=100_000, help="environment steps (decisions) per run")
    parser.add_argument("--last", type=int, default=20, help="training episodes the score averages")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field of every learner run (a study of alternatives; "
        "the check itself uses the defaults)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (per run)")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, one process each (the progress bar then counts finished runs)",
    )
    parser.add_argument("--out", default="benchmarks/runs/learner_check", help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--summarise-only",
        action="store_true",
        help="run nothing: rebuild summary.json and summary.md from --out's runs/*.json",
    )
    args = parser.parse_args(argv)
    try:
        import gymnasium  # noqa: F401
    except ImportError:
        parser.error("the learner check needs gymnasium: pip install gymnasium")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.summarise_only:
        runs = [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]
        if not runs:
            parser.error(f"no run files under {out / 'runs'}")
        return _write_summary(out, runs, argv, commit=None, threads=args.threads, overrides=runs[0].get("overrides"))
    envs, algos = args.envs.split(","), args.algos.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    overrides = _parse_overrides(args.set)
    commit = _commit()  # the code the runs import, not whatever is checked out when they end
    (out / "runs").mkdir(parents=True, exist_ok=True)
    plan = [(env_id, algo, seed) for env_id in envs for algo in algos for seed in seeds]
    runs = []

    def record(r: dict[str, Any]) -> None:
        (out / "runs" / f"{r['env']}_{r['algo']}_s{r['seed']}.json").write_text(json.dumps(r))
        runs.append(r)

    from tqdm.auto import tqdm

    if args.jobs <= 1:
        bar = tqdm(
            total=len(plan) * args.steps, unit="step", unit_scale=True, desc="learner check", disable=args.no_progress
        )
        for env_id, algo, seed in plan:
            record(run_learner(algo, env_id, seed, args.steps, overrides, last=args.last, bar=bar))
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed

        bar = tqdm(total=len(plan), unit="run", desc="learner check", disable=args.no_progress)
        with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
            futures = [
                pool.submit(run_learner, algo, env_id, seed, args.steps, overrides, args.last)
                for env_id, algo, seed in plan
            ]
            for future in as_completed(futures):
                record(future.result())
                bar.update()
    bar.close()
    runs.sort(key=lambda r: plan.index((r["env"], r["algo"], r["seed"])))
    return _write_summary(out, runs, argv, commit, args.threads, overrides)


def _write_summary(
    out: Path,
    runs: Sequence[dict[str, Any]],
    argv: Optional[Sequence[str]],
    commit: Optional[str],
    threads: int,
    overrides: Any,
) -> dict[str, Any]:
    rows = summarise(runs)
    previous = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    summary = {
        "command": previous.get("command")
        if commit is None
        else " ".join(["python", "-m", "benchmarks.learner_check", *(argv if argv is not None else sys.argv[1:])]),
        "commit": previous.get("commit") if commit is None else commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}",
        "overrides": overrides,
        "rows": rows,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown(rows)
    (out / "summary.md").write_text(table)
    print(table)
    return summary


if __name__ == "__main__":
    main()
