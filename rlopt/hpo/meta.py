"""Meta-learned search: a REINFORCE policy trained across tasks that share one grid, used zero-shot.

After Hyp-RL (Jomaa et al. 2019) in spirit: the policy is trained on many tasks' tables before it
sees the new task, then starts there (and keeps learning online) instead of from a uniform policy.
Meta-training, per iteration::

    pick a training task T at random; sample B configurations a_i ~ pi
    r_i = centred rank of -T(a_i) within the batch (in [-0.5, 0.5]; scale-free across tasks)
    Adam step on  -1/B sum_i r_i log pi(a_i)  - entropy * H(pi)   (H's gradient from the samples)

The tables are arrays of the objective (minimised) over the grid, indexed like the grid's sizes.

Pretrained policies ship with the package (``list_pretrained()``); ``pretrained_agent(name)``
returns a :class:`ReinforceAgent` that starts from one. A pretrained policy only fits a search space
with the same grid (the same parameter names, in sorted order, with the same number of values).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .reinforce import POLICIES, FactoredPolicy, ReinforceAgent, SearchPolicy, entropy_surrogate

__all__ = ["meta_train", "pretrained_agent", "list_pretrained"]

PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")


def meta_train(
    tables: Sequence[np.ndarray],
    *,
    policy: str = "mlp",
    hidden: int = 64,
    iterations: int = 300,
    batch: int = 64,
    lr: float = 0.01,
    entropy: float = 0.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Train a policy across ``tables`` (each an array over the same grid, lower is better); returns
    its ``state_dict``."""
    if len(tables) == 0:
        raise ValueError("meta_train needs at least one table")
    sizes = tables[0].shape
    if any(t.shape != sizes for t in tables):
        raise ValueError(f"All tables must share one grid; got shapes {[t.shape for t in tables]}")
    if policy not in POLICIES:
        raise ValueError(f"Invalid policy: {policy!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = POLICIES[policy](list(sizes), hidden)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        table = tables[int(rng.integers(len(tables)))]
        acts = _sample_batch(net, batch, rng)
        values = table[tuple(acts.T)]
        order = np.argsort(np.argsort(-values, kind="stable"), kind="stable")  # 0 = worst
        ranks = order / max(batch - 1, 1) - 0.5
        logp = net.log_prob(torch.as_tensor(acts, dtype=torch.long)).sum(1)
        loss = -(torch.as_tensor(ranks, dtype=torch.float32) * logp).mean() + entropy * entropy_surrogate(logp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _sample_batch(net: SearchPolicy, batch: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(net, FactoredPolicy):  # policy_is_factored, in a form type checkers narrow on
        with torch.no_grad():
            h = net.body(torch.ones(1, 1))
            cols = []
            for head in net.heads:
                p = torch.softmax(head(h), -1)[0].double().numpy()
                cols.append(rng.choice(len(p), size=batch, p=p / p.sum()))
        return np.stack(cols, 1)
    return np.array([net.sample(rng) for _ in range(batch)])


def policy_is_factored(net: SearchPolicy) -> bool:
    return isinstance(net, POLICIES["mlp"])


def list_pretrained() -> dict[str, str]:
    """Names of the pretrained search policies shipped with rlopt, with a description each."""
    return {k: v["description"] for k, v in _index().items()}


def _index() -> dict:
    path = os.path.join(PRETRAINED_DIR, "index.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def pretrained_agent(name: str, **overrides: Any) -> ReinforceAgent:
    """A :class:`ReinforceAgent` starting from the pretrained policy ``name``; ``overrides`` change
    the agent settings stored with it (e.g. ``lr``)."""
    index = _index()
    if name not in index:
        raise ValueError(f"No pretrained search policy named '{name}'; available: {sorted(index)}")
    entry = index[name]
    state = torch.load(os.path.join(PRETRAINED_DIR, entry["file"]), weights_only=True)
    settings = dict(entry["agent"])
    settings.update(overrides)
    return ReinforceAgent(init=state, **settings)
