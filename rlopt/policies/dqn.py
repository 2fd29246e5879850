"""Deep Q-learning (Mnih et al., 2015) with a replay buffer, a target network and
epsilon-greedy exploration.

.. code-block:: text

    per decision k (act, then observe):
        a_k = random action with probability epsilon(k), else argmax_a Q(s_k, a)
        store (s_k, a_k, r_k, s_k+1, terminal_k) in the replay buffer
        every train_frequency decisions, once learning_starts transitions are stored:
            gradient_steps times: minimise Huber(Q(s, a) - [r + gamma (1 - terminal) max_a' Q_target(s', a')])
            every target_update gradient steps: Q_target <- tau Q + (1 - tau) Q_target

``epsilon(k)`` falls linearly from ``epsilon_start`` to ``epsilon_end`` over the first
``exploration_decisions`` decisions (as in CleanRL's ``exploration_fraction``, in decisions rather
than a share of a budget the policy does not know), or, when ``epsilon_decay`` is set, follows the
older per-decision geometric decay. Decisions are counted by :meth:`DQNPolicy.observe`, so how often
``act`` is called while frozen or between decisions does not move the schedule.

The values of the defaults were measured: see ``benchmarks/results/learner_check/``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .base import (
    Policy,
    _check_count,
    _check_module_state,
    _check_optimizer_state,
    _check_pending_obs,
    _require_keys,
    register_policy,
)
from .buffers import ReplayBuffer

__all__ = ["DQNConfig", "DQNPolicy"]


@dataclass
class DQNConfig:
    """DQN hyper-parameters, measured on CartPole-v1 at 100k decisions with
    ``python -m benchmarks.learner_check`` (see ``benchmarks/results/learner_check/``): CleanRL's
    ``dqn.py`` values with the exploration and warm-up rescaled to that budget, twice its learning
    rate, a replay buffer that keeps the whole run, Double DQN and 256 units per hidden layer. Q
    stays below its bound on every seed; the mean return of the last 20 episodes was at least 195
    on each of seeds 0-15 (241-500, mean 433). Most seeds learn between 50k and 90k decisions and
    the return still swings by 100-250 between 10k-decision windows afterwards: less settled than
    the PPO defaults, which hold 500. A run that decides only tens of times explores (and does not
    learn) for all of it: give such runs a shorter ``exploration_decisions`` and
    ``learning_starts``, as the meta-training configs do."""

    hidden: int = 256
    """Units in each of the two hidden layers of the Q-network. With the other defaults,
    CartPole-v1 at 100k decisions, last-20 mean return: 64 units 94.7 / 369.0 (worst / mean of
    seeds 0-4: a seed that learned fell back), 256 units 347.1 / 457.0 (seeds 0-7, all above
    195); 512 units no better on the two seeds tried (see the study) at twice the cost."""
    lr: float = 5e-4
    """Adam learning rate of the Q-network. With the other defaults and 64 units, CartPole-v1 at
    100k decisions, seeds 0-4, mean of the last 20 episodes: 2.5e-4 (CleanRL's) 262 (learns slowly,
    3 seeds of 5 at 195 or more), 5e-4 369 (4 of 5), 1e-3 340 (4 of 5, deeper collapses)."""
    gamma: float = 0.99
    """Discount factor: an effective horizon of about 100 decisions."""
    buffer_size: int = 100_000
    """Replay capacity (transitions). With 10k (CleanRL's), CartPole-v1 peaked near 220 and fell
    back to 76 by 100k decisions as the early, failing transitions were overwritten; 100k keeps
    them (3.6 MB at 4 features)."""
    batch_size: int = 128
    """Transitions per gradient step (fewer while the buffer holds fewer)."""
    learning_starts: int = 1000
    """Transitions stored before the first gradient step: the first updates see a buffer that is
    not dominated by a handful of episodes."""
    gradient_steps: int = 1
    """Gradient steps per round of updates (one round every ``train_frequency`` decisions)."""
    target_update: int = 125
    """Update the target network every this many gradient steps (with ``tau`` = 1, a copy every
    500 decisions at the default ``train_frequency``). The old default, 20 gradient steps at one
    per decision, let Q run away to 5e9 on CartPole-v1."""
    epsilon_start: float = 1.0
    """Exploration rate at the first decision."""
    epsilon_end: float = 0.05
    """Exploration rate once the schedule has run out."""
    epsilon_decay: Optional[float] = None
    """``None``: the linear schedule of ``exploration_decisions``. A float in (0, 1]: the older geometric schedule, per
    decision ``epsilon <- max(end, epsilon * exp(-k))`` with ``k = -ln(decay) + var_coef * Var(Q(s,.))``
    (checkpoints that recorded a decay keep it)."""
    epsilon_var_coef: float = 0.0
    """lambda in ``k`` above (geometric schedule only): confident Q-values end exploration sooner
    (0 = off)."""
    double_dqn: bool = True
    """Choose the next action with the online network, value it with the target network (van
    Hasselt et al., 2016): less overestimation; the run of the defaults above used it."""
    max_grad_norm: float = 10.0
    """Clip the Q-network's gradient norm."""
    # Fields added later (appended, so positional construction keeps its meaning):
    train_frequency: int = 4
    """A round of ``gradient_steps`` gradient steps every this many decisions."""
    tau: float = 1.0
    """Polyak weight of each target update: ``target <- tau * online + (1 - tau) * target``
    (1.0: a hard copy; e.g. ``target_update=1, tau=0.005`` is a soft update every step)."""
    exploration_decisions: int = 10_000
    """Decisions over which epsilon falls linearly from ``epsilon_start`` to ``epsilon_end``
    (unless ``epsilon_decay`` is set)."""
    q_warn_factor: float = 2.0
    """Warn once when the largest |Q| of a training batch exceeds this factor times ``max|r| / (1 - gamma)``,
    the largest value any return can have (``max|r|`` from the rewards observed so far): Q is
    diverging. 0 turns the check off."""

    def __post_init__(self) -> None:
        if not 0.0 < self.lr < math.inf:
            raise ValueError(f"Invalid lr: {self.lr}")
        if self.epsilon_decay is not None and not 0.0 < self.epsilon_decay <= 1.0:
            raise ValueError(f"Invalid epsilon_decay: {self.epsilon_decay}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"Invalid tau: {self.tau}")
        if not 0.0 <= self.epsilon_end <= self.epsilon_start <= 1.0:
            raise ValueError(f"Invalid epsilon range: {self.epsilon_start} -> {self.epsilon_end}")
        for name in ("hidden", "buffer_size", "batch_size", "target_update", "gradient_steps", "train_frequency"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        for name in ("learning_starts", "exploration_decisions"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        if not 0.0 <= self.q_warn_factor < math.inf:
            raise ValueError(f"Invalid q_warn_factor: {self.q_warn_factor}")


# What a checkpoint written before a field existed meant by it (see DQNPolicy.from_checkpoint).
_LEGACY_FIELDS = {"train_frequency": 1, "tau": 1.0}


def mlp(n_in: int, hidden: int, n_out: int, activation: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, hidden), activation(), nn.Linear(hidden, hidden), activation(), nn.Linear(hidden, n_out)
    )


@register_policy
class DQNPolicy(Policy):
    """Epsilon-greedy DQN. Frozen (``train=False``), it acts greedily.

    :meth:`observe` returns (and keeps in ``last_info``) ``epsilon``, ``decisions`` and, on
    decisions with gradient steps, ``td_loss``, ``q_mean`` and ``q_abs_max`` (mean and largest |Q| of the batch's
    actions), ``q_bound`` (``max|r| / (1 - gamma)``) and ``n_updates``.
    """

    kind = "dqn"
    Config = DQNConfig

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, **kwargs: Any) -> None:
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
        self.n_decisions = 0  # transitions observed while learning: the clock of the schedules
        self.reward_scale = 0.0  # max |r| observed
        self._q_warned = False
        self._pending: Optional[tuple[torch.Tensor, int]] = None  # (obs, action) awaiting its reward

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], *, train: Optional[bool] = None) -> DQNPolicy:
        """Fields added after a checkpoint was written take the value that reproduces how it was
        trained (one gradient step per decision, hard target copies)."""
        config = ckpt.get("config")
        if config:
            ckpt = {**ckpt, "config": {**_LEGACY_FIELDS, **config}}
        return super().from_checkpoint(ckpt, train=train)

    @torch.no_grad()
    def q_values(self, obs: torch.Tensor) -> torch.Tensor:
        return self.q_net(self._check_obs(obs))

    def scheduled_epsilon(self, decisions: int) -> float:
        """Epsilon of the linear schedule after ``decisions`` decisions."""
        c = self.config
        if c.exploration_decisions == 0:
            return c.epsilon_end
        share = min(1.0, decisions / c.exploration_decisions)
        return c.epsilon_start + share * (c.epsilon_end - c.epsilon_start)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> int:
        obs = self._check_obs(obs)
        q = self.q_net(obs)
        if not self.training:
            return int(q.argmax())
        c = self.config
        if c.epsilon_decay is None:
            self.epsilon = self.scheduled_epsilon(self.n_decisions)
        if float(torch.rand((), generator=self.generator)) < self.epsilon:
            action = int(torch.randint(self.n_actions, (), generator=self.generator))
        else:
            action = int(q.argmax())
        if c.epsilon_decay is not None:  # geometric: the rate for the next decision
            k = -math.log(c.epsilon_decay) + c.epsilon_var_coef * float(q.var(unbiased=False))
            self.epsilon = max(c.epsilon_end, self.epsilon * math.exp(-k))
        self._pending = (obs, action)
        return action

    def observe(
        self, reward: float, next_obs: torch.Tensor, *, terminal: bool = False, truncated: bool = False
    ) -> dict[str, float]:
        if not self.training or self._pending is None:
            self._pending = None
            return {}
        obs, action = self._pending
        next_obs = self._check_obs(next_obs)
        reward = float(reward)
        self._pending = None
        # A truncated episode is not terminal: its target still bootstraps from next_obs.
        self.buffer.add(obs, action, reward, next_obs, terminal)
        self.n_decisions += 1
        self.reward_scale = max(self.reward_scale, abs(reward))
        c = self.config
        info: dict[str, float] = {"epsilon": self.epsilon, "decisions": float(self.n_decisions)}
        if len(self.buffer) >= c.learning_starts and self.n_decisions % c.train_frequency == 0:
            for _ in range(c.gradient_steps):
                info.update(self._update())
            self._check_q(info["q_abs_max"])
        self.last_info = info
        return info

    def q_bound(self) -> float:
        """``max|r| / (1 - gamma)``: no discounted return exceeds it in magnitude (inf at gamma 1)."""
        gamma = self.config.gamma
        return self.reward_scale / (1.0 - gamma) if gamma < 1.0 else math.inf

    def _check_q(self, q_abs_max: float) -> None:
        factor = self.config.q_warn_factor
        if self._q_warned or factor == 0.0:
            return
        bound = self.q_bound()
        if not math.isfinite(q_abs_max) or q_abs_max > factor * bound > 0.0:
            self._q_warned = True
            warnings.warn(
                f"DQN Q-values are diverging: |Q| reached {q_abs_max:.4g}, beyond {factor:g} x "
                f"max|r| / (1 - gamma) = {factor * bound:.4g}; lower lr, raise target_update or "
                "lower tau (warned once per policy)",
                RuntimeWarning,
                stacklevel=3,
            )

    def _update(self) -> dict[str, float]:
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
            if c.tau == 1.0:
                self.target_net.load_state_dict(self.q_net.state_dict())
            else:
                with torch.no_grad():
                    for t, p in zip(self.target_net.parameters(), self.q_net.parameters()):
                        t.lerp_(p, c.tau)
        return {
            "td_loss": float(loss.detach()),
            "q_mean": float(q.mean().detach()),
            "q_abs_max": float(q.detach().abs().max()),
            "q_bound": self.q_bound(),
            "n_updates": float(self.n_updates),
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            q_net=self.q_net.state_dict(),
            target_net=self.target_net.state_dict(),
            optimizer=self.optimizer.state_dict(),
            buffer=self.buffer.state_dict(),
            epsilon=self.epsilon,
            n_updates=self.n_updates,
            n_decisions=self.n_decisions,
            reward_scale=self.reward_scale,
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
        _check_count(state.get("n_decisions", 0), "n_decisions")  # absent from older checkpoints
        scale = state.get("reward_scale", 0.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale < math.inf:
            raise ValueError(f"Invalid reward_scale in the DQN state: {scale!r}")
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
        # Older checkpoints: every stored transition was a decision; the reward scale is what the buffer holds.
        self.n_decisions = int(state.get("n_decisions", len(self.buffer)))
        held = self.buffer.reward[: len(self.buffer)]
        self.reward_scale = float(state.get("reward_scale", float(held.abs().max()) if len(held) else 0.0))
        po = state.get("pending_obs")
        self._pending = None if po is None else (po.clone(), int(state["pending_action"]))
        super()._load_state(state)
