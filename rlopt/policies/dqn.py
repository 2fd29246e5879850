"""Deep Q-learning (Mnih et al., 2015) with a replay buffer, a target network and
epsilon-greedy exploration whose decay may speed up with the spread of the Q-values."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .base import (Policy, _check_count, _check_module_state, _check_optimizer_state, _check_pending_obs,
                   _require_keys, register_policy)
from .buffers import ReplayBuffer

__all__ = ["DQNConfig", "DQNPolicy"]


@dataclass
class DQNConfig:
    hidden: int = 64
    """Units in each of the two hidden layers of the Q-network."""
    lr: float = 1e-3
    """Adam learning rate of the Q-network."""
    gamma: float = 0.99
    """Discount factor."""
    buffer_size: int = 5000
    """Replay capacity (transitions)."""
    batch_size: int = 32
    """Transitions per gradient step (fewer while the buffer holds fewer)."""
    learning_starts: int = 8
    """Transitions stored before the first gradient step (decisions are few per training run)."""
    gradient_steps: int = 1
    """Gradient steps per observed transition."""
    target_update: int = 20
    """Copy the online network into the target network every this many gradient steps."""
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay: float = 0.995
    """Per decision: epsilon <- max(end, epsilon * exp(-k)), k = -ln(decay) + var_coef * Var(Q(s,.))."""
    epsilon_var_coef: float = 0.0
    """lambda in k = k0 + lambda * Var(Q(s,.)): confident Q-values end exploration sooner (0 = off)."""
    double_dqn: bool = False
    """Choose the next action with the online network, value it with the target network."""
    max_grad_norm: float = 10.0

    def __post_init__(self):
        for name in ("lr", "epsilon_decay"):
            if not 0.0 < getattr(self, name) <= (1.0 if name == "epsilon_decay" else math.inf):
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {self.gamma}")
        if not 0.0 <= self.epsilon_end <= self.epsilon_start <= 1.0:
            raise ValueError(f"Invalid epsilon range: {self.epsilon_start} -> {self.epsilon_end}")
        for name in ("hidden", "buffer_size", "batch_size", "target_update", "gradient_steps"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")


def mlp(n_in: int, hidden: int, n_out: int, activation: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), activation(), nn.Linear(hidden, hidden), activation(),
                         nn.Linear(hidden, n_out))


@register_policy
class DQNPolicy(Policy):
    """Epsilon-greedy DQN. Frozen (``train=False``), it acts greedily."""

    kind = "dqn"
    Config = DQNConfig

    def __init__(self, obs_dim, action_names, config=None, **kwargs):
        super().__init__(obs_dim, action_names, config, **kwargs)
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.q_net = mlp(obs_dim, c.hidden, self.n_actions)
            self.target_net = mlp(obs_dim, c.hidden, self.n_actions)  # its init draws random numbers too
        self.target_net.load_state_dict(self.q_net.state_dict())
        self.target_net.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.q_net.parameters(), lr=c.lr)
        self.buffer = ReplayBuffer(c.buffer_size, obs_dim)
        self.epsilon = c.epsilon_start
        self.n_updates = 0
        self._pending = None  # (obs, action) awaiting its reward

    @torch.no_grad()
    def q_values(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_net(self._check_obs(obs))

    def act(self, obs: torch.Tensor) -> int:
        obs = self._check_obs(obs)
        q = self.q_values(obs)
        if not self.training:
            return int(q.argmax())
        if float(torch.rand((), generator=self.generator)) < self.epsilon:
            action = int(torch.randint(self.n_actions, (), generator=self.generator))
        else:
            action = int(q.argmax())
        c = self.config
        k = -math.log(c.epsilon_decay) + c.epsilon_var_coef * float(q.var(unbiased=False))
        self.epsilon = max(c.epsilon_end, self.epsilon * math.exp(-k))
        self._pending = (obs, action)
        return action

    def observe(self, reward, next_obs, *, terminal=False, truncated=False) -> Dict[str, float]:
        if not self.training or self._pending is None:
            self._pending = None
            return {}
        obs, action = self._pending
        self._pending = None
        # A truncated episode is not terminal: its target still bootstraps from next_obs.
        self.buffer.add(obs, action, float(reward), self._check_obs(next_obs), terminal)
        info: Dict[str, float] = {"epsilon": self.epsilon}
        if len(self.buffer) >= self.config.learning_starts:
            for _ in range(self.config.gradient_steps):
                info.update(self._update())
        self.last_info = info
        return info

    def _update(self) -> Dict[str, float]:
        c = self.config
        batch = self.buffer.sample(c.batch_size, self.generator)
        with torch.no_grad():
            next_q = self.target_net(batch.next_obs)
            if c.double_dqn:
                best = self.q_net(batch.next_obs).argmax(dim=1, keepdim=True)
                next_v = next_q.gather(1, best).squeeze(1)
            else:
                next_v = next_q.max(dim=1).values
            target = batch.reward + c.gamma * (1.0 - batch.terminal) * next_v
        q = self.q_net(batch.obs).gather(1, batch.action.unsqueeze(1)).squeeze(1)
        loss = F.smooth_l1_loss(q, target)
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.q_net.parameters(), c.max_grad_norm)
        self.optimizer.step()
        self.n_updates += 1
        if self.n_updates % c.target_update == 0:
            self.target_net.load_state_dict(self.q_net.state_dict())
        return {"td_loss": float(loss.detach()), "q_mean": float(q.mean().detach()), "n_updates": float(self.n_updates)}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(
            q_net=self.q_net.state_dict(), target_net=self.target_net.state_dict(),
            optimizer=self.optimizer.state_dict(), buffer=self.buffer.state_dict(),
            epsilon=self.epsilon, n_updates=self.n_updates,
            pending_obs=None if self._pending is None else self._pending[0].clone(),
            pending_action=None if self._pending is None else self._pending[1],
        )
        return state

    def _check_state(self, state: Mapping[str, Any]) -> None:
        super()._check_state(state)
        _require_keys(state, ("q_net", "target_net", "optimizer", "buffer", "epsilon", "n_updates"), "DQN state")
        _check_module_state(self.q_net, state["q_net"], "Q-network")
        _check_module_state(self.target_net, state["target_net"], "target network")
        _check_optimizer_state(self.optimizer, state["optimizer"], "Q-network optimizer")
        self.buffer.check_state(state["buffer"])
        eps = state["epsilon"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps <= 1.0:
            raise ValueError(f"Invalid epsilon in the DQN state: {eps!r}")
        _check_count(state["n_updates"], "n_updates")
        _check_pending_obs(state.get("pending_obs"), self.obs_dim)
        if state.get("pending_obs") is not None:
            action = state.get("pending_action")
            if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < self.n_actions:
                raise ValueError(f"Invalid pending action in the DQN state: {action!r}")

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.q_net.load_state_dict(state["q_net"])
        self.target_net.load_state_dict(state["target_net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.epsilon = float(state["epsilon"])
        self.n_updates = int(state["n_updates"])
        po = state.get("pending_obs")
        self._pending = None if po is None else (po.clone(), int(state["pending_action"]))
        super()._load_state(state)
