"""Proximal policy optimisation (Schulman et al., 2017) with clipped ratios, GAE and an
entropy bonus, sized for a policy that makes one decision per epoch or per N optimizer steps."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from .base import (Policy, _check_count, _check_module_state, _check_optimizer_state, _check_pending_obs,
                   _require_keys, register_policy)
from .buffers import RolloutBuffer, compute_gae

__all__ = ["PPOConfig", "PPOPolicy"]


@dataclass
class PPOConfig:
    hidden: int = 64
    """Units in each of the two tanh hidden layers of the actor and of the critic."""
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    ent_coef: float = 0.02
    vf_coef: float = 0.5
    rollout_len: int = 4
    """Decisions collected before each update."""
    update_epochs: int = 4
    minibatch_size: int = 0
    """0: the whole rollout is one minibatch."""
    normalize_advantages: bool = True
    max_grad_norm: float = 0.5
    deterministic_eval: bool = True
    """A frozen policy takes its most probable action (False: it samples)."""

    def __post_init__(self):
        for name in ("actor_lr", "critic_lr"):
            if not 0.0 < getattr(self, name) < math.inf:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        for name in ("hidden", "rollout_len", "update_epochs"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        if not 0.0 < self.clip_coef or self.ent_coef < 0 or self.minibatch_size < 0:
            raise ValueError("Invalid clip_coef, ent_coef or minibatch_size")


def _layer(n_in: int, n_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def _tanh_mlp(n_in: int, hidden: int, n_out: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(_layer(n_in, hidden, math.sqrt(2)), nn.Tanh(), _layer(hidden, hidden, math.sqrt(2)),
                         nn.Tanh(), _layer(hidden, n_out, out_std))


@register_policy
class PPOPolicy(Policy):
    """Categorical actor and state-value critic, updated after every ``rollout_len`` decisions."""

    kind = "ppo"
    Config = PPOConfig

    def __init__(self, obs_dim, action_names, config=None, **kwargs):
        super().__init__(obs_dim, action_names, config, **kwargs)
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.actor = _tanh_mlp(obs_dim, c.hidden, self.n_actions, 0.01)
            self.critic = _tanh_mlp(obs_dim, c.hidden, 1, 1.0)
        self.optimizer = torch.optim.Adam([
            {"params": self.actor.parameters(), "lr": c.actor_lr},
            {"params": self.critic.parameters(), "lr": c.critic_lr},
        ], eps=1e-5)
        self.rollout = RolloutBuffer(c.rollout_len, obs_dim)
        self.n_updates = 0
        self._pending = None  # (obs, action, logprob, value)

    @torch.no_grad()
    def probabilities(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.actor(self._check_obs(obs)), dim=-1)

    @torch.no_grad()
    def value(self, obs: torch.Tensor) -> float:
        return float(self.critic(self._check_obs(obs)))

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> int:
        obs = self._check_obs(obs)
        logits = self.actor(obs)
        if not self.training and self.config.deterministic_eval:
            return int(logits.argmax())
        probs = torch.softmax(logits, dim=-1)
        action = int(torch.multinomial(probs, 1, generator=self.generator))
        if self.training:
            self._pending = (obs, action, float(torch.log(probs[action])), float(self.critic(obs)))
        return action

    def observe(self, reward, next_obs, *, terminal=False, truncated=False) -> Dict[str, float]:
        if not self.training or self._pending is None:
            self._pending = None
            return {}
        obs, action, logprob, value = self._pending
        self._pending = None
        reward = float(reward)
        if truncated and not terminal:  # the budget ran out: bootstrap the value that was cut off
            reward += self.config.gamma * self.value(next_obs)
        done = terminal or truncated
        self.rollout.add(obs, action, logprob, value, reward, done)
        info: Dict[str, float] = {}
        if self.rollout.full():
            last_value = 0.0 if done else self.value(next_obs)
            info = self._update(last_value)
            self.rollout.reset()
        self.last_info = info
        return info

    def _update(self, last_value: float) -> Dict[str, float]:
        c, buf = self.config, self.rollout
        advantages, returns = compute_gae(buf.reward, buf.value, buf.done, last_value, c.gamma, c.gae_lambda)
        n = buf.size
        mb = c.minibatch_size or n
        stats = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": []}
        for _ in range(c.update_epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, mb):
                idx = order[start:start + mb]
                dist = Categorical(logits=self.actor(buf.obs[idx]))
                logprob = dist.log_prob(buf.action[idx])
                log_ratio = logprob - buf.logprob[idx]
                ratio = log_ratio.exp()
                adv = advantages[idx]
                if c.normalize_advantages and len(idx) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - c.clip_coef, 1 + c.clip_coef)).mean()
                v_loss = 0.5 * (self.critic(buf.obs[idx]).squeeze(-1) - returns[idx]).pow(2).mean()
                entropy = dist.entropy().mean()
                loss = pg_loss - c.ent_coef * entropy + c.vf_coef * v_loss
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_([*self.actor.parameters(), *self.critic.parameters()], c.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    stats["pg_loss"].append(float(pg_loss))
                    stats["v_loss"].append(float(v_loss))
                    stats["entropy"].append(float(entropy))
                    stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))
                    stats["clipfrac"].append(float(((ratio - 1).abs() > c.clip_coef).float().mean()))
        self.n_updates += 1
        info = {k: float(np.mean(v)) for k, v in stats.items()}
        info["n_updates"] = float(self.n_updates)
        return info

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        p = self._pending
        state.update(
            actor=self.actor.state_dict(), critic=self.critic.state_dict(),
            optimizer=self.optimizer.state_dict(), rollout=self.rollout.state_dict(),
            n_updates=self.n_updates,
            pending_obs=None if p is None else p[0].clone(),
            pending=None if p is None else [p[1], p[2], p[3]],
        )
        return state

    def _check_state(self, state: Mapping[str, Any]) -> None:
        super()._check_state(state)
        _require_keys(state, ("actor", "critic", "optimizer", "rollout", "n_updates"), "PPO state")
        _check_module_state(self.actor, state["actor"], "actor")
        _check_module_state(self.critic, state["critic"], "critic")
        _check_optimizer_state(self.optimizer, state["optimizer"], "actor-critic optimizer")
        self.rollout.check_state(state["rollout"])
        _check_count(state["n_updates"], "n_updates")
        _check_pending_obs(state.get("pending_obs"), self.obs_dim)
        if state.get("pending_obs") is not None:
            pending = state.get("pending")
            if (not isinstance(pending, (list, tuple)) or len(pending) != 3
                    or isinstance(pending[0], bool) or not isinstance(pending[0], int)
                    or not 0 <= pending[0] < self.n_actions
                    or not all(isinstance(v, (int, float)) for v in pending[1:])):
                raise ValueError(f"Invalid pending decision in the PPO state: {pending!r}")

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rollout.load_state_dict(state["rollout"])
        self.n_updates = int(state["n_updates"])
        po = state.get("pending_obs")
        self._pending = None if po is None else (po.clone(), int(state["pending"][0]),
                                                  float(state["pending"][1]), float(state["pending"][2]))
        super()._load_state(state)
