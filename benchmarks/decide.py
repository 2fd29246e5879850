"""The deciding experiment: when to spend SAM, paired arms under a compute budget.

``python -m benchmarks.decide run --dataset cifar10 --data-dir data/cifar10-jpeg.tar.gz --cuda-graph \\
    --out benchmarks/results/decide/cifar10 --workers 4 --time-budget 420``
``python -m benchmarks.decide analyse --out benchmarks/results/decide/cifar10``

Arms (every one a ``switch`` run of :mod:`benchmarks.train`: RLSwitchingOptimizer over sgd and sam,
so that every arm runs the same code and only the policy and the budget differ):

* ``sgd``: sam-late at budget 0 (SGD on every step); ``sam``: sam-late at budget 1 (SAM on every step);
* at each budget ``b`` (default 0.15 and 0.3): ``sam-late@b`` (SAM on the last ``b`` of the steps),
  ``random@b`` (ss-sam: SAM at random, spending the budget evenly), ``ae-sam@b`` (SAM when the
  squared gradient norm is high against its running statistics, until the budget is spent) and
  ``<learned>@b``, a shipped policy named by ``--learned`` (skipped, with a message, when the
  registry has no such policy).

Pairing: for each seed and label-noise level every arm starts from the same initial weights and
sees the same batches, augmentations and noisy labels (all drawn from the seed). The sam-late arms
do not repeat the SGD arm's first epochs: the SGD run writes checkpoints, and each ``sam-late@b``
run continues from the last checkpoint before its first SAM decision
(:func:`benchmarks.train.sam_late_branch_epoch`), so it shares the SGD arm's prefix exactly.

``run`` starts ``--workers`` processes that share the runs through claim files
(``<out>/runs/<run>.claim``), one device, several runs at a time (under CUDA MPS on a GPU, which
``benchmarks/scripts/gpu_decide.sh`` starts). Finished runs (a log in ``<out>/runs/`` with the same
config) are never made again, so the experiment can be spread over several calls; no run is
started that is not expected to end within ``--time-budget`` seconds. Checkpoints live in the
git-ignored ``--checkpoint-dir``: when a sam-late arm is left for a later call whose machine lacks
its checkpoint, the SGD prefix is made again up to the branch point (the log says so).

``analyse`` writes ``<out>/table.md`` and ``<out>/summary.json``: per label-noise level, each arm's
final test accuracy and compute, and paired differences (same seed) against ``sam-late@0.3``,
against random switching at the same budget, and SAM-late and SAM against SGD, each with a 95%
Student t interval over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .cli import fail, missing_data_message, parser, runs_path
from .data import MissingDataError, load_dataset
from .table import _T95, _reusable
from .train import (
    TrainConfig,
    add_config_args,
    checkpoint_path,
    config_from_args,
    logged_config,
    sam_late_branch_epoch,
    train,
)

__all__ = ["Arm", "arms", "jobs", "arm_label", "paired", "analyse", "main", "LEARNED_PLACEHOLDER"]

#: the learned policy's registry name until one ships (the runs of a name the registry lacks are skipped)
LEARNED_PLACEHOLDER = "switch-sgd-sam-budget"
#: the reference arm of the paired differences
REFERENCE = "sam-late@0.3"


@dataclass(frozen=True)
class Arm:
    """One arm: a label, the switch policy and its compute budget."""

    label: str
    policy: str
    budget: float

    @property
    def branches(self) -> bool:
        """A sam-late arm with a budget in (0, 1): it continues the SGD arm's run."""
        return self.policy == "sam-late" and 0.0 < self.budget < 1.0


def arms(budgets: Sequence[float], learned: Optional[str]) -> list[Arm]:
    """The arms, longest runs first (SAM, then SGD, whose checkpoints the sam-late arms wait for)."""
    out = [Arm("sam", "sam-late", 1.0), Arm("sgd", "sam-late", 0.0)]
    for b in sorted(budgets, reverse=True):
        out += [Arm(f"random@{b:g}", "ss-sam", b), Arm(f"ae-sam@{b:g}", "ae-sam", b)]
        if learned:
            out.append(Arm(f"{_policy_label(learned)}@{b:g}", learned, b))
    out += [Arm(f"sam-late@{b:g}", "sam-late", b) for b in sorted(budgets, reverse=True)]
    return out


def arm_label(config: dict[str, Any]) -> Optional[str]:
    """The arm a run log's config belongs to (None: not a switch run)."""
    if config.get("method") != "switch" or config.get("budget") is None:
        return None
    policy, budget = config.get("policy", "sam-late"), float(config["budget"])
    if policy == "sam-late" and budget == 0.0:
        return "sgd"
    if policy == "sam-late" and budget == 1.0:
        return "sam"
    name = {"ss-sam": "random"}.get(policy, _policy_label(policy))
    return f"{name}@{budget:g}"


def _policy_label(policy: str) -> str:
    """A policy's name in labels: a checkpoint path reduced to its file's stem (as in run names)."""
    return Path(policy).stem if os.sep in policy or policy.endswith(".pt") else policy


@dataclass
class Job:
    """One run to make: its config, and for a sam-late arm the SGD run it continues and from which epoch."""

    arm: Arm
    cfg: TrainConfig
    prefix: Optional[TrainConfig] = None
    branch_epoch: int = 0
    checkpoint_epochs: tuple[int, ...] = ()

    def units(self, steps_per_epoch: int) -> float:
        """Expected cost in SGD epochs (a SAM step counts 2): what the time estimate scales."""
        e, b = self.cfg.epochs, self.arm.budget
        if self.prefix is not None:
            return (e - self.branch_epoch) + b * e
        return e * (1.0 + b)


def jobs(
    base: TrainConfig, seeds: Sequence[int], noises: Sequence[float], arm_list: Sequence[Arm], steps_per_epoch: int
) -> list[Job]:
    """Every run of the experiment, seed-major (a time budget that runs out leaves whole seeds)."""
    out: list[Job] = []
    for seed in seeds:
        for noise in noises:

            def cfg_of(arm: Arm, seed: int = seed, noise: float = noise) -> TrainConfig:
                return dataclasses.replace(
                    base, method="switch", policy=arm.policy, budget=arm.budget, seed=seed, label_noise=noise
                )

            sgd = cfg_of(Arm("sgd", "sam-late", 0.0))
            branch = {
                a.label: sam_late_branch_epoch(a.budget, base.epochs, steps_per_epoch, base.interval)
                for a in arm_list
                if a.branches
            }
            for arm in arm_list:
                if arm.branches and branch[arm.label] > 0:
                    out.append(Job(arm, cfg_of(arm), prefix=sgd, branch_epoch=branch[arm.label]))
                elif arm.label == "sgd":
                    out.append(Job(arm, sgd, checkpoint_epochs=tuple(sorted(e for e in branch.values() if e > 0))))
                else:
                    out.append(Job(arm, cfg_of(arm)))
    return out


# ------------------------------------------------------------------------------------- running
def _log_path(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / f"{cfg.run_name()}.json"


def _claim(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / f"{cfg.run_name()}.claim"


def _logged_rates(runs_dir: Path, device: str) -> list[float]:
    """Seconds per SGD epoch (a SAM step counts 2) of the runs logged in ``runs_dir`` on ``device``."""
    seen = []
    for f in runs_dir.glob("*.json"):
        try:
            r = json.loads(f.read_text())
            if r["environment"].get("gpu", r["environment"]["device"]) != device:
                continue
            s = r["summary"]
            seen.append(s["wall_seconds"] / (s["grad_evals"] / max(1, s["steps"]) * len(r["epochs"])))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
    return seen


def work(
    job_list: list[Job],
    data,
    ckpt_dir: Path,
    deadline: float,
    unit_seconds: float,
    overhead: float,
    steps_per_epoch: int,
    device: str,
    log=print,
) -> dict[str, list[str]]:
    """One worker: take unclaimed runs in order until none is left or none fits before ``deadline``
    (``time.time()``). A run's expected time is ``overhead`` plus its cost in SGD epochs times the
    slowest rate of the runs this worker made, else of the runs logged on this device, else
    ``unit_seconds``. Returns the runs it made and the ones it left."""
    made: list[str] = []
    mine: list[float] = []
    logged = _logged_rates(Path(job_list[0].cfg.out_dir), device) if job_list else []
    skipped: dict[str, str] = {}
    done: set = set()

    def is_done(cfg: TrainConfig) -> bool:
        if cfg.run_name() not in done and _reusable(cfg) is not None:
            done.add(cfg.run_name())
        return cfg.run_name() in done

    while True:
        pending = [j for j in job_list if not is_done(j.cfg) and j.cfg.run_name() not in skipped]
        if not pending:
            break
        started = waiting = False
        for j in pending:
            name = j.cfg.run_name()
            claim = _claim(j.cfg)
            if claim.exists():
                continue  # another worker makes it
            if j.prefix is not None and j.prefix.run_name() in skipped:
                skipped[name] = "not started: its SGD prefix was not started"
                continue
            start_from, remake = None, False
            if j.prefix is not None:
                start_from = checkpoint_path(ckpt_dir, j.prefix, j.branch_epoch)
                remake = not start_from.is_file() and is_done(j.prefix)  # made elsewhere: make the prefix again
            rate = max(mine) if mine else max(logged) if logged else unit_seconds
            expected = overhead + (j.units(steps_per_epoch) + (j.branch_epoch if remake else 0)) * rate
            if time.time() + expected > deadline:
                skipped[name] = f"not started: expected {expected:.0f} s, over the time budget"
                log(f"[{name}] {skipped[name]}")
                continue
            if j.prefix is not None and not start_from.is_file() and not remake:
                waiting = True  # the SGD run is under way or still to come: it writes the checkpoint
                continue
            claim.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            try:
                t0 = time.perf_counter()
                if remake:
                    log(
                        f"[{name}] the checkpoint of {j.prefix.run_name()} at epoch {j.branch_epoch} is "
                        "missing here: making that prefix again"
                    )
                    train(
                        dataclasses.replace(j.prefix, out_dir=None),
                        data=data,
                        log=log,
                        checkpoint_epochs=(j.branch_epoch,),
                        checkpoint_dir=ckpt_dir,
                        stop_after=j.branch_epoch,
                    )
                result = train(
                    j.cfg,
                    data=data,
                    log=log,
                    checkpoint_epochs=j.checkpoint_epochs,
                    checkpoint_dir=ckpt_dir if j.checkpoint_epochs else None,
                    start_from=start_from,
                    log_decisions=False,
                )
                if remake and "path" in result:  # the log says that its prefix was made again
                    result["branched_from"]["prefix_made_again"] = True
                    Path(result["path"]).write_text(
                        json.dumps({k: v for k, v in result.items() if k != "path"}, indent=1)
                    )
                units = j.units(steps_per_epoch) + (j.branch_epoch if remake else 0)
                mine.append(max(0.0, time.perf_counter() - t0 - overhead) / max(1e-9, units))
                made.append(name)
            finally:
                claim.unlink(missing_ok=True)
            _drop_spent_checkpoints(job_list, ckpt_dir, is_done)
            started = True
            break
        if started:
            continue
        if waiting and time.time() < deadline:
            time.sleep(1.0)
            continue
        break
    return {"made": made, "left": sorted(skipped)}


def _drop_spent_checkpoints(job_list: list[Job], ckpt_dir: Path, is_done) -> None:
    """Delete the checkpoints whose branch runs are all made (each holds a model and its momentum)."""
    need: dict[Path, bool] = {}
    for j in job_list:
        if j.prefix is not None:
            p = checkpoint_path(ckpt_dir, j.prefix, j.branch_epoch)
            need[p] = need.get(p, False) or not is_done(j.cfg)
    for p, needed in need.items():
        if not needed:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ analysis
def _t95(df: int) -> float:
    return _T95[df - 1] if 1 <= df <= len(_T95) else 1.96


def paired(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Mean of the per-seed differences ``a - b`` (seeds in both), its sample std and the
    half-width of its 95% Student t interval (NaN with fewer than two pairs)."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n == 0:
        return {"n": 0, "seeds": [], "mean": math.nan, "std": math.nan, "half": math.nan}
    m = sum(d) / n
    if n < 2:
        return {"n": 1, "seeds": seeds, "mean": m, "std": math.nan, "half": math.nan}
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    return {"n": n, "seeds": seeds, "mean": m, "std": sd, "half": _t95(n - 1) * sd / math.sqrt(n)}


def _comparisons(labels: Sequence[str], reference: str) -> list[tuple[str, str, str]]:
    """(A, B, why) pairs: every arm against the reference, each budgeted arm against random switching
    at its budget, and SAM and SAM-late against SGD (the effects the predictions are about)."""
    out = []
    have = set(labels)
    for a in labels:
        if a != reference and reference in have:
            out.append((a, reference, "against SAM-late at 0.3"))
    for a in labels:
        kind, _, b = a.partition("@")
        if b and kind != "random" and f"random@{b}" in have:
            out.append((a, f"random@{b}", "against random switching at the same budget"))
    for a in labels:
        if (a == "sam" or a.startswith("sam-late@")) and "sgd" in have:
            out.append((a, "sgd", "against SGD"))
    return out


def analyse(out: Path, reference: str = REFERENCE) -> dict[str, Any]:
    """Read ``<out>/runs/*.json``; write ``<out>/table.md`` and ``summary.json``; return the summary."""
    groups: dict[tuple, dict[str, dict[int, dict[str, Any]]]] = {}
    envs, commits = set(), set()
    for f in sorted((out / "runs").glob("*.json")):
        r = json.loads(f.read_text())
        c = logged_config(r["config"])
        label = arm_label(c)
        if label is None:
            continue
        key = (c["dataset"], c["model"], c["epochs"], c["label_noise"])
        groups.setdefault(key, {}).setdefault(label, {})[c["seed"]] = r
        envs.add(r["environment"].get("gpu", r["environment"].get("cpu")))
        commits.add(r["environment"].get("commit"))
    md = [
        f"# The deciding experiment: {out.name}",
        "",
        f"- runs: `{out / 'runs'}`; hardware: {', '.join(sorted(map(str, envs))) or '-'}; "
        f"commits: {', '.join(sorted(map(str, commits))) or '-'}",
        "- outcome: final test accuracy (points); differences are paired by seed (same initial weights, "
        "batches and noisy labels), mean with its 95% Student t interval over the seeds both arms have; "
        '"better"/"worse" only where the interval excludes 0',
        "- cost: gradient evaluations per step (SGD 1, SAM 2); SAM share: share of steps that ran SAM",
    ]
    summary: dict[str, Any] = {"conditions": []}
    for key in sorted(groups):
        dataset, model, epochs, noise = key
        by = groups[key]
        order = {a.label: i for i, a in enumerate(arms([0.3, 0.15], None))}
        labels = sorted(by, key=lambda lab: (order.get(lab, 99), lab))
        acc = {lab: {s: 100 * r["summary"]["final_test_acc"] for s, r in by[lab].items()} for lab in labels}
        md += [
            "",
            f"## {dataset}, {model}, {epochs} epochs, label noise {noise:g}",
            "",
            "| arm | seeds | test acc % (mean ± std) | cost (x SGD) | SAM share | branched from SGD at epoch |",
            "|---|---|---|---|---|---|",
        ]
        rows = []
        for lab in labels:
            xs = list(acc[lab].values())
            m = sum(xs) / len(xs)
            sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else math.nan
            cost = [r["summary"]["grad_evals"] / max(1, r["summary"]["steps"]) for r in by[lab].values()]
            share = [r["summary"]["step_share"].get("sam", 0.0) for r in by[lab].values()]
            br = sorted({r["branched_from"]["epoch"] for r in by[lab].values() if r.get("branched_from")})
            rows.append(
                {
                    "arm": lab,
                    "seeds": sorted(acc[lab]),
                    "acc_mean": m,
                    "acc_std": sd,
                    "cost": sum(cost) / len(cost),
                    "sam_share": sum(share) / len(share),
                    "branch_epochs": br,
                }
            )
            md.append(
                f"| {lab} | {len(xs)} | {m:.2f} ± {sd:.2f} | {sum(cost) / len(cost):.3f} | "
                f"{100 * sum(share) / len(share):.1f}% | {', '.join(map(str, br)) or '-'} |"
            )
        md += [
            "",
            "| A | B | comparison | pairs | A - B (points) | 95% interval | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        diffs = []
        for a, b, why in _comparisons(labels, reference):
            p = paired(acc[a], acc[b])
            if math.isnan(p["half"]):
                interval, verdict = "-", "too few pairs"
            else:
                interval = f"[{p['mean'] - p['half']:+.2f}, {p['mean'] + p['half']:+.2f}]"
                verdict = (
                    "better" if p["mean"] - p["half"] > 0 else "worse" if p["mean"] + p["half"] < 0 else "not separable"
                )
            diffs.append({"a": a, "b": b, "comparison": why, **p, "verdict": verdict})
            md.append(f"| {a} | {b} | {why} | {p['n']} | {p['mean']:+.2f} | {interval} | {verdict} |")
        summary["conditions"].append(
            {
                "dataset": dataset,
                "model": model,
                "epochs": epochs,
                "label_noise": noise,
                "arms": rows,
                "differences": diffs,
            }
        )
    (out / "table.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


# ----------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = parser(
        "decide",
        "The deciding experiment: SGD, SAM and budgeted SAM controllers (sam-late, random, "
        "ae-sam, a learned policy), paired by seed, several runs at a time on one device; 'analyse' "
        "tabulates paired differences.",
    )
    ap.add_argument(
        "command",
        choices=("run", "worker", "analyse"),
        help="run: train the arms (starts --workers processes); analyse: the table; worker: one of run's processes",
    )
    ap.add_argument(
        "--out",
        required=True,
        help="study folder: run logs in <out>/runs/, table.md, summary.json (e.g. benchmarks/results/decide/cifar10)",
    )
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    ap.add_argument(
        "--noise",
        type=float,
        nargs="+",
        default=[0.0, 0.4],
        help="label-noise levels of the training split (each a condition)",
    )
    ap.add_argument(
        "--budgets", type=float, nargs="+", default=[0.15, 0.3], help="compute budgets of the budgeted arms"
    )
    ap.add_argument(
        "--learned",
        default=LEARNED_PLACEHOLDER,
        help="registry name (or checkpoint path) of the learned policy; its arms are skipped, with a "
        "message, when there is no such policy; 'none' leaves them out",
    )
    ap.add_argument("--workers", type=int, default=1, help="processes training at once on the device")
    ap.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no run expected to end later than SECONDS after the start (default: no limit)",
    )
    ap.add_argument(
        "--unit-seconds",
        type=float,
        default=3.0,
        help="expected seconds per SGD epoch of one run while the others run too, until a run of "
        "this call has finished (then the slowest measured rate)",
    )
    ap.add_argument(
        "--run-overhead",
        type=float,
        default=15.0,
        help="expected seconds of a run's set-up and evaluation on top of its epochs",
    )
    ap.add_argument(
        "--checkpoint-dir",
        default=None,
        help="where the SGD runs' checkpoints go (default benchmarks/runs/decide_ckpt/<out's name>, git-ignored)",
    )
    ap.add_argument("--reference", default=REFERENCE, help="analyse: the arm every other is paired against")
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # worker: time.time() limit
    ap.add_argument("--worker-id", type=int, default=0, help=argparse.SUPPRESS)
    add_config_args(
        ap,
        skip=(
            "method",
            "seed",
            "out_dir",
            "label_noise",
            "policy",
            "budget",
            "adam_lr",
            "adamw_weight_decay",
            "policy_train",
            "pretrained",
            "sam_share",
            "random_probs",
            "sam_every",
            "sam_last_fraction",
        ),
    )
    own = {"val_fraction": 0.05, "interval": 10}  # the main tables' hold-out; a decision every 10 steps
    ap.set_defaults(**own)
    for action in ap._actions:
        if action.dest in own:
            action.help = re.sub(r"\(default: [^)]*\)$", f"(default: {own[action.dest]})", action.help)
    return ap


def _learned_name(name: str) -> tuple[Optional[str], Optional[str]]:
    """(name to use, or None; a message when it is skipped)."""
    if name in ("", "none"):
        return None, None
    if Path(name).is_file():
        return name, None
    from rlopt.registry import list_policies

    shipped = sorted(list_policies())
    if name not in shipped:
        return None, (
            f"learned policy '{name}' is not in the registry (shipped: {shipped}): its arms are skipped; "
            "pass --learned NAME once it ships"
        )
    return name, None


def _learned_fits(name: str, cfg: TrainConfig) -> Optional[str]:
    """None when policy ``name`` drives a budgeted sgd/sam switch as the arms run it; else why not
    (a policy made without the budget features does not fit an optimizer with a budget)."""
    import torch

    from rlopt import RLSwitchingOptimizer

    try:
        RLSwitchingOptimizer(
            [torch.nn.Parameter(torch.zeros(1))],
            choices=["sgd", "sam"],
            policy=name,
            interval=cfg.interval,
            total_steps=100,
            compute_budget=0.15,
            train_policy=None,
        )
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        return f"learned policy '{name}' does not fit the budgeted arms ({e}): its arms are skipped"
    return None


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    t0 = time.time()  # the time budget counts from here: the data's first decoding included
    ap = _parser()
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.command == "analyse":
        summary = analyse(out, args.reference)
        print((out / "table.md").read_text())
        return summary
    learned, why = _learned_name(args.learned)
    base = config_from_args(args, method="switch", seed=0, out_dir=str(out / "runs"))
    if learned is not None:
        why = _learned_fits(learned, base)
        learned = None if why else learned
    if why and args.command == "run":
        print(why)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else runs_path("decide_ckpt", out.name)
    try:
        data = load_dataset(
            base.dataset,
            base.data_dir,
            base.download,
            base.val_fraction,
            seed=0,
            cache_dir=base.cache_dir,
            max_train=base.max_train,
            max_test=base.max_test,
        )
    except MissingDataError as e:
        fail(ap, missing_data_message(e))
    spe = len(data.train_y) // base.batch_size
    if base.max_steps_per_epoch is not None:
        spe = min(spe, base.max_steps_per_epoch)
    arm_list = arms(args.budgets, learned)
    job_list = jobs(base, range(args.seeds), args.noise, arm_list, spe)
    if args.command == "worker":
        from .train import environment, resolve_device

        env = environment(resolve_device(base.device))
        res = work(
            job_list,
            data,
            ckpt,
            args.deadline or math.inf,
            args.unit_seconds,
            args.run_overhead,
            spe,
            env.get("gpu", env["device"]),
            log=lambda s: print(f"[w{args.worker_id}] {s}", flush=True),
        )
        print(f"[w{args.worker_id}] made {len(res['made'])} run(s); left {len(res['left'])}", flush=True)
        return res
    # run: clear stale claims (one driver at a time), then the workers
    deadline = t0 + args.time_budget if args.time_budget is not None else math.inf
    (out / "runs").mkdir(parents=True, exist_ok=True)
    for c in (out / "runs").glob("*.claim"):
        c.unlink()
    before = {j.cfg.run_name() for j in job_list if _reusable(j.cfg) is not None}
    print(
        f"{len(job_list)} runs in the experiment, {len(before)} already made; {spe} steps/epoch; branch epochs "
        + ", ".join(f"{j.arm.label} {j.branch_epoch}" for j in job_list[: len(arm_list)] if j.prefix is not None),
        flush=True,
    )
    if args.workers <= 1:
        from .train import environment, resolve_device

        env = environment(resolve_device(base.device))
        work(job_list, data, ckpt, deadline, args.unit_seconds, args.run_overhead, spe, env.get("gpu", env["device"]))
    else:
        argv = list(sys.argv[1:] if argv is None else argv)
        argv[argv.index("run")] = "worker"
        procs = []
        for i in range(args.workers):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.decide",
                *argv,
                "--deadline",
                repr(deadline),
                "--worker-id",
                str(i),
            ]
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(__file__).resolve().parents[1])] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
            )
            procs.append(subprocess.Popen(cmd, env=env))
            time.sleep(1.0)  # staggered: the first claims go to different runs
        for p in procs:
            p.wait()
    after = {j.cfg.run_name() for j in job_list if _reusable(j.cfg) is not None}
    missing = [j.cfg.run_name() for j in job_list if j.cfg.run_name() not in after]
    print(
        f"made {len(after - before)} run(s) in {time.time() - t0:.0f} s; {len(after)} of {len(job_list)} done"
        + (f"; missing: {', '.join(missing)}" if missing else ""),
        flush=True,
    )
    return {"made": sorted(after - before), "done": sorted(after), "missing": missing, "skipped_learned": why}


if __name__ == "__main__":
    main()
