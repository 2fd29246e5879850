"""Proximal policy optimisation (Schulman et al., 2017) with clipped ratios, GAE and an
entropy bonus.

.. code-block:: text

    per decision: sample a ~ pi(.|s), keep (s, a, log pi(a|s), V(s), r, done)
    every rollout_len decisions:
        A, R = GAE(rewards, values, dones), standardised over the last advantages (see PPOConfig)
        update_epochs times, over shuffled minibatches:
            loss = max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) - ent_coef H(pi) + vf_coef (V - R)^2 / 2

:meth:`PPOPolicy.observe` returns the update's diagnostics on the decision that completes a
rollout (``{}`` on the others): ``pg_loss``, ``v_loss``, ``entropy``, ``approx_kl`` (the
``(rho - 1) - log rho`` estimator), ``clipfrac``, ``explained_variance`` (of the returns by the
values the rollout was collected with), ``n_updates``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical

from .base import (
    Policy,
    _check_count,
    _check_module_state,
    _check_optimizer_state,
    _check_pending_obs,
    _require_keys,
    register_policy,
)
from .buffers import RolloutBuffer, compute_gae

__all__ = ["PPOConfig", "PPOPolicy"]


@dataclass
class PPOConfig:
    """PPO hyper-parameters. The defaults learn CartPole-v1 (return >= 195 over the last 20
    training episodes at 100k decisions, every seed tried) with one decision per call, as rlopt's
    optimizers call the policy; checked by ``python -m benchmarks.learner_check``. The policy
    updates once per ``rollout_len`` decisions, so a run with fewer decisions than that does not
    learn: meta-training, across many runs, is where it does."""

    hidden: int = 64
    """Units in each of the two tanh hidden layers of the actor and of the critic (the usual
    size for classic-control tasks; rlopt's observations are of the same order, 17-20 features)."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor (the common PPO value; unchanged)."""
    critic_lr: float = 1e-3
    """Adam learning rate of the critic (unchanged)."""
    gamma: float = 0.99
    """Discount factor (unchanged)."""
    gae_lambda: float = 0.95
    """GAE's lambda: bias (0) against variance (1) of the advantage estimates (unchanged)."""
    clip_coef: float = 0.2
    """The probability ratio is clipped to ``[1 - clip_coef, 1 + clip_coef]`` (the paper's value)."""
    ent_coef: float = 0.01
    """Entropy bonus. 0.02 (the old default) with rollouts of 4 held the policy near uniform;
    0.01 is CleanRL's classic-control value."""
    vf_coef: float = 0.5
    """Weight of the critic's loss (the paper's value)."""
    rollout_len: int = 512
    """Decisions collected before each update. With 4 (the old default) the advantages of an
    update came from a handful of nearly identical states: approx-KL and clip fraction stayed at
    0 and one CartPole seed in three never learned."""
    update_epochs: int = 10
    """Passes over each rollout: with ``minibatch_size`` 64, 80 gradient steps per rollout, at
    which approx-KL sits near 0.003-0.007 and the clip fraction near 0.02-0.1 on CartPole-v1 (the
    clipped objective is active, not idle and not saturated)."""
    minibatch_size: int = 64
    """Decisions per gradient step (0, or more than ``rollout_len``: the whole rollout). The old
    default, the whole rollout as one minibatch, gave one gradient step per epoch."""
    normalize_advantages: bool = True
    """Standardise the advantages of an update with the mean and standard deviation of the last
    ``max(rollout_len, advantage_norm_samples)`` advantages: this rollout's and, when it is
    shorter, earlier rollouts' (statistics of a few decisions would only be noise)."""
    max_grad_norm: float = 0.5
    """Clip the gradient norm of actor and critic together (the usual PPO value; unchanged)."""
    deterministic_eval: bool = True
    """A frozen policy takes its most probable action (False: it samples)."""
    # Fields added later (appended, so positional construction keeps its meaning):
    advantage_norm_samples: int = 256
    """See ``normalize_advantages``. 256 lets a meta-training config's rollouts of 16 decisions
    share statistics over the last 16 rollouts; at the default ``rollout_len`` it has no effect
    (each update is standardised over its own rollout; CleanRL and SB3 standardise per minibatch)."""

    def __post_init__(self) -> None:
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
        if self.advantage_norm_samples < 0:
            raise ValueError(f"Invalid advantage_norm_samples: {self.advantage_norm_samples}")


# What a checkpoint written before a field existed meant by it (see PPOPolicy.from_checkpoint).
_LEGACY_FIELDS = {"advantage_norm_samples": 0}


def _layer(n_in: int, n_out: int, std: float) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


def _tanh_mlp(n_in: int, hidden: int, n_out: int, out_std: float) -> nn.Sequential:
    return nn.Sequential(
        _layer(n_in, hidden, math.sqrt(2)),
        nn.Tanh(),
        _layer(hidden, hidden, math.sqrt(2)),
        nn.Tanh(),
        _layer(hidden, n_out, out_std),
    )


@register_policy
class PPOPolicy(Policy):
    """Categorical actor and state-value critic, updated after every ``rollout_len`` decisions."""

    kind = "ppo"
    Config = PPOConfig

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
        super().__init__(obs_dim, action_names, config, **kwargs)
        c = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.actor = _tanh_mlp(obs_dim, c.hidden, self.n_actions, 0.01)
            self.critic = _tanh_mlp(obs_dim, c.hidden, 1, 1.0)
        self.optimizer = torch.optim.Adam(
            [
                {"params": self.actor.parameters(), "lr": c.actor_lr},
                {"params": self.critic.parameters(), "lr": c.critic_lr},
            ],
            eps=1e-5,
        )
        self.rollout = RolloutBuffer(c.rollout_len, obs_dim)
        self.n_updates = 0
        # The last advantages (a ring), for their standardisation: see PPOConfig.normalize_advantages.
        self.adv_history = torch.zeros(max(c.rollout_len, c.advantage_norm_samples))
        self.adv_count = 0  # advantages computed so far
        self._pending: Optional[tuple[torch.Tensor, int, float, float]] = None  # (obs, action, logprob, value)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], *, train: Optional[bool] = None) -> PPOPolicy:
        """Fields added after a checkpoint was written take the value that reproduces how it was
        trained (advantages standardised over each rollout alone)."""
        config = ckpt.get("config")
        if config:
            ckpt = {**ckpt, "config": {**_LEGACY_FIELDS, **config}}
        return super().from_checkpoint(ckpt, train=train)

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

    def observe(
        self, reward: float, next_obs: torch.Tensor, *, terminal: bool = False, truncated: bool = False
    ) -> dict[str, float]:
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
        info: dict[str, float] = {}
        if self.rollout.full():
            last_value = 0.0 if done else self.value(next_obs)
            info = self._update(last_value)
            self.rollout.reset()
        self.last_info = info
        return info

    def _standardise(self, advantages: torch.Tensor) -> torch.Tensor:
        """Record ``advantages`` in the ring of the last ones; standardise them with its statistics."""
        ring, n = self.adv_history, advantages.numel()
        pos = self.adv_count % ring.numel()
        idx = torch.arange(pos, pos + n) % ring.numel()
        ring[idx] = advantages
        self.adv_count += n
        window = ring[: min(self.adv_count, ring.numel())]
        if window.numel() < 2:
            return advantages
        return (advantages - window.mean()) / (window.std() + 1e-8)

    def _update(self, last_value: float) -> dict[str, float]:
        c, buf = self.config, self.rollout
        advantages, returns = compute_gae(buf.reward, buf.value, buf.done, last_value, c.gamma, c.gae_lambda)
        var_returns = float(returns.var())
        explained = 1.0 - float((returns - buf.value).var()) / var_returns if var_returns > 0 else math.nan
        if c.normalize_advantages:
            advantages = self._standardise(advantages)
        n = buf.size
        mb = min(c.minibatch_size or n, n)
        params = [*self.actor.parameters(), *self.critic.parameters()]
        stats: dict[str, list[float]] = {"pg_loss": [], "v_loss": [], "entropy": [], "approx_kl": [], "clipfrac": []}
        for _ in range(c.update_epochs):
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, mb):
                idx = order[start : start + mb]
                dist = Categorical(logits=self.actor(buf.obs[idx]))
                logprob = dist.log_prob(buf.action[idx])
                log_ratio = logprob - buf.logprob[idx]
                ratio = log_ratio.exp()
                adv = advantages[idx]
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - c.clip_coef, 1 + c.clip_coef)).mean()
                v_loss = 0.5 * (self.critic(buf.obs[idx]).squeeze(-1) - returns[idx]).pow(2).mean()
                entropy = dist.entropy().mean()
                loss = pg_loss - c.ent_coef * entropy + c.vf_coef * v_loss
                self.optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, c.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    stats["pg_loss"].append(float(pg_loss))
                    stats["v_loss"].append(float(v_loss))
                    stats["entropy"].append(float(entropy))
                    stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))
                    stats["clipfrac"].append(float(((ratio - 1).abs() > c.clip_coef).float().mean()))
        self.n_updates += 1
        info = {k: float(np.mean(v)) for k, v in stats.items()}
        info["explained_variance"] = explained
        info["n_updates"] = float(self.n_updates)
        return info

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        p = self._pending
        state.update(
            actor=self.actor.state_dict(),
            critic=self.critic.state_dict(),
            optimizer=self.optimizer.state_dict(),
            rollout=self.rollout.state_dict(),
            n_updates=self.n_updates,
            adv_history=self.adv_history.clone(),
            adv_count=self.adv_count,
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
        if "adv_history" in state:  # absent from older checkpoints
            ring = state["adv_history"]
            if not isinstance(ring, torch.Tensor) or ring.shape != self.adv_history.shape:
                raise ValueError(
                    "The PPO state's advantage history does not fit this policy's rollout_len and "
                    "advantage_norm_samples"
                )
            _check_count(state.get("adv_count"), "adv_count")
        _check_pending_obs(state.get("pending_obs"), self.obs_dim)
        if state.get("pending_obs") is not None:
            pending = state.get("pending")
            if (
                not isinstance(pending, (list, tuple))
                or len(pending) != 3
                or isinstance(pending[0], bool)
                or not isinstance(pending[0], int)
                or not 0 <= pending[0] < self.n_actions
                or not all(isinstance(v, (int, float)) for v in pending[1:])
            ):
                raise ValueError(f"Invalid pending decision in the PPO state: {pending!r}")

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rollout.load_state_dict(state["rollout"])
        self.n_updates = int(state["n_updates"])
        if "adv_history" in state:
            self.adv_history.copy_(state["adv_history"])
            self.adv_count = int(state["adv_count"])
        else:
            self.adv_history.zero_()
            self.adv_count = 0
        po = state.get("pending_obs")
        self._pending = (
            None
            if po is None
            else (po.clone(), int(state["pending"][0]), float(state["pending"][1]), float(state["pending"][2]))
        )
        super()._load_state(state)
