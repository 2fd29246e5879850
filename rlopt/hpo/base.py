"""What every search agent shares: the observation record and the reward transforms.

An agent is a plain object holding only its settings. Its learning state is an explicit object
made by ``init_state(sizes, seed)``, advanced by ``observe(state, obs)`` once per finished trial
(in trial-number order) and read by ``propose(state, number, rng)``. So the state after a list of
observations is a pure function of those observations and the seed: a caller (the Optuna sampler)
can rebuild it from a study's storage at any time, and a rerun replays it identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Observation", "transform_reward"]

REWARD_TRANSFORMS = ("raw", "rank")


class Observation(NamedTuple):
    """One finished trial as an agent sees it.

    number: the trial number (decides which walker or batch it belongs to).
    index: the configuration as a tuple of grid indices.
    reward: higher is better (the sampler negates the value of a minimised objective).
    """

    number: int
    index: tuple[int, ...]  # type: ignore[assignment]  # a field named as tuple.index, by design
    reward: float


def transform_reward(reward: float, previous: Sequence[float], kind: str) -> float:
    """``"raw"``: the reward itself. ``"rank"``: its rank among ``previous`` rewards and itself,
    scaled to [-0.5, 0.5] (ties count half; a first reward is 0.0). Rank rewards do not depend on
    the objective's scale or on monotone transforms of it."""
    if kind == "raw":
        return float(reward)
    if len(previous) == 0:
        return 0.0
    prev = np.asarray(previous, dtype=float)
    below = float(np.sum(prev < reward)) + 0.5 * float(np.sum(prev == reward))
    return below / len(prev) - 0.5


def check_reward_transform(kind: str) -> None:
    if kind not in REWARD_TRANSFORMS:
        raise ValueError(f"Invalid reward transform: {kind!r} (expected one of {REWARD_TRANSFORMS})")


def check_sizes(sizes: Sequence[int]) -> list[int]:
    sizes = [int(s) for s in sizes]
    if len(sizes) == 0 or any(s < 1 for s in sizes):
        raise ValueError(f"Invalid grid sizes: {sizes} (expected at least one dimension, each of size >= 1)")
    return sizes
