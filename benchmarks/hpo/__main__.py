"""Benchmark of hyper-parameter samplers on tables whose oracle is known.

    python -m benchmarks.hpo --tiers tabular uci --seeds 20 --budget 100

Every sampler spends the same number of evaluations on the same encoded space of each task; the
incumbent (best observed) configuration is scored by its oracle value. Writes, under ``--out``:
``raw/<task>.npz`` (every run's evaluated configurations, observed values and sampler seconds; runs
already there are reused), ``summary.json``, ``tables.md`` and ``regret_<tier>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from .report import evals_to_reach, plot_curves, summarise
from .run import SAMPLERS, incumbents, regret_curve, run_search
from .tasks import TABULAR, tabular_task, uci_task

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# the seeds' own figures (different data handling: see the study README)
SEED_FIGURES = {
    "wine": {"grid (truncated)": 0.5948, "MLP policy": 0.4232, "RNN policy": 0.3957},
    "letter": {"grid (truncated)": 0.7674, "MLP policy": 0.6678, "RNN policy": 0.7772},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.hpo",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--tiers", nargs="+", default=["tabular", "uci"], choices=["tabular", "uci"], help="benchmark tiers to run"
    )
    p.add_argument(
        "--tasks",
        nargs="*",
        default=None,
        help="only tasks whose name contains one of these strings (e.g. hpobench/car nb201)",
    )
    p.add_argument(
        "--samplers",
        nargs="+",
        default=[s for s in SAMPLERS if s != "gp"],
        choices=SAMPLERS + ["meta", "portfolio"],
        help="samplers to compare",
    )
    p.add_argument("--seeds", type=int, default=20, help="search seeds per task and sampler")
    p.add_argument("--budget", type=int, default=100, help="evaluations per run")
    p.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[25, 50, 100],
        help="budgets at which the tables are read (each <= --budget)",
    )
    p.add_argument("--delta", type=float, default=0.01, help="normalised regret counted as reaching the oracle")
    p.add_argument(
        "--uci-tasks",
        nargs="+",
        default=["wine", "letter"],
        choices=["wine", "letter"],
        help="UCI tasks of the seed's experiment",
    )
    p.add_argument(
        "--uci-seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="training seeds of the UCI grid tables (one oracle table each)",
    )
    p.add_argument("--uci-epochs", type=int, default=15, help="training epochs of every UCI grid configuration")
    p.add_argument(
        "--letter-seeds", type=int, nargs="+", default=None, help="training seeds for letter (default: --uci-seeds)"
    )
    p.add_argument("--letter-epochs", type=int, default=None, help="epochs for letter (default: --uci-epochs)")
    p.add_argument(
        "--data-dir",
        default=os.path.join(REPO, "data", "uci"),
        help="folder with winequality-red.csv and letter-recognition.csv",
    )
    p.add_argument("--download", action="store_true", help="download missing UCI files from the UCI repository")
    p.add_argument(
        "--cache-dir",
        default=os.path.join(REPO, "benchmarks", "runs", "hpo", "tables"),
        help="where the trained UCI grid tables are cached",
    )
    p.add_argument(
        "--pretrained",
        default=None,
        help="for the 'meta' sampler: a policy state_dict (.pt), or a folder of them named "
        "<family>__<task>.pt, each trained without that task (python -m benchmarks.hpo.meta)",
    )
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "runs", "hpo", "study"), help="output folder")
    p.add_argument("--no-raw", action="store_true", help="do not keep raw/<task>.npz (summary only)")
    args = p.parse_args(argv)
    if any(b > args.budget for b in args.budgets):
        p.error(f"--budgets {args.budgets} must not exceed --budget {args.budget}")
    if "meta" in args.samplers and not args.pretrained:
        p.error("the 'meta' sampler needs --pretrained")
    return args


def build_tasks(args):
    tasks = []
    if "tabular" in args.tiers:
        for fam, names in TABULAR.items():
            tasks += [("tabular", fam, n) for n in names]
    if "uci" in args.tiers:
        for t in args.uci_tasks:
            seeds = args.letter_seeds if (t == "letter" and args.letter_seeds) else args.uci_seeds
            tasks += [("uci", t, s) for s in seeds]

    def name(k):
        return f"{k[1]}/{k[2]}" if k[0] == "tabular" else f"uci/{k[1]}-s{k[2]}"

    if args.tasks:
        tasks = [k for k in tasks if any(f in name(k) for f in args.tasks)]
    return tasks


def load_task(key, args):
    tier, a, b = key
    if tier == "tabular":
        return tabular_task(a, b)
    epochs = args.letter_epochs if (a == "letter" and args.letter_epochs) else args.uci_epochs
    return uci_task(a, b, epochs, args.data_dir, args.cache_dir, args.download)


def main(argv=None):
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    args = parse_args(argv)
    args.command = "python -m benchmarks.hpo " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(os.path.join(args.out, "raw"), exist_ok=True)
    pretrained = None
    if args.pretrained and os.path.isfile(args.pretrained):
        pretrained = torch.load(args.pretrained, weights_only=True)
    keys = build_tasks(args)
    results, loaded = {}, {}
    total = len(keys) * len(args.samplers) * args.seeds
    bar = tqdm(total=total, desc="search runs", unit="run", mininterval=10)
    for key in keys:
        task = load_task(key, args)
        loaded[task.name] = task
        raw_path = os.path.join(args.out, "raw", task.name.replace("/", "__") + ".npz")
        old = dict(np.load(raw_path)) if os.path.isfile(raw_path) else {}
        runs = {}
        if args.pretrained and os.path.isdir(args.pretrained):
            path = os.path.join(args.pretrained, task.name.replace("/", "__") + ".pt")
            pretrained = torch.load(path, weights_only=True) if os.path.isfile(path) else None
            if pretrained is None and "meta" in args.samplers:
                raise SystemExit(f"--pretrained {args.pretrained}: no policy for {task.name} ({path})")
        portfolio = None
        if "portfolio" in args.samplers:
            portfolio = portfolio_order(task)
        for s in args.samplers:
            prefix = f"{s}|{args.budget}|"
            if all(f"{prefix}{seed}|flat" in old for seed in range(args.seeds)):
                runs[s] = [
                    {k: old[f"{prefix}{seed}|{k}"] for k in ("flat", "seen", "cost")} for seed in range(args.seeds)
                ]
                bar.update(args.seeds)
                continue
            runs[s] = []
            for seed in range(args.seeds):
                bar.set_postfix_str(f"{task.name} {s} seed {seed}")
                if s == "grid" and seed > 0:  # deterministic: one run stands for every seed
                    runs[s].append(runs[s][0])
                else:
                    runs[s].append(run_search(task, s, seed, args.budget, pretrained=pretrained, portfolio=portfolio))
                bar.update(1)
        results[task.name] = runs
        if not args.no_raw:
            flat = {
                f"{s}|{args.budget}|{seed}|{k}": v
                for s, rs in runs.items()
                for seed, r in enumerate(rs)
                for k, v in r.items()
            }
            np.savez_compressed(raw_path, **{**old, **flat})
    bar.close()
    write_report(args, results, loaded)


def portfolio_order(task):
    """Flat configuration indices by mean normalised value over the other tasks of the HPOBench family."""
    if task.family != "hpobench":
        raise SystemExit(f"the 'portfolio' sampler needs an HPOBench task, got {task.name}")
    others = [tabular_task("hpobench", n) for n in TABULAR["hpobench"] if f"hpobench/{n}" != task.name]
    score = np.mean([(t.mean - t.best) / max(t.median - t.best, 1e-12) for t in others], 0)
    return np.argsort(score.reshape(-1), kind="stable")


def write_report(args, results, loaded):
    samplers = args.samplers
    norm, costs, tiers = {}, {}, {}
    for name, runs in results.items():
        task = loaded[name]
        scale = max(task.median - task.best, 1e-12)
        norm[name] = {
            s: np.stack([regret_curve(task, r["flat"], r["seen"]) / scale for r in rs]) for s, rs in runs.items()
        }
        costs[name] = {s: np.stack([r["cost"] for r in rs]) for s, rs in runs.items()}
        tiers.setdefault("uci" if name.startswith("uci/") else "tabular", []).append(name)
    focus = [s for s in samplers if s.startswith(("q-", "reinforce", "meta"))]
    summary = {"command": args.command, "args": vars(args), "commit": _commit(), "torch_threads": 1, "tiers": {}}
    lines = [
        f"Command: `{summary['command']}` (commit {summary['commit']}). Normalised regret: "
        "(oracle value of the incumbent - best) / (median configuration - best); mean over seeds, then tasks.",
        "",
    ]
    for tier, names in tiers.items():
        sub = {n: norm[n] for n in names}
        stats = summarise(sub, args.budgets, focus=focus, baselines=("random", "tpe", "portfolio"))
        cost = {s: float(np.mean([costs[n][s].mean() for n in names])) for s in samplers}
        reach = {s: float(np.median([evals_to_reach(norm[n][s], args.delta) for n in names])) for s in samplers}
        stats["sampler_ms_per_trial"] = {s: 1e3 * c for s, c in cost.items()}
        stats["median_evals_to_delta"] = reach
        stats["tasks"] = names
        summary["tiers"][tier] = stats
        lines += [
            f"## {tier}: {len(names)} tasks, {args.seeds} seeds, budget {args.budget}",
            "",
            "| sampler | "
            + " | ".join(f"mean rank @{b}" for b in args.budgets)
            + " | "
            + " | ".join(f"norm. regret @{b}" for b in args.budgets)
            + f" | evals to {args.delta} (median) | sampler ms/trial |",
            "|---" * (2 * len(args.budgets) + 3) + "|",
        ]
        for s in samplers:
            row = [f"{stats['budgets'][b]['mean_rank'][s]:.2f}" for b in args.budgets]
            row += [f"{stats['budgets'][b]['mean_norm_regret'][s]:.4f}" for b in args.budgets]
            r = reach[s]
            row += [f">{args.budget}" if r > args.budget else f"{r:.0f}", f"{1e3 * cost[s]:.2f}"]
            lines.append(f"| {s} | " + " | ".join(row) + " |")
        lines.append("")
        for b in args.budgets:
            e = stats["budgets"][b]
            lines.append(
                f"Budget {b}: Friedman p = {e.get('friedman_p', float('nan')):.2g}. Paired "
                "differences in normalised regret over tasks (negative: the first is better), "
                "95% bootstrap interval, Wilcoxon p, wins/losses:"
            )
            for k, v in e["paired"].items():
                lines.append(
                    f"- {k}: {v['mean_diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}], "
                    f"p = {v['wilcoxon_p']:.2g}, {v['wins']}/{v['losses']}"
                )
            lines.append("")
        plot_curves(
            sub,
            {n: costs[n] for n in names},
            samplers,
            os.path.join(args.out, f"regret_{tier}.png"),
            f"{tier}: {len(names)} tasks x {args.seeds} seeds (mean normalised regret)",
        )
        if tier == "uci":
            lines += uci_lines(args, results, loaded, names, summary)
            for n in names:  # the oracle tables themselves (final validation and test loss of every configuration)
                np.savez_compressed(
                    os.path.join(args.out, f"oracle_{n.split('/')[1]}.npz"),
                    val=loaded[n].mean.astype(np.float32),
                    test=loaded[n].test.astype(np.float32),
                )
    with open(os.path.join(args.out, "runs.csv"), "w") as f:  # per run: normalised regret and sampler time
        f.write(
            "task,sampler,seed," + ",".join(f"norm_regret_at_{b}" for b in args.budgets) + ",sampler_ms_per_trial\n"
        )
        for name in sorted(norm):
            for s in samplers:
                for seed in range(norm[name][s].shape[0]):
                    vals = ",".join(f"{norm[name][s][seed, b - 1]:.6g}" for b in args.budgets)
                    f.write(f"{name},{s},{seed},{vals},{1e3 * costs[name][s][seed].mean():.4g}\n")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"written: {args.out}")


def uci_lines(args, results, loaded, names, summary):
    """Test metric of the incumbent (the configuration with the best validation loss found)."""
    out = [
        "### UCI: test metric of the chosen configuration (mean over search seeds and training seeds)",
        "",
        "| task | oracle (best val) test | "
        + " | ".join(f"{s} @{b}" for b in args.budgets[-1:] for s in args.samplers)
        + " |",
        "|---" * (2 + len(args.samplers)) + "|",
    ]
    table = {}
    for t in args.uci_tasks:
        tn = [n for n in names if n.startswith(f"uci/{t}-")]
        if not tn:
            continue
        oracle = np.mean([loaded[n].test.reshape(-1)[np.argmin(loaded[n].mean)] for n in tn])
        row = {}
        for s in args.samplers:
            vals = []
            for n in tn:
                for r in results[n][s]:
                    pos = incumbents(r["seen"])[args.budgets[-1] - 1]
                    vals.append(loaded[n].test.reshape(-1)[r["flat"][pos]])
            row[s] = float(np.mean(vals))
        table[t] = {"oracle": float(oracle), **row}
        out.append(f"| {t} | {oracle:.4f} | " + " | ".join(f"{row[s]:.4f}" for s in args.samplers) + " |")
    out += [
        "",
        "The seeds' own figures (one seed, test split reshuffled every trial, 4,800 evaluations for the "
        "policies): "
        + "; ".join(f"{t}: " + ", ".join(f"{k} {v}" for k, v in SEED_FIGURES[t].items()) for t in args.uci_tasks),
        "",
    ]
    summary["uci_test"] = table
    return out


def _commit() -> str:
    try:
        import subprocess

        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
            ).stdout.strip()
            or "unknown"
        )
    except OSError:
        return "unknown"


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"{time.time() - t0:.0f} s")
