"""The interface every policy offers the optimizers, and policy checkpoints.

A policy sees observation vectors and rewards and returns action indices. It knows nothing of
model parameters, devices or torch optimizers of the model: an optimizer builds the observation,
asks for an action, applies it, and later reports the reward of the interval that followed.

The protocol, once per decision::

    if k > 0: policy.observe(reward_k, obs_k, terminal=False, truncated=budget_over)
    action_k = policy.act(obs_k)

Policies run on the CPU (they are tiny and decide rarely) with their own ``torch.Generator``, so
they never touch the user's global random state.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["Policy", "POLICY_FORMAT", "register_policy", "policy_class", "load_policy"]

POLICY_FORMAT = "rlopt.policy/1"
_REGISTRY: Dict[str, type] = {}


def register_policy(cls: type) -> type:
    """Class decorator: make a policy kind loadable from checkpoints by its ``kind`` name."""
    _REGISTRY[cls.kind] = cls
    return cls


def policy_class(kind: str) -> type:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"Unknown policy '{kind}'; expected one of {sorted(_REGISTRY)}") from None


class Policy(abc.ABC):
    """Base class. Subclasses set ``kind`` and ``Config`` and implement :meth:`act`.

    Args:
        obs_dim: length of the observation vector.
        action_names: the actions, by name (e.g. ``("sgd", "sam")``); checked when a policy is
            given to an optimizer, so a checkpoint cannot silently drive the wrong action set.
        config: the algorithm's dataclass of hyper-parameters (``None``: its defaults).
        seed: seeds the network initialisation and the policy's own generator.
        obs_layout: names and version of the observation features (saved, checked on load).
        train: learn online (``True``) or stay frozen.
    """

    kind: str = ""
    Config: type = type(None)

    def __init__(self, obs_dim: int, action_names: Sequence[str], config: Any = None, *,
                 seed: int = 0, obs_layout: Optional[Dict[str, Any]] = None, train: bool = True):
        if not isinstance(obs_dim, int) or obs_dim <= 0:
            raise ValueError(f"Invalid observation size: {obs_dim}")
        action_names = tuple(action_names)
        if not action_names or not all(isinstance(a, str) for a in action_names):
            raise ValueError(f"Invalid action names: {action_names!r}")
        if config is None:
            config = self.Config()
        elif isinstance(config, dict):
            config = self.Config(**config)
        elif not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__name__}, got {config!r}")
        self.obs_dim = obs_dim
        self.action_names: Tuple[str, ...] = action_names
        self.config = config
        self.seed = int(seed)
        self.obs_layout = dict(obs_layout) if obs_layout else None
        self.training = bool(train)
        self.metadata: Dict[str, Any] = {}
        self.last_info: Dict[str, float] = {}
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def n_actions(self) -> int:
        return len(self.action_names)

    # ------------------------------------------------------------- protocol
    @abc.abstractmethod
    def act(self, obs: torch.Tensor) -> int:
        """Choose an action for ``obs`` (1-D float tensor); remember it when learning."""

    def observe(self, reward: float, next_obs: torch.Tensor, *, terminal: bool = False,
                truncated: bool = False) -> Dict[str, float]:
        """Reward of the last action, the observation it led to, and whether the episode ended
        (``terminal``) or was cut off by the budget (``truncated``, bootstrapped). May update the
        policy; returns diagnostics (also kept in ``last_info``)."""
        return {}

    def train(self, mode: bool = True) -> "Policy":
        self.training = bool(mode)
        return self

    def eval(self) -> "Policy":
        return self.train(False)

    def _check_obs(self, obs: torch.Tensor) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(-1)
        if obs.numel() != self.obs_dim:
            raise ValueError(f"Observation has {obs.numel()} features, the policy expects {self.obs_dim}")
        return obs

    # -------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything that evolves: networks, optimizers, buffers, counters and the RNG."""
        return {"training": self.training, "rng": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.training = bool(state["training"])
        self.generator.set_state(state["rng"])

    def describe(self) -> Dict[str, Any]:
        """What is needed to rebuild this policy (no learned state)."""
        return {
            "format": POLICY_FORMAT,
            "kind": self.kind,
            "config": dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {},
            "obs_dim": self.obs_dim,
            "action_names": list(self.action_names),
            "obs_layout": self.obs_layout,
            "seed": self.seed,
        }

    def save(self, path: "str | os.PathLike", **metadata: Any) -> None:
        """Write a checkpoint that :func:`load_policy` reads (``weights_only=True`` safe)."""
        from .. import __version__

        ckpt = self.describe()
        ckpt["state"] = self.state_dict()
        ckpt["metadata"] = {**self.metadata, **metadata, "rlopt_version": __version__}
        torch.save(ckpt, path)

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any], *, train: Optional[bool] = None) -> "Policy":
        policy = cls(int(ckpt["obs_dim"]), ckpt["action_names"], ckpt.get("config") or None,
                     seed=int(ckpt.get("seed", 0)), obs_layout=ckpt.get("obs_layout"))
        policy.load_state_dict(ckpt["state"])
        policy.metadata = dict(ckpt.get("metadata") or {})
        if train is not None:
            policy.train(train)
        return policy

    # Generators pickle only on recent torch versions: carry their state instead.
    def __getstate__(self):
        state = self.__dict__.copy()
        state["generator"] = self.generator.get_state()
        return state

    def __setstate__(self, state):
        rng = state.pop("generator")
        self.__dict__.update(state)
        self.generator = torch.Generator()
        self.generator.set_state(rng)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(actions={list(self.action_names)}, obs_dim={self.obs_dim}, "
                f"training={self.training})")


def load_policy(path: "str | os.PathLike", *, train: bool = False) -> Policy:
    """Load a policy saved with :meth:`Policy.save`. Loaded policies are frozen unless
    ``train=True`` (fine-tune online)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != POLICY_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an rlopt policy checkpoint ({POLICY_FORMAT})")
    return policy_class(ckpt["kind"]).from_checkpoint(ckpt, train=train)
