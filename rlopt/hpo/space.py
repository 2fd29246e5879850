"""A finite grid over an Optuna search space: the action space of the search agents.

Every parameter becomes an ordered list of candidate values (a *dimension*); a configuration is a
tuple of indices, one per dimension, so the agents see only ``sizes`` (the number of values of each
dimension) and never the values themselves.

- ``FloatDistribution``: ``n_bins`` values spread evenly over ``[low, high]`` (evenly in log-space
  when ``log=True``); with a ``step``, the multiples of the step when there are at most ``n_bins``
  of them, otherwise ``n_bins`` evenly spread multiples.
- ``IntDistribution``: every admissible integer when there are at most ``n_bins`` of them,
  otherwise ``n_bins`` spread evenly (log-spaced when ``log=True``), rounded to admissible values.
- ``CategoricalDistribution``: the choices, in their given order (agents that move to neighbours
  treat that order as meaningful; list ordinal choices in order).

A value not on the grid (a trial from another sampler, or an enqueued one) is mapped to the nearest
grid value (nearest in log-space for log distributions); a categorical value must be one of the choices.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from optuna.distributions import FloatDistribution, IntDistribution

__all__ = ["Dimension", "GridSpace"]


class Dimension:
    """One parameter's grid: ``values`` (ordered) and how to find the nearest one."""

    def __init__(self, name: str, distribution: Any, n_bins: int):
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        self.name = name
        self.distribution = distribution
        self.log = bool(getattr(distribution, "log", False))
        self.categorical = isinstance(distribution, CategoricalDistribution)
        if self.categorical:
            if len(distribution.choices) == 0:
                raise ValueError(f"Invalid search space: parameter '{name}' has no choices")
            self.values: list[Any] = list(distribution.choices)
        elif isinstance(distribution, IntDistribution):
            self.values = _int_values(distribution, n_bins)
        elif isinstance(distribution, FloatDistribution):
            self.values = _float_values(distribution, n_bins)
        else:
            raise ValueError(
                f"Invalid search space: parameter '{name}' has an unsupported distribution "
                f"{type(distribution).__name__}; expected FloatDistribution, IntDistribution "
                "or CategoricalDistribution"
            )
        if not self.categorical:
            grid = np.asarray(self.values, dtype=float)
            self._coords = np.log(grid) if self.log else grid

    def __len__(self) -> int:
        return len(self.values)

    def index(self, value: Any) -> int:
        """The index of ``value`` on this grid (nearest grid value for numbers)."""
        if self.categorical:
            for i, choice in enumerate(self.values):
                if choice == value or (choice is value):
                    return i
            raise ValueError(f"Value {value!r} is not a choice of parameter '{self.name}'")
        x = math.log(value) if self.log else float(value)
        return int(np.argmin(np.abs(self._coords - x)))


def _float_values(d: FloatDistribution, n_bins: int) -> list[float]:
    if d.step is not None:
        n_steps = int(round((d.high - d.low) / d.step)) + 1
        if n_steps <= n_bins:
            return [d.low + i * d.step for i in range(n_steps)]
        picks = np.unique(np.round(np.linspace(0, n_steps - 1, n_bins)).astype(int))
        return [d.low + int(i) * d.step for i in picks]
    if d.low == d.high:
        return [float(d.low)]
    if d.log:
        return [float(v) for v in np.geomspace(d.low, d.high, n_bins)]
    return [float(v) for v in np.linspace(d.low, d.high, n_bins)]


def _int_values(d: IntDistribution, n_bins: int) -> list[int]:
    step = d.step
    n_steps = (d.high - d.low) // step + 1
    if n_steps <= n_bins:
        return [d.low + i * step for i in range(n_steps)]
    raw = np.geomspace(d.low, d.high, n_bins) if d.log else np.linspace(d.low, d.high, n_bins)
    snapped = sorted({int(d.low + round((v - d.low) / step) * step) for v in raw})
    return [min(max(v, d.low), d.high) for v in snapped]


class GridSpace:
    """The product grid of a ``{name: optuna distribution}`` search space.

    Args:
        search_space: parameter name -> Optuna distribution (names are sorted, so the grid does not
            depend on insertion order).
        n_bins: values per continuous (or large integer) dimension; at least 2.

    Example:
        >>> from optuna.distributions import FloatDistribution, CategoricalDistribution
        >>> g = GridSpace({"lr": FloatDistribution(1e-4, 1e-1, log=True),
        ...                "act": CategoricalDistribution(["relu", "tanh"])}, n_bins=4)
        >>> g.sizes
        (2, 4)
        >>> g.decode((1, 3))
        {'act': 'tanh', 'lr': 0.1}
    """

    def __init__(self, search_space: dict[str, Any], n_bins: int = 10):
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
            raise ValueError(f"Invalid n_bins: {n_bins!r} (expected an integer >= 2)")
        if not isinstance(search_space, dict) or len(search_space) == 0:
            raise ValueError("Invalid search space: expected a non-empty dict of Optuna distributions")
        self.names: list[str] = sorted(search_space)
        self.dims: list[Dimension] = [Dimension(n, search_space[n], n_bins) for n in self.names]
        self.sizes: tuple[int, ...] = tuple(len(d) for d in self.dims)

    @property
    def n_configs(self) -> int:
        return int(np.prod(self.sizes, dtype=np.int64))

    def decode(self, index: Sequence[int]) -> dict[str, Any]:
        """Index tuple -> ``{name: value}``."""
        if len(index) != len(self.dims):
            raise ValueError(f"Expected {len(self.dims)} indices, got {len(index)}")
        return {d.name: d.values[int(i)] for d, i in zip(self.dims, index)}

    def encode(self, params: dict[str, Any]) -> tuple[int, ...]:
        """``{name: value}`` -> index tuple (nearest grid value per dimension)."""
        return tuple(d.index(params[d.name]) for d in self.dims)
