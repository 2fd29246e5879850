"""``RLSampler``: an Optuna sampler whose relative proposals come from a search agent.

For each new trial the sampler

1. takes the *relative search space*: ``search_space`` if given, else the parameters (with
   identical distributions) present in every finished trial so far (Optuna's intersection search
   space); parameters outside it, conditional ones included, go to ``independent_sampler``
   (a seeded ``RandomSampler`` by default);
2. grids that space (:class:`rlopt.hpo.space.GridSpace`, ``n_bins`` values per continuous dimension);
3. rebuilds the agent's state from the seed and the study's finished trials (``COMPLETE`` ones with
   their value; ``PRUNED`` ones with their last reported intermediate value; failed ones skipped),
   taken in trial-number order, each mapped to the nearest grid point;
4. asks the agent for trial ``number``'s configuration with an RNG seeded by ``(seed, number)``.

The agent's state is therefore a function of the study's storage and the seed alone: a study
resumes from SQLite or a journal file, several processes can share one storage (each proposal sees
the trials finished so far), and a sequential rerun with the same seed repeats itself exactly. The
sampler keeps the last rebuilt state in memory only as a cache, used when the new list of trials
extends the cached one.

Single-objective studies only. The objective's direction is respected (rewards are the value for
``maximize``, minus the value for ``minimize``).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from .base import Observation
from .space import GridSpace

try:
    import optuna
    from optuna.samplers import BaseSampler
    from optuna.trial import TrialState
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("rlopt.hpo.sampler needs Optuna: pip install 'rlopt[hpo]'") from e

if TYPE_CHECKING:
    from optuna.study import Study
    from optuna.trial import FrozenTrial

__all__ = ["RLSampler"]


class RLSampler(BaseSampler):
    """An Optuna sampler driven by a :class:`~rlopt.hpo.QLearningAgent` or
    :class:`~rlopt.hpo.ReinforceAgent` (or any object with ``init_state``/``observe``/``propose``).

    Args:
        agent: the search agent.
        seed: seed of the agent's initial state and of its per-trial draws (None: a random seed,
            drawn once, so reruns then differ).
        n_bins: grid values per continuous (or large integer) parameter, >= 2.
        search_space: optional fixed ``{name: distribution}``; default: the intersection of the
            finished trials' spaces (the first trial then comes from ``independent_sampler``).
        independent_sampler: sampler for parameters outside the relative space. The default draws
            each such value uniformly (Optuna's ``RandomSampler``) with a seed made from
            ``(seed, trial number, parameter name)``, so those draws too are a function of the seed
            and the trial alone, and a resumed study repeats them; a sampler given here keeps its own
            state (a resumed study then repeats only the relative parameters).

    Example:
        >>> import optuna
        >>> from rlopt.hpo import RLSampler, QLearningAgent
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study(sampler=RLSampler(agent=QLearningAgent(), seed=0))
        >>> study.optimize(lambda t: (t.suggest_float("x", -3, 3) - 1) ** 2, n_trials=20)
        >>> len(study.trials)
        20
    """

    def __init__(
        self,
        agent: Any,
        seed: Optional[int] = None,
        *,
        n_bins: int = 10,
        search_space: Optional[dict[str, Any]] = None,
        independent_sampler: Optional[BaseSampler] = None,
    ):
        for method in ("init_state", "observe", "propose"):
            if not callable(getattr(agent, method, None)):
                raise ValueError(f"Invalid agent: {type(agent).__name__} has no '{method}' method")
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
            raise ValueError(f"Invalid n_bins: {n_bins!r} (expected an integer >= 2)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"Invalid seed: {seed!r} (expected a non-negative integer or None)")
        if search_space is not None:
            GridSpace(search_space, n_bins)  # validates now rather than at the first trial
        self.agent = agent
        # (the stub types entropy as int, sequence or None; it is an int when SeedSequence draws it)
        self.seed = int(np.random.SeedSequence().entropy % (2**32)) if seed is None else int(seed)  # type: ignore[operator]
        self.n_bins = n_bins
        self._fixed_space = dict(search_space) if search_space is not None else None
        self._independent = independent_sampler
        self._intersection = optuna.search_space.IntersectionSearchSpace(include_pruned=True)
        self._cache: Optional[tuple] = None  # (space key, observation keys, agent state)
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock"], state["_cache"] = None, None  # the cache is rebuilt from storage on demand
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---- Optuna's sampler interface ----------------------------------------------------------
    def reseed_rng(self) -> None:
        """Reseed a user-given independent sampler. The agent's draws, and the default independent
        draws, need no reseeding: each is seeded by the trial number (unique within a study)."""
        if self._independent is not None:
            self._independent.reseed_rng()

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        if study._is_multi_objective():
            raise ValueError("RLSampler supports single-objective studies only")
        if self._fixed_space is not None:
            return dict(self._fixed_space)
        space = self._intersection.calculate(study)
        return {n: d for n, d in space.items() if not d.single()}

    def sample_relative(self, study: Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        if not search_space:
            return {}
        grid = GridSpace(search_space, self.n_bins)
        rng = np.random.default_rng([self.seed, trial.number])
        with self._lock:  # study.optimize(n_jobs>1) calls from several threads; the cache is shared
            state = self.agent_state(study, grid, search_space)
            index = self.agent.propose(state, trial.number, rng)
        return grid.decode(index)

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        if self._independent is not None:
            return self._independent.sample_independent(study, trial, param_name, param_distribution)
        key = np.random.SeedSequence([self.seed, trial.number, zlib.crc32(param_name.encode())])
        one_off = optuna.samplers.RandomSampler(seed=int(key.generate_state(1)[0]))
        return one_off.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        if self._independent is not None:
            self._independent.before_trial(study, trial)

    def after_trial(
        self, study: Study, trial: FrozenTrial, state: TrialState, values: Optional[Sequence[float]]
    ) -> None:
        if self._independent is not None:
            self._independent.after_trial(study, trial, state, values)

    # ---- the agent's state, rebuilt from storage ---------------------------------------------
    def observations(self, study: Study, grid: GridSpace, search_space: dict[str, Any]) -> list[Observation]:
        """The study's finished trials on this space as agent observations, in trial-number order."""
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        out = []
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        for t in sorted(trials, key=lambda t: t.number):
            if any(n not in t.params or t.distributions[n] != d for n, d in search_space.items()):
                continue
            if t.state == TrialState.COMPLETE:
                value = t.value
            elif t.intermediate_values:
                value = t.intermediate_values[max(t.intermediate_values)]
            else:
                continue
            if value is None or not np.isfinite(value):
                continue
            out.append(Observation(t.number, grid.encode(t.params), sign * float(value)))
        return out

    def agent_state(self, study: Study, grid: GridSpace, search_space: dict[str, Any]) -> Any:
        """The agent's state after the study's finished trials (replayed, or extended from the cache)."""
        obs = self.observations(study, grid, search_space)
        space_key = tuple((n, repr(search_space[n])) for n in grid.names)
        keys = [tuple(o) for o in obs]
        if self._cache is not None:
            c_space, c_keys, c_state = self._cache
            if c_space == space_key and keys[: len(c_keys)] == c_keys:
                for o in obs[len(c_keys) :]:
                    self.agent.observe(c_state, o)
                self._cache = (space_key, keys, c_state)
                return c_state
        state = self.agent.init_state(grid.sizes, self.seed)
        for o in obs:
            self.agent.observe(state, o)
        self._cache = (space_key, keys, state)
        return state
