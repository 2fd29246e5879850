"""REINFORCE over configurations: a policy that picks one value per dimension.

After Mohamed et al. (AIMS), "Hyperparameters Optimization with Deep Reinforcement Learning".
A configuration is a trajectory of ``D`` choices; its reward ``r`` (higher is better) arrives at
the end. Every ``batch_size`` finished trials (in trial-number order) the policy takes one Adam step
on::

    loss = -1/B * sum_i sum_j  gamma^(D-1-j) * (r_i - b) * log pi(a_ij | a_i<j)   (- entropy * H(pi))
    b    <- beta * b + (1 - beta) * mean_i r_i        (baseline="ema"; b = batch mean before the first update)

``baseline="batch"`` uses the batch's own mean as ``b``; ``baseline="none"`` uses ``b = 0`` (as in
the seed's code). Two policies:

- ``"mlp"``: factored, one softmax head per dimension on an MLP of a constant input (the
  dimensions are independent under the policy);
- ``"rnn"``: autoregressive, a GRU cell that reads the previous choice and emits the next one.

Departures from the seed's code, on purpose: log-probabilities (not probabilities) in the
gradient, a reward baseline, and a policy initialised from the seed (``torch`` global RNG untouched).
Trials the policy did not propose (enqueued ones, another sampler's) are used as if it had: the
gradient is then off-policy for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from .base import Observation, check_reward_transform, check_sizes, transform_reward

__all__ = ["ReinforceAgent", "ReinforceState", "FactoredPolicy", "AutoregressivePolicy"]

BASELINES = ("ema", "batch", "none")


class FactoredPolicy(nn.Module):
    """Independent softmax heads on an MLP of a constant input: ``pi(a) = prod_j pi_j(a_j)``."""

    def __init__(self, sizes: Sequence[int], hidden: int = 64):
        super().__init__()
        self.sizes = list(sizes)
        self.body = nn.Sequential(nn.Linear(1, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.sizes)

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        """``actions`` (B, D) long -> per-choice log-probabilities (B, D)."""
        h = self.body(torch.ones(actions.shape[0], 1))
        cols = [torch.log_softmax(head(h), -1).gather(1, actions[:, j : j + 1]) for j, head in enumerate(self.heads)]
        return torch.cat(cols, 1)

    @torch.no_grad()
    def sample(self, rng: np.random.Generator) -> tuple[int, ...]:
        h = self.body(torch.ones(1, 1))
        return tuple(_draw(torch.softmax(head(h), -1)[0], rng) for head in self.heads)


class AutoregressivePolicy(nn.Module):
    """A GRU cell that reads the previous choice (one-hot, a start token first) and emits the next."""

    def __init__(self, sizes: Sequence[int], hidden: int = 64):
        super().__init__()
        self.sizes = list(sizes)
        self.width = max(self.sizes) + 1  # one-hot of a previous choice, plus the start token
        self.cell = nn.GRUCell(self.width, hidden)
        self.heads = nn.ModuleList(nn.Linear(hidden, n) for n in self.sizes)
        self.hidden = hidden

    def _inputs(self, prev: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        x = torch.zeros(batch, self.width)
        if prev is None:
            x[:, -1] = 1.0
        else:
            x.scatter_(1, prev.view(-1, 1), 1.0)
        return x

    def log_prob(self, actions: torch.Tensor) -> torch.Tensor:
        b = actions.shape[0]
        h = torch.zeros(b, self.hidden)
        prev, cols = None, []
        for j, head in enumerate(self.heads):
            h = self.cell(self._inputs(prev, b), h)
            cols.append(torch.log_softmax(head(h), -1).gather(1, actions[:, j : j + 1]))
            prev = actions[:, j]
        return torch.cat(cols, 1)

    @torch.no_grad()
    def sample(self, rng: np.random.Generator) -> tuple[int, ...]:
        h = torch.zeros(1, self.hidden)
        prev, out = None, []
        for head in self.heads:
            h = self.cell(self._inputs(prev, 1), h)
            a = _draw(torch.softmax(head(h), -1)[0], rng)
            out.append(a)
            prev = torch.tensor([a])
        return tuple(out)


def entropy_surrogate(logp: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient is minus the policy entropy's gradient, from sampled log-probabilities:
    ``grad H = -E[log pi * grad log pi]`` (as ``E[grad log pi] = 0``), so minimising
    ``mean(stop_grad(log pi) * log pi)`` raises the entropy."""
    return (logp.detach() * logp).mean()


def _draw(p: torch.Tensor, rng: np.random.Generator) -> int:
    q = p.double().numpy()
    return int(rng.choice(len(q), p=q / q.sum()))


SearchPolicy = Union[FactoredPolicy, AutoregressivePolicy]
POLICIES: dict[str, type[SearchPolicy]] = {"mlp": FactoredPolicy, "rnn": AutoregressivePolicy}


@dataclass
class ReinforceState:
    """Everything a :class:`ReinforceAgent` has learnt (made by ``init_state``)."""

    policy: SearchPolicy
    optimizer: torch.optim.Optimizer
    baseline: Optional[float] = None
    pending: list[tuple[tuple[int, ...], float]] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    updates: int = 0
    last_loss: float = float("nan")


class ReinforceAgent:
    """REINFORCE agent with a reward baseline (see the module docstring for the update).

    Args:
        policy: ``"mlp"`` (factored heads) or ``"rnn"`` (autoregressive).
        hidden: policy width (>= 1).
        lr: Adam learning rate of the policy (the seed's 1e-3).
        batch_size: trials per policy update (the seed's 16).
        gamma: discount over the ``D`` choices of one configuration, in [0, 1] (the seed's 0.99).
        baseline: ``"ema"``, ``"batch"`` or ``"none"``.
        beta: EMA decay of the baseline, in [0, 1).
        reward: ``"raw"`` or ``"rank"`` (rank among all rewards so far, in [-0.5, 0.5]).
        entropy: weight of an entropy bonus (>= 0; 0 is plain REINFORCE), through
            :func:`entropy_surrogate` on the batch's log-probabilities.
        init: optional ``state_dict`` the policy starts from (a meta-trained policy).

    Example:
        >>> agent = ReinforceAgent(policy="mlp", batch_size=2)
        >>> state = agent.init_state((3, 4), seed=0)
        >>> agent.observe(state, Observation(0, (0, 1), 1.0)); agent.observe(state, Observation(1, (2, 3), 0.0))
        >>> state.updates
        1
    """

    def __init__(
        self,
        *,
        policy: str = "mlp",
        hidden: int = 64,
        lr: float = 1e-3,
        batch_size: int = 16,
        gamma: float = 1.0,
        baseline: str = "ema",
        beta: float = 0.9,
        reward: str = "raw",
        entropy: float = 0.0,
        init: Optional[dict] = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"Invalid policy: {policy!r} (expected one of {sorted(POLICIES)})")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"Invalid hidden size: {hidden!r}")
        if not 0.0 < lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {gamma}")
        if baseline not in BASELINES:
            raise ValueError(f"Invalid baseline: {baseline!r} (expected one of {BASELINES})")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta: {beta}")
        if not 0.0 <= entropy < math.inf:
            raise ValueError(f"Invalid entropy weight: {entropy}")
        check_reward_transform(reward)
        self.policy, self.hidden, self.lr, self.batch_size = policy, hidden, float(lr), batch_size
        self.gamma, self.baseline, self.beta, self.reward = float(gamma), baseline, float(beta), reward
        self.entropy, self.init = float(entropy), init

    def __repr__(self) -> str:
        return (
            f"ReinforceAgent(policy='{self.policy}', hidden={self.hidden}, lr={self.lr}, "
            f"batch_size={self.batch_size}, gamma={self.gamma}, baseline='{self.baseline}', beta={self.beta}, "
            f"reward='{self.reward}', entropy={self.entropy}, init={'given' if self.init else None})"
        )

    def init_state(self, sizes: Sequence[int], seed: Optional[int] = None) -> ReinforceState:
        sizes = check_sizes(sizes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0 if seed is None else int(seed) % (2**63))
            policy = POLICIES[self.policy](sizes, self.hidden)
        if self.init is not None:
            try:
                policy.load_state_dict(self.init)
            except RuntimeError as e:
                raise ValueError(
                    f"The initial policy does not fit this search space (grid sizes {sizes}, "
                    f"policy '{self.policy}', hidden {self.hidden}): {e}"
                ) from None
        return ReinforceState(policy=policy, optimizer=torch.optim.Adam(policy.parameters(), lr=self.lr))

    def loss(self, state: ReinforceState, actions: torch.Tensor, rewards: torch.Tensor, b: float) -> torch.Tensor:
        """The REINFORCE loss of one batch (the gradient of this is the update direction)."""
        logp = state.policy.log_prob(actions)  # (B, D)
        d = logp.shape[1]
        discount = self.gamma ** torch.arange(d - 1, -1, -1, dtype=logp.dtype)
        adv = (rewards - b).view(-1, 1) * discount.view(1, -1)
        loss = -(adv * logp).sum(1).mean()
        if self.entropy > 0:
            loss = loss + self.entropy * entropy_surrogate(logp.sum(1))
        return loss

    def observe(self, state: ReinforceState, obs: Observation) -> None:
        r = transform_reward(obs.reward, state.rewards, self.reward)
        state.rewards.append(float(obs.reward))
        state.pending.append((tuple(int(i) for i in obs.index), r))
        if len(state.pending) < self.batch_size:
            return
        actions = torch.tensor([a for a, _ in state.pending], dtype=torch.long)
        rewards = torch.tensor([r for _, r in state.pending], dtype=torch.float32)
        if self.baseline == "none":
            b = 0.0
        elif self.baseline == "batch" or state.baseline is None:
            b = float(rewards.mean())
        else:
            b = state.baseline
        state.optimizer.zero_grad()
        loss = self.loss(state, actions, rewards, b)
        loss.backward()
        state.optimizer.step()
        if self.baseline == "ema":
            prev = float(rewards.mean()) if state.baseline is None else state.baseline
            state.baseline = self.beta * prev + (1 - self.beta) * float(rewards.mean())
        state.pending.clear()
        state.updates += 1
        state.last_loss = float(loss.detach())

    def propose(self, state: ReinforceState, number: int, rng: np.random.Generator) -> tuple[int, ...]:
        return state.policy.sample(rng)
