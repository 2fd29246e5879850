"""Tabular Q-learning over configurations with variance-adaptive exploration.

After Vashishtha (2025), "Adaptive Hyperparameter Optimization ... with Dynamic
Exploration-Exploitation Balancing". The state is the current configuration; an action moves one
dimension one ``step`` down or up the grid (a neighbourhood move); the reward is the objective of
the configuration moved to. Per finished trial, for the walker that made it::

    Q(s, a) <- Q(s, a) + alpha * (r + gamma * max_a' Q(s', a') - Q(s, a))     # s' = new config
    eps(t)  =  eps_min + (eps_max - eps_min) * exp(-k * t)
    k       =  max(0, k0 + sign * lam * Var_a Q(s, a))                          # s = walker's config

``t`` is the number of finished trials seen. The paper's formula has ``sign = +1`` (a high
Q-variance speeds the decay, ``variance_effect="speeds"``); its prose says a high variance should
slow the decay, offered as ``variance_effect="slows"`` (``sign = -1``). ``k`` is clipped at 0
so that epsilon never exceeds ``eps_max`` (a departure: the paper does not say what a negative
``k`` does). Moves that would leave the grid are never taken; the maximum and the variance run
over the admissible moves only; ties in ``argmax`` are broken at random.

Several walkers (``n_walkers``) search side by side, trial ``n`` belonging to walker
``n % n_walkers``, so parallel trials come from different walkers. A walker's first trial is a
uniformly random configuration. Observations that are not a single move from the walker's
configuration (another sampler's trial, an enqueued one) update no Q-value but do move the walker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .base import Observation, check_reward_transform, check_sizes, transform_reward

__all__ = ["QLearningAgent", "QLearningState"]

VARIANCE_EFFECTS = {"speeds": 1.0, "slows": -1.0}


@dataclass
class QLearningState:
    """Everything a :class:`QLearningAgent` has learnt (made by ``init_state``)."""

    sizes: list[int]
    q: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)
    walkers: list[Optional[tuple[int, ...]]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    t: int = 0


class QLearningAgent:
    """Q-learning agent with the adaptive epsilon schedule above.

    Args:
        alpha: Q-learning rate, in (0, 1].
        gamma: discount, in [0, 1).
        eps_max, eps_min: exploration range, ``0 <= eps_min <= eps_max <= 1``.
        k0: base decay rate (>= 0).
        lam: weight of the Q-variance term (>= 0).
        variance_effect: ``"speeds"`` (the paper's formula) or ``"slows"`` (its prose).
        n_walkers: walkers searching side by side (>= 1).
        step: grid steps per move (>= 1).
        reward: ``"raw"`` or ``"rank"`` (see :func:`rlopt.hpo.base.transform_reward`); the variance
            term's scale depends on the reward's, so ``lam`` is in units of reward^-2 when raw.

    Example:
        >>> agent = QLearningAgent(n_walkers=2)
        >>> state = agent.init_state((3, 4), seed=0)
        >>> agent.observe(state, Observation(0, (1, 1), 0.5))
        >>> rng = np.random.default_rng([0, 2])
        >>> len(agent.propose(state, 2, rng))
        2
    """

    def __init__(
        self,
        *,
        alpha: float = 0.1,
        gamma: float = 0.9,
        eps_max: float = 1.0,
        eps_min: float = 0.05,
        k0: float = 0.05,
        lam: float = 1.0,
        variance_effect: str = "speeds",
        n_walkers: int = 1,
        step: int = 1,
        reward: str = "raw",
    ):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha}")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma: {gamma}")
        if not (0.0 <= eps_min <= eps_max <= 1.0):
            raise ValueError(
                f"Invalid epsilon range: eps_min={eps_min}, eps_max={eps_max} (expected 0 <= eps_min <= eps_max <= 1)"
            )
        if not 0.0 <= k0 < math.inf:
            raise ValueError(f"Invalid k0: {k0}")
        if not 0.0 <= lam < math.inf:
            raise ValueError(f"Invalid lam: {lam}")
        if variance_effect not in VARIANCE_EFFECTS:
            raise ValueError(f"Invalid variance_effect: {variance_effect!r} (expected 'speeds' or 'slows')")
        if isinstance(n_walkers, bool) or not isinstance(n_walkers, int) or n_walkers < 1:
            raise ValueError(f"Invalid n_walkers: {n_walkers!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 1:
            raise ValueError(f"Invalid step: {step!r}")
        check_reward_transform(reward)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.eps_max, self.eps_min = float(eps_max), float(eps_min)
        self.k0, self.lam, self.variance_effect = float(k0), float(lam), variance_effect
        self.n_walkers, self.step, self.reward = n_walkers, step, reward

    def __repr__(self) -> str:
        return (
            f"QLearningAgent(alpha={self.alpha}, gamma={self.gamma}, eps_max={self.eps_max}, "
            f"eps_min={self.eps_min}, k0={self.k0}, lam={self.lam}, variance_effect='{self.variance_effect}', "
            f"n_walkers={self.n_walkers}, step={self.step}, reward='{self.reward}')"
        )

    # ---- state -------------------------------------------------------------------------------
    def init_state(self, sizes: Sequence[int], seed: Optional[int] = None) -> QLearningState:
        return QLearningState(sizes=check_sizes(sizes), walkers=[None] * self.n_walkers)

    def _q(self, state: QLearningState, s: tuple[int, ...]) -> np.ndarray:
        if s not in state.q:
            state.q[s] = np.zeros(2 * len(state.sizes))
        return state.q[s]

    def valid_actions(self, state: QLearningState, s: tuple[int, ...]) -> np.ndarray:
        """Indices ``2 * dim + (0 down | 1 up)`` of the moves that stay on the grid."""
        acts = []
        for d, (i, n) in enumerate(zip(s, state.sizes)):
            if i - self.step >= 0:
                acts.append(2 * d)
            if i + self.step < n:
                acts.append(2 * d + 1)
        return np.asarray(acts, dtype=np.int64)

    def move(self, s: tuple[int, ...], a: int) -> tuple[int, ...]:
        d, up = divmod(int(a), 2)
        out = list(s)
        out[d] += self.step if up else -self.step
        return tuple(out)

    def action_between(self, s: tuple[int, ...], s_next: tuple[int, ...]) -> Optional[int]:
        """The move taking ``s`` to ``s_next``, or None when it is not a single move."""
        diff = [(d, b - a) for d, (a, b) in enumerate(zip(s, s_next)) if a != b]
        if len(diff) != 1 or abs(diff[0][1]) != self.step:
            return None
        d, delta = diff[0]
        return 2 * d + (1 if delta > 0 else 0)

    def epsilon(self, state: QLearningState, s: tuple[int, ...]) -> float:
        acts = self.valid_actions(state, s)
        var = float(np.var(self._q(state, s)[acts])) if len(acts) else 0.0
        k = max(0.0, self.k0 + VARIANCE_EFFECTS[self.variance_effect] * self.lam * var)
        return self.eps_min + (self.eps_max - self.eps_min) * math.exp(-k * state.t)

    # ---- learning ----------------------------------------------------------------------------
    def observe(self, state: QLearningState, obs: Observation) -> None:
        r = transform_reward(obs.reward, state.rewards, self.reward)
        state.rewards.append(float(obs.reward))
        w = obs.number % self.n_walkers
        s, s_next = state.walkers[w], tuple(int(i) for i in obs.index)
        if s is not None:
            a = self.action_between(s, s_next)
            if a is not None:
                acts_next = self.valid_actions(state, s_next)
                q_next = float(np.max(self._q(state, s_next)[acts_next])) if len(acts_next) else 0.0
                q = self._q(state, s)
                q[a] += self.alpha * (r + self.gamma * q_next - q[a])
        state.walkers[w] = s_next
        state.t += 1

    def propose(self, state: QLearningState, number: int, rng: np.random.Generator) -> tuple[int, ...]:
        s = state.walkers[number % self.n_walkers]
        if s is None:
            return tuple(int(rng.integers(n)) for n in state.sizes)
        acts = self.valid_actions(state, s)
        if len(acts) == 0:
            return s
        if rng.random() < self.epsilon(state, s):
            a = int(rng.choice(acts))
        else:
            q = self._q(state, s)[acts]
            best = acts[q == q.max()]
            a = int(best[0]) if len(best) == 1 else int(rng.choice(best))
        return self.move(s, a)
