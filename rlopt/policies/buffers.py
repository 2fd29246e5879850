"""Experience storage: a ring replay buffer (DQN) and a rollout buffer with GAE (PPO)."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["Transition", "ReplayBuffer", "RolloutBuffer", "compute_gae"]


class Transition(NamedTuple):
    obs: torch.Tensor
    action: torch.Tensor
    reward: torch.Tensor
    next_obs: torch.Tensor
    terminal: torch.Tensor


class ReplayBuffer:
    """Fixed-capacity ring buffer of transitions; the oldest are overwritten first."""

    def __init__(self, capacity: int, obs_dim: int):
        if capacity <= 0:
            raise ValueError(f"Invalid buffer capacity: {capacity}")
        self.capacity = int(capacity)
        self.obs = torch.zeros(capacity, obs_dim)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.action = torch.zeros(capacity, dtype=torch.long)
        self.reward = torch.zeros(capacity)
        self.terminal = torch.zeros(capacity)
        self.pos = 0  # next slot to write
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, obs: torch.Tensor, action: int, reward: float, next_obs: torch.Tensor, terminal: bool) -> None:
        i = self.pos
        self.obs[i] = obs
        self.action[i] = action
        self.reward[i] = reward
        self.next_obs[i] = next_obs
        self.terminal[i] = float(terminal)
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> Transition:
        """A uniform sample with replacement (as DQN implementations draw it: the cost does not
        grow with the capacity); a ``batch_size`` of at least ``len`` gives every stored
        transition once, in random order."""
        if batch_size >= self.size:
            idx = torch.randperm(self.size, generator=generator)
        else:
            idx = torch.randint(self.size, (batch_size,), generator=generator)
        return Transition(self.obs[idx], self.action[idx], self.reward[idx], self.next_obs[idx], self.terminal[idx])

    def state_dict(self) -> dict[str, Any]:
        n = self.size  # only the filled part: small checkpoints early in training
        return {
            "obs": self.obs[:n].clone(),
            "next_obs": self.next_obs[:n].clone(),
            "action": self.action[:n].clone(),
            "reward": self.reward[:n].clone(),
            "terminal": self.terminal[:n].clone(),
            "pos": self.pos,
            "size": n,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``state``; changes nothing.

        The state must fit the capacity and observation size, and its ring position must be one
        this buffer can continue from (a full buffer from a smaller capacity cannot)."""
        keys = ("obs", "next_obs", "action", "reward", "terminal", "pos", "size")
        if not isinstance(state, Mapping) or any(k not in state for k in keys):
            raise ValueError(f"Replay buffer state must be a dict with keys {list(keys)}")
        n, pos = state["size"], state["pos"]
        if (
            not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, pos))
            or not 0 <= n <= self.capacity
            or not (pos == n if n < self.capacity else 0 <= pos < self.capacity)
        ):
            raise ValueError(
                f"Replay buffer state (size {n!r}, position {pos!r}) does not fit this buffer's "
                f"capacity {self.capacity}"
            )
        for key in keys[:5]:
            own = getattr(self, key)
            if not isinstance(state[key], torch.Tensor) or state[key].shape != (n, *own.shape[1:]):
                raise ValueError(
                    f"Replay buffer state's {key} does not fit this buffer's observation size "
                    f"{self.obs.shape[1]} and size {n}"
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        n = int(state["size"])
        for key in ("obs", "next_obs", "action", "reward", "terminal"):
            getattr(self, key).zero_()
            getattr(self, key)[:n] = state[key]
        self.pos, self.size = int(state["pos"]), n


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: float, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016).

    ``dones[t]`` is 1 when the episode ended after step ``t`` (no bootstrap across it; a budget
    truncation is folded into the reward beforehand). ``last_value`` is V of the observation that
    follows the last step. Returns ``(advantages, returns)``.
    """
    r, v, d = rewards.tolist(), values.tolist(), dones.tolist()  # a Python loop over floats: cheap
    adv = [0.0] * len(r)
    gae, next_value = 0.0, float(last_value)
    for t in reversed(range(len(r))):
        nonterminal = 1.0 - d[t]
        delta = r[t] + gamma * next_value * nonterminal - v[t]
        gae = delta + gamma * lam * nonterminal * gae
        adv[t] = gae
        next_value = v[t]
    advantages = torch.tensor(adv, dtype=values.dtype)
    return advantages, advantages + values


class RolloutBuffer:
    """On-policy storage for one PPO rollout of ``size`` decisions."""

    def __init__(self, size: int, obs_dim: int):
        if size <= 0:
            raise ValueError(f"Invalid rollout length: {size}")
        self.size = int(size)
        self.obs = torch.zeros(size, obs_dim)
        self.action = torch.zeros(size, dtype=torch.long)
        self.logprob = torch.zeros(size)
        self.value = torch.zeros(size)
        self.reward = torch.zeros(size)
        self.done = torch.zeros(size)
        self.pos = 0

    def full(self) -> bool:
        return self.pos == self.size

    def add(self, obs: torch.Tensor, action: int, logprob: float, value: float, reward: float, done: bool) -> None:
        if self.full():
            raise RuntimeError("Rollout buffer is full; call reset() after the update")
        i = self.pos
        self.obs[i], self.action[i], self.logprob[i] = obs, action, logprob
        self.value[i], self.reward[i], self.done[i] = value, reward, float(done)
        self.pos += 1

    def reset(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).clone() for k in ("obs", "action", "logprob", "value", "reward", "done")} | {
            "pos": self.pos
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``state``; changes nothing."""
        keys = ("obs", "action", "logprob", "value", "reward", "done")
        if not isinstance(state, Mapping) or any(k not in state for k in (*keys, "pos")):
            raise ValueError(f"Rollout buffer state must be a dict with keys {[*keys, 'pos']}")
        for key in keys:
            if not isinstance(state[key], torch.Tensor) or state[key].shape != getattr(self, key).shape:
                raise ValueError(
                    "Rollout buffer state does not fit this buffer's length or observation size "
                    f"({key}: this buffer's {tuple(getattr(self, key).shape)})"
                )
        pos = state["pos"]
        if isinstance(pos, bool) or not isinstance(pos, numbers.Integral) or not 0 <= int(pos) <= self.size:
            raise ValueError(f"Invalid rollout buffer position {pos!r} for length {self.size}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        for key in ("obs", "action", "logprob", "value", "reward", "done"):
            getattr(self, key).copy_(state[key])
        self.pos = int(state["pos"])
