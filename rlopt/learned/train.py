"""Meta-train a learned update rule: ``python -m rlopt.learned.train --help``.

Antithetic ES (:mod:`rlopt.learned.es`) over the task distribution of
:mod:`rlopt.learned.tasks`; every ``--eval-every`` iterations the rule is scored on a fixed
validation set of tasks (even seeds, like training; the evaluation's odd seeds stay unseen) and
the best one so far is written to ``--out``. The trainer's full state (weights, meta-optimizer,
random generator, history) is saved to ``--out``'s ``.state.pt`` sibling after every
evaluation; ``--resume`` continues from it and draws the same tasks as an uninterrupted run.

Example (the shipped ``learned-es`` rule)::

    python -m rlopt.learned.train --data rlopt/meta/data/fmnist_subset.npz --iterations 300 \\
        --out rlopt/registry/learned-es.pt --register learned-es
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Optional

import torch

from .es import ESConfig, ESTrainer
from .rule import LearnedRule
from .tasks import TRAIN_FAMILIES, Data, TaskDistribution, load_fmnist, sample_task

__all__ = ["main", "validation_tasks"]


def validation_tasks(families: Sequence[str], data: Data, per_family: int = 2) -> list:
    """A fixed set of tasks from the training families (even seeds from their own range)."""
    return [sample_task(f, 2 * (1_000_000 + i), data) for f in families for i in range(per_family)]


def _progress(total: int, initial: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm(total=total, initial=initial, disable=not enabled, desc="ES", unit="it")


def _register(name: str, rule_path: str, info: dict) -> None:
    from ..registry import _HERE

    index_path = os.path.join(_HERE, "index.json")
    index = {}
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
    target = os.path.join(_HERE, f"{name}.pt")
    if os.path.abspath(rule_path) != os.path.abspath(target):
        import shutil

        shutil.copyfile(rule_path, target)
    index[name] = info
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")


def main(argv: Optional[list[str]] = None) -> LearnedRule:
    ap = argparse.ArgumentParser(
        prog="python -m rlopt.learned.train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument(
        "--data",
        default=None,
        help="Fashion-MNIST .npz (train_x, train_y) for the MLP tasks; without it they use random-teacher data",
    )
    ap.add_argument("--families", default=",".join(TRAIN_FAMILIES), help="comma-separated task families")
    ap.add_argument("--iterations", type=int, default=300, help="ES iterations")
    ap.add_argument("--pairs", type=int, default=ESConfig.pairs, help="antithetic pairs per iteration")
    ap.add_argument("--tasks-per-iter", type=int, default=ESConfig.tasks_per_iter, help="tasks per iteration")
    ap.add_argument("--steps", type=int, default=ESConfig.steps, help="episode length T (the horizon)")
    ap.add_argument("--sigma", type=float, default=ESConfig.sigma, help="ES perturbation scale")
    ap.add_argument("--meta-lr", type=float, default=ESConfig.meta_lr, help="Adam step size on the rule's weights")
    ap.add_argument("--lr", type=float, default=ESConfig.lr, help="base learning rate of the rule")
    ap.add_argument("--hidden", type=int, default=ESConfig.hidden, help="hidden width of the rule's MLP")
    ap.add_argument("--p-rescale", type=float, default=0.5, help="probability of weight-rescaling augmentation")
    ap.add_argument("--rescale", type=float, default=10.0, help="rescaling factors in [1/x, x]")
    ap.add_argument("--seed", type=int, default=0, help="seed of tasks, perturbations and the initial rule")
    ap.add_argument("--eval-every", type=int, default=25, help="validate (and checkpoint) every N iterations")
    ap.add_argument("--out", default="benchmarks/runs/learned/rule.pt", help="where the best rule is written")
    ap.add_argument("--resume", action="store_true", help="continue from --out's .state.pt if it exists")
    ap.add_argument(
        "--register",
        default=None,
        metavar="NAME",
        help="also add the rule to rlopt's registry as NAME (index.json entry with the command)",
    )
    ap.add_argument(
        "--description",
        default="Coordinate-wise MLP update rule (LearnedOptimizer), meta-trained "
        "by antithetic ES on quadratics, Rosenbrock, logistic regression "
        "and small MLPs",
        help="registry description",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = load_fmnist(args.data) if args.data else None
    families = [f for f in args.families.split(",") if f]
    config = ESConfig(
        pairs=args.pairs,
        tasks_per_iter=args.tasks_per_iter,
        steps=args.steps,
        sigma=args.sigma,
        meta_lr=args.meta_lr,
        lr=args.lr,
        hidden=args.hidden,
        seed=args.seed,
    )
    trainer = ESTrainer(config, TaskDistribution(families, data, p_rescale=args.p_rescale, rescale=args.rescale))
    val = validation_tasks(families, data)
    state_path = os.path.splitext(args.out)[0] + ".state.pt"
    best: dict[str, Any] = {"objective": trainer.evaluate(val), "iteration": 0, "theta": trainer.theta.clone()}
    elapsed = 0.0
    if args.resume and os.path.isfile(state_path):
        sd = torch.load(state_path, weights_only=True)
        trainer.load_state_dict(sd["trainer"])
        best = {
            "objective": float(sd["best_objective"]),
            "iteration": int(sd["best_iteration"]),
            "theta": sd["best_theta"],
        }
        elapsed = float(sd["elapsed_s"])
    bar = _progress(args.iterations, trainer.iteration, not args.no_progress)
    start = time.perf_counter() - elapsed
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    meta = {
        "algo": "es",
        "config": asdict(config),
        "families": families,
        "data": "fmnist" if data is not None else "teacher",
        "p_rescale": args.p_rescale,
        "rescale": args.rescale,
    }

    def save_rule() -> LearnedRule:
        rule = LearnedRule(
            trainer.spec,
            best["theta"],
            lr=config.lr,
            meta={**meta, "best_iteration": best["iteration"], "validation_objective": best["objective"]},
        )
        rule.save(args.out)
        return rule

    while trainer.iteration < args.iterations:
        rec = trainer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(objective=f"{rec['objective']:.3f}", best=f"{best['objective']:.3f}")
        if trainer.iteration % args.eval_every == 0 or trainer.iteration == args.iterations:
            score = trainer.evaluate(val)
            trainer.history[-1]["validation"] = score
            if score < best["objective"]:
                best = {"objective": score, "iteration": trainer.iteration, "theta": trainer.theta.clone()}
            save_rule()
            torch.save(
                {
                    "trainer": trainer.state_dict(),
                    "best_objective": best["objective"],
                    "best_iteration": best["iteration"],
                    "best_theta": best["theta"],
                    "elapsed_s": time.perf_counter() - start,
                },
                state_path,
            )
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - start
    rule = save_rule()
    print(
        f"best validation objective {best['objective']:.4f} at iteration {best['iteration']} "
        f"({trainer.iteration} iterations, {train_time:.0f} s); rule written to {args.out}"
    )
    if args.register:
        argv_used = sys.argv[1:] if argv is None else list(argv)
        info = {
            "description": args.description,
            "command": "python -m rlopt.learned.train " + " ".join(shlex.quote(a) for a in argv_used),
            "optimizer": "learned",
            "algo": "es",
            "iterations": trainer.iteration,
            "episodes": trainer.iteration * config.tasks_per_iter * (2 * config.pairs + 1),
            "horizon": config.steps,
            "lr": config.lr,
            "validation_objective": round(best["objective"], 4),
            "train_time_s": round(train_time, 1),
            "trained_on": f"CPU ({platform.machine()}), {torch.get_num_threads()} thread(s), torch {torch.__version__}",
        }
        _register(args.register, args.out, info)
        print(f"registered as '{args.register}'")
    return rule


if __name__ == "__main__":
    main()
