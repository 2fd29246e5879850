"""Policies that do not learn: a constant choice and random switching. Baselines and controls
(the wrapper with a constant policy must equal the plain inner optimizer step for step)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .base import Policy, register_policy

__all__ = ["ConstantConfig", "ConstantPolicy", "RandomConfig", "RandomPolicy"]


@dataclass
class ConstantConfig:
    action: Union[int, str] = 0
    """The action taken every time, by index or by name."""


@register_policy
class ConstantPolicy(Policy):
    kind = "constant"
    Config = ConstantConfig

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        a = self.config.action
        if isinstance(a, str):
            if a not in self.action_names:
                raise ValueError(f"Unknown action '{a}'; expected one of {list(self.action_names)}")
            a = self.action_names.index(a)
        if not 0 <= int(a) < self.n_actions:
            raise ValueError(f"Invalid action index: {a}")
        self.action = int(a)

    def act(self, obs: torch.Tensor) -> int:
        self._check_obs(obs)
        return self.action


@dataclass
class RandomConfig:
    probs: Optional[tuple[float, ...]] = None
    """Probability of each action (None: uniform). E.g. the learned policy's SAM share."""


@register_policy
class RandomPolicy(Policy):
    kind = "random"
    Config = RandomConfig

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        probs = self.config.probs
        probs = (
            torch.full((self.n_actions,), 1.0 / self.n_actions)
            if probs is None
            else torch.tensor([float(p) for p in probs])
        )
        if probs.shape != (self.n_actions,) or not bool(torch.all(probs >= 0)) or not float(probs.sum()) > 0:
            raise ValueError(f"Invalid action probabilities {self.config.probs} for {self.n_actions} actions")
        self.probs = probs / probs.sum()

    def act(self, obs: torch.Tensor) -> int:
        self._check_obs(obs)
        return int(torch.multinomial(self.probs, 1, generator=self.generator))
