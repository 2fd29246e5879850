"""One search run: a sampler spends ``budget`` evaluations on a task table; its trajectory is kept.

Samplers (all on the task's encoded space, equal budget):

- ``grid``: configurations in enumeration order (row-major), truncated at the budget, as the seed's
  truncated Ray Tune grid; deterministic, so one run per task whatever the seed.
- ``grid-shuffled``: the grid in a random order (random search without repeats).
- ``random``: Optuna's ``RandomSampler``.
- ``tpe``: Optuna's ``TPESampler(multivariate=True)``; ``cmaes``: ``CmaEsSampler`` (categorical
  parameters go to its independent random sampler, so on NAS-Bench-201 it is random search);
  ``gp``: ``GPSampler``.
- ``q-formula`` / ``q-prose``: :class:`rlopt.hpo.QLearningAgent` with the defaults, the variance
  term speeding (the paper's formula) or slowing (its prose) the epsilon decay. With raw rewards on
  these scales the variance term is negligible against ``k0``, so ``q-formula-rank`` /
  ``q-prose-rank`` repeat the pair with rank rewards, ``alpha=0.5`` and ``lam=20``, where it is not.
- ``reinforce-seed``: :class:`rlopt.hpo.ReinforceAgent`, factored MLP policy, the seed's settings
  (policy lr 1e-3, 16 trials per update, discount 0.99) plus an EMA baseline.
- ``reinforce-mlp`` / ``reinforce-rnn``: REINFORCE set for short budgets: lr 0.05, 8 trials per
  update, rank rewards, EMA baseline; factored MLP or autoregressive GRU policy.
- ``meta``: ``reinforce-mlp`` started from a meta-trained policy (``--pretrained``; policy lr 0.01).
- ``portfolio``: the control for ``meta`` without any learning: configurations in order of their
  mean normalised value over the *other* tasks of the family (HPOBench only), best first.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .tasks import Task


def _optuna_sampler(name: str, seed: int):
    import optuna

    from rlopt.hpo import QLearningAgent, ReinforceAgent, RLSampler

    makers: dict[str, Callable] = {
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(multivariate=True, seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "gp": lambda: optuna.samplers.GPSampler(seed=seed),
        "q-formula": lambda: RLSampler(QLearningAgent(variance_effect="speeds"), seed=seed),
        "q-prose": lambda: RLSampler(QLearningAgent(variance_effect="slows"), seed=seed),
        "q-formula-rank": lambda: RLSampler(
            QLearningAgent(variance_effect="speeds", reward="rank", alpha=0.5, lam=20.0), seed=seed
        ),
        "q-prose-rank": lambda: RLSampler(
            QLearningAgent(variance_effect="slows", reward="rank", alpha=0.5, lam=20.0), seed=seed
        ),
        "reinforce-seed": lambda: RLSampler(
            ReinforceAgent(policy="mlp", lr=1e-3, batch_size=16, gamma=0.99), seed=seed
        ),
        "reinforce-mlp": lambda: RLSampler(
            ReinforceAgent(policy="mlp", lr=0.05, batch_size=8, reward="rank"), seed=seed
        ),
        "reinforce-rnn": lambda: RLSampler(
            ReinforceAgent(policy="rnn", lr=0.05, batch_size=8, reward="rank"), seed=seed
        ),
    }
    return makers[name]()


SAMPLERS = [
    "grid",
    "grid-shuffled",
    "random",
    "tpe",
    "cmaes",
    "gp",
    "q-formula",
    "q-prose",
    "q-formula-rank",
    "q-prose-rank",
    "reinforce-seed",
    "reinforce-mlp",
    "reinforce-rnn",
]


def run_search(
    task: Task, sampler: str, seed: int, budget: int, pretrained: dict = None, portfolio: np.ndarray = None
) -> dict[str, np.ndarray]:
    """``budget`` evaluations; returns the flat index and the observed value of each, and the
    sampler's seconds per evaluation (everything but the table look-up)."""
    rng = np.random.default_rng([seed, 7])
    n = int(np.prod(task.sizes))
    flat = np.empty(budget, dtype=np.int64)
    seen = np.empty(budget)
    cost = np.zeros(budget)

    def look_up(i: int, idx) -> float:
        flat[i] = np.ravel_multi_index(idx, task.sizes)
        seen[i] = task.draws[idx + (int(rng.integers(task.count[idx])),)]
        return float(seen[i])

    if sampler in ("grid", "grid-shuffled", "portfolio"):
        if sampler == "portfolio":
            order = portfolio[:budget]
        else:
            order = (
                np.arange(budget) if sampler == "grid" else np.random.default_rng([seed, 11]).permutation(n)[:budget]
            )
        t0 = time.perf_counter()
        for i, f in enumerate(order):
            look_up(i, tuple(int(k) for k in np.unravel_index(int(f), task.sizes)))
        cost[:] = (time.perf_counter() - t0) / budget
        return {"flat": flat, "seen": seen, "cost": cost}

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if sampler == "meta":
        from rlopt.hpo import ReinforceAgent, RLSampler

        s = RLSampler(ReinforceAgent(policy="mlp", lr=0.01, batch_size=8, reward="rank", init=pretrained), seed=seed)
    else:
        s = _optuna_sampler(sampler, seed)
    study = optuna.create_study(sampler=s)
    space = task.optuna_space()
    marks = [time.perf_counter()]
    lookups = np.zeros(budget)
    for i in range(budget):
        trial = study.ask(space)
        t = time.perf_counter()
        value = look_up(i, task.index(trial.params))
        lookups[i] = time.perf_counter() - t
        study.tell(trial, value)
        marks.append(time.perf_counter())
    cost[:] = np.diff(marks) - lookups
    return {"flat": flat, "seen": seen, "cost": cost}


def incumbents(seen: np.ndarray) -> np.ndarray:
    """Position of the incumbent (the first evaluation with the best *observed* value so far) after each evaluation."""
    pos = np.zeros(len(seen), dtype=np.int64)
    best = 0
    for i in range(len(seen)):
        if seen[i] < seen[best]:
            best = i
        pos[i] = best
    return pos


def regret_curve(task: Task, flat: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Oracle regret (mean value minus the best mean value) of the incumbent after each evaluation."""
    return task.mean.reshape(-1)[flat[incumbents(seen)]] - task.best
