"""Rule-based controllers for when to run SAM: hand-written schedules from the literature, with the
interface, checkpoints and registry names of the learned policies, so that they can be used as
they are and every learned policy can be measured against them.

* ``sam-late`` (:class:`SamLatePolicy`): SAM for the last part of the run, from the first decision
  at which the compute budget left can pay SAM to the end (SAM's benefit concentrates late in
  training: Zhou et al., ICLR 2025).
* ``sam-every:k`` (:class:`SamEveryPolicy`): SAM at every k-th decision.
* ``ss-sam`` (:class:`ScheduledRandomPolicy`): SAM at random with a probability that follows a
  schedule (SS-SAM, Zhao et al. 2022).
* ``ae-sam`` (:class:`AdaptiveSamPolicy`): SAM when the squared gradient norm is high against its
  running mean and standard deviation (AE-SAM, Jiang et al., ICLR 2023).

A rule sees only observation vectors, as every policy does: it reads the features it needs by
name through its observation layout (``obs_layout["names"]``). The budget features
(``budget_affordable``, ``steps_left``) exist when the optimizer has a ``compute_budget``; a rule
that needs one and finds none says so at its first decision. Rules never learn; the random one
draws from its own ``torch.Generator``, so a rule is deterministic given its seed.

Each rule chooses between two actions: ``sam`` (the costly one, ``"sam"`` by default) and
``base`` (by default the first other action).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from .base import Policy, _check_count, _require_keys, register_policy

__all__ = [
    "SamLateConfig",
    "SamLatePolicy",
    "SamEveryConfig",
    "SamEveryPolicy",
    "ScheduledRandomConfig",
    "ScheduledRandomPolicy",
    "AdaptiveSamConfig",
    "AdaptiveSamPolicy",
    "RULE_NAMES",
    "rule_from_name",
]

Action = Union[int, str]


class _Rule(Policy):
    """Two actions (``config.sam``, ``config.base``) and features read by name."""

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        self.sam = self._index(self.config.sam, "sam")
        base = self.config.base
        if base is None:
            others = [i for i in range(self.n_actions) if i != self.sam]
            if not others:
                raise ValueError(f"{self.kind} needs two actions, got {list(self.action_names)}")
            self.base = others[0]
        else:
            self.base = self._index(base, "base")
        if self.base == self.sam:
            raise ValueError(f"{self.kind}: sam and base are the same action ({self.action_names[self.sam]!r})")
        self.training = False  # rules never learn
        if self.obs_layout is not None:  # else checked at the first decision
            for name, why in self._needs():
                if not self._has(name):
                    raise ValueError(
                        f"{self.kind} reads the observation feature '{name}' ({why}), which this "
                        f"optimizer does not make"
                    )

    def _needs(self) -> Sequence[tuple[str, str]]:
        """The features this rule reads and why (checked when the layout is known)."""
        return ()

    def _index(self, action: Action, what: str) -> int:
        if isinstance(action, str):
            if action not in self.action_names:
                raise ValueError(
                    f"{self.kind}: {what} action '{action}' is not among the actions "
                    f"{list(self.action_names)} (give {type(self.config).__name__}({what}=...))"
                )
            return self.action_names.index(action)
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < self.n_actions:
            raise ValueError(f"{self.kind}: invalid {what} action index {action!r}")
        return action

    def _feature(self, obs: torch.Tensor, name: str, why: str) -> float:
        names = (self.obs_layout or {}).get("names") or ()
        if name not in names:
            raise ValueError(
                f"{self.kind} reads the observation feature '{name}' ({why}), which this optimizer "
                f"does not make: its features are {list(names)}"
            )
        return float(obs[list(names).index(name)])

    def _has(self, name: str) -> bool:
        return name in ((self.obs_layout or {}).get("names") or ())

    def train(self, mode: bool = True) -> Policy:
        super().train(mode)
        self.training = False  # nothing to learn
        return self


# ---------------------------------------------------------------------------------- SAM-late
@dataclass
class SamLateConfig:
    start: Optional[float] = None
    """Progress (0-1) from which SAM runs. None: from the first decision at which the compute budget
    left pays for SAM to the end (needs an optimizer with a ``compute_budget``)."""
    sam: Action = "sam"
    base: Optional[Action] = None


@register_policy
class SamLatePolicy(_Rule):
    """SAM for the last part of the run: ``sam`` once ``budget_affordable`` reaches 1 (the budget
    left pays for the costly choice on every remaining step), or once ``progress >= start``;
    ``base`` before."""

    kind = "sam-late"
    Config = SamLateConfig

    def _needs(self) -> Sequence[tuple[str, str]]:
        if self.config.start is None:
            return (("budget_affordable", "give the optimizer a compute_budget, or SamLateConfig(start=...)"),)
        return ()

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        start = self.config.start
        if start is not None and not (isinstance(start, (int, float)) and 0.0 <= start <= 1.0):
            raise ValueError(f"Invalid sam-late start: {start!r} (a progress in [0, 1])")

    def act(self, obs: torch.Tensor) -> int:
        obs = self._check_obs(obs)
        if self.config.start is None:
            affordable = self._feature(
                obs, "budget_affordable", "give the optimizer a compute_budget, or SamLateConfig(start=...)"
            )
            return self.sam if affordable >= 1.0 - 1e-5 else self.base
        progress = (self._feature(obs, "progress", "the run's progress") + 1.0) / 2.0
        return self.sam if progress >= self.config.start - 1e-6 else self.base


# ---------------------------------------------------------------------------------- every k
@dataclass
class SamEveryConfig:
    k: int = 2
    """SAM at decisions 0, k, 2k, ... (with ``interval=1``: every k-th step)."""
    sam: Action = "sam"
    base: Optional[Action] = None


@register_policy
class SamEveryPolicy(_Rule):
    """``sam`` at every ``k``-th decision (the first included), ``base`` otherwise."""

    kind = "sam-every"
    Config = SamEveryConfig

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        k = self.config.k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid sam-every k: {k!r} (a positive int)")
        self.decisions = 0

    def act(self, obs: torch.Tensor) -> int:
        self._check_obs(obs)
        action = self.sam if self.decisions % self.config.k == 0 else self.base
        self.decisions += 1
        return action

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decisions": self.decisions}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        super()._check_state(state)
        _require_keys(state, ("decisions",), "SamEveryPolicy state")
        _check_count(state["decisions"], "decision count")

    def _load_state(self, state: Mapping[str, Any]) -> None:
        super()._load_state(state)
        self.decisions = int(state["decisions"])


# ---------------------------------------------------------------------------------- SS-SAM
_SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class ScheduledRandomConfig:
    share: Optional[float] = None
    """Mean probability of SAM over the run. None: ``budget_affordable``, the share of the remaining
    steps the budget left pays for (spends the budget at random, evenly)."""
    schedule: str = "constant"
    """How the probability moves with progress t in [0, 1]: ``constant`` (p), ``linear`` (2 p t,
    rising from 0) or ``cosine`` (p (1 - cos(pi t))); each has mean p over the run, clipped to 1."""
    sam: Action = "sam"
    base: Optional[Action] = None


@register_policy
class ScheduledRandomPolicy(_Rule):
    """``sam`` with probability ``share * schedule(progress)``, drawn from the policy's generator."""

    kind = "ss-sam"
    Config = ScheduledRandomConfig

    def _needs(self) -> Sequence[tuple[str, str]]:
        if self.config.share is None:
            return (("budget_affordable", "give the optimizer a compute_budget, or ScheduledRandomConfig(share=...)"),)
        return ()

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        share, schedule = self.config.share, self.config.schedule
        if share is not None and (
            isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0
        ):
            raise ValueError(f"Invalid ss-sam share: {share!r} (a probability in [0, 1])")
        if schedule not in _SCHEDULES:
            raise ValueError(f"Unknown ss-sam schedule {schedule!r}; expected one of {list(_SCHEDULES)}")

    def probability(self, obs: torch.Tensor) -> float:
        share = self.config.share
        if share is None:
            share = self._feature(
                obs, "budget_affordable", "give the optimizer a compute_budget, or ScheduledRandomConfig(share=...)"
            )
        if self.config.schedule == "constant":
            return min(1.0, share)
        t = (self._feature(obs, "progress", "the schedule follows the run's progress") + 1.0) / 2.0
        shape = 2.0 * t if self.config.schedule == "linear" else 1.0 - math.cos(math.pi * t)
        return min(1.0, max(0.0, share * shape))

    def act(self, obs: torch.Tensor) -> int:
        obs = self._check_obs(obs)
        p = self.probability(obs)
        draw = float(torch.rand((), generator=self.generator))  # drawn every time: the stream never shifts
        return self.sam if draw < p else self.base


# ---------------------------------------------------------------------------------- AE-SAM
@dataclass
class AdaptiveSamConfig:
    threshold: float = 0.0
    """SAM when the squared gradient norm is strictly above ``mean + threshold * std`` of its running
    statistics."""
    threshold_end: Optional[float] = None
    """If given, the threshold moves linearly with progress from ``threshold`` to this."""
    decay: float = 0.9
    """Decay of the running mean and variance (exponential moving averages)."""
    sam: Action = "sam"
    base: Optional[Action] = None


@register_policy
class AdaptiveSamPolicy(_Rule):
    """AE-SAM's rule on what the observation holds: the squared gradient norm relative to the first
    interval's, ``x = exp(2 atanh(grad_norm_level))`` (a common scale does not change a z-score),
    compared with the running mean ``m`` and variance ``v`` of the earlier ones: ``sam`` when
    ``x > m + c sqrt(v)``, then ``m, v`` take ``x`` in (EMA with ``decay``). The first decision
    (no statistics yet) takes ``base``. The gradient norm is the interval's mean of the sampled
    norms (every ``signal_every`` steps): with ``interval=1, signal_every=1`` it is each step's.
    An interval without a measured norm reads as the first one's (the feature is 0)."""

    kind = "ae-sam"
    Config = AdaptiveSamConfig

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        decay = self.config.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"Invalid ae-sam decay: {decay!r} (in [0, 1))")
        for name in ("threshold", "threshold_end"):
            value = getattr(self.config, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            ):
                raise ValueError(f"Invalid ae-sam {name}: {value!r}")
        self.mean: Optional[float] = None
        self.var = 0.0

    def threshold(self, obs: torch.Tensor) -> float:
        c, end = self.config.threshold, self.config.threshold_end
        if end is None:
            return float(c)
        t = (self._feature(obs, "progress", "threshold_end follows the run's progress") + 1.0) / 2.0
        return float(c + (end - c) * t)

    def act(self, obs: torch.Tensor) -> int:
        obs = self._check_obs(obs)
        level = self._feature(obs, "grad_norm_level", "the gradient norm against the first interval's")
        level = min(max(level, -1.0 + 1e-6), 1.0 - 1e-6)
        x = math.exp(2.0 * math.atanh(level))  # (|g| / |g_first|)^2
        if self.mean is None:
            action, self.mean = self.base, x
            return action
        action = self.sam if x > self.mean + self.threshold(obs) * math.sqrt(self.var) else self.base
        d = self.config.decay
        delta = x - self.mean
        self.mean += (1.0 - d) * delta
        self.var = d * (self.var + (1.0 - d) * delta * delta)
        return action

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mean": self.mean, "var": self.var}

    def _check_state(self, state: Mapping[str, Any]) -> None:
        super()._check_state(state)
        _require_keys(state, ("mean", "var"), "AdaptiveSamPolicy state")
        mean, var = state["mean"], state["var"]
        if mean is not None and (
            isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean)
        ):
            raise ValueError(f"Invalid running mean in the policy state: {mean!r}")
        if isinstance(var, bool) or not isinstance(var, (int, float)) or not 0.0 <= var < math.inf:
            raise ValueError(f"Invalid running variance in the policy state: {var!r}")

    def _load_state(self, state: Mapping[str, Any]) -> None:
        super()._load_state(state)
        self.mean = None if state["mean"] is None else float(state["mean"])
        self.var = float(state["var"])


# ---------------------------------------------------------------------------------- names
#: Names a ``policy=`` string may take (with the ``:<value>`` forms of :func:`rule_from_name`).
RULE_NAMES: tuple[str, ...] = ("sam-late", "sam-every:<k>", "ss-sam", "ss-sam:<share>", "ae-sam", "ae-sam:<threshold>")


def rule_from_name(
    name: str, obs_dim: int, action_names: Sequence[str], obs_layout: dict[str, Any], seed: int
) -> Optional[Policy]:
    """The rule a ``policy=`` string names, or None when it names no rule.

    ``"sam-late"`` (from the budget), ``"sam-late:0.7"`` (from progress 0.7), ``"sam-every:4"``,
    ``"ss-sam"`` (at the budget's share), ``"ss-sam:0.3"``, ``"ae-sam"``, ``"ae-sam:0.5"``
    (threshold 0.5 standard deviations).
    """
    kind, _, arg = name.partition(":")
    if kind not in ("sam-late", "sam-every", "ss-sam", "ae-sam"):
        return None
    if kind == "sam-every" and not arg:
        raise ValueError("'sam-every' needs k: 'sam-every:4' runs SAM at every 4th decision")
    if arg:
        try:
            value = int(arg) if kind == "sam-every" else float(arg)
        except ValueError:
            what = "an int" if kind == "sam-every" else "a number"
            raise ValueError(f"Invalid policy name {name!r}: the part after ':' must be {what}") from None
    configs = {
        "sam-late": lambda: SamLateConfig(start=value if arg else None),
        "sam-every": lambda: SamEveryConfig(k=int(value)),
        "ss-sam": lambda: ScheduledRandomConfig(share=value if arg else None),
        "ae-sam": lambda: AdaptiveSamConfig(threshold=value) if arg else AdaptiveSamConfig(),
    }
    cls: Callable[..., Policy] = {
        "sam-late": SamLatePolicy,
        "sam-every": SamEveryPolicy,
        "ss-sam": ScheduledRandomPolicy,
        "ae-sam": AdaptiveSamPolicy,
    }[kind]
    return cls(obs_dim, action_names, configs[kind](), seed=seed, obs_layout=obs_layout)
