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
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, TypeVar

import torch

__all__ = ["Policy", "POLICY_FORMAT", "register_policy", "policy_class", "load_policy"]

POLICY_FORMAT = "rlopt.policy/1"
_REGISTRY: dict[str, type[Policy]] = {}
_P = TypeVar("_P", bound="Policy")


def register_policy(cls: type[_P]) -> type[_P]:
    """Class decorator: make a policy kind loadable from checkpoints by its ``kind`` name."""
    _REGISTRY[cls.kind] = cls
    return cls


def policy_class(kind: str) -> type[Policy]:
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

    def __init__(
        self,
        obs_dim: int,
        action_names: Sequence[str],
        config: Any = None,
        *,
        seed: int = 0,
        obs_layout: Optional[dict[str, Any]] = None,
        train: bool = True,
    ):
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
        self.action_names: tuple[str, ...] = action_names
        self.config = config
        self.seed = int(seed)
        self.obs_layout = dict(obs_layout) if obs_layout else None
        self.training = _check_mode(train)
        self.metadata: dict[str, Any] = {}
        self.last_info: dict[str, float] = {}
        self.generator = torch.Generator().manual_seed(self.seed)

    @property
    def n_actions(self) -> int:
        return len(self.action_names)

    # ------------------------------------------------------------- protocol
    @abc.abstractmethod
    def act(self, obs: torch.Tensor) -> int:
        """Choose an action for ``obs`` (1-D float tensor); remember it when learning."""

    def observe(
        self, reward: float, next_obs: torch.Tensor, *, terminal: bool = False, truncated: bool = False
    ) -> dict[str, float]:
        """Reward of the last action, the observation it led to, and whether the episode ended
        (``terminal``) or was cut off by the budget (``truncated``, bootstrapped). May update the
        policy; returns diagnostics (also kept in ``last_info``)."""
        return {}

    def train(self, mode: bool = True) -> Policy:
        """Learn online (``True``) or freeze (``False``). ``mode`` must be a bool: a string such
        as ``"no"`` is refused rather than read as true."""
        self.training = _check_mode(mode)
        return self

    def eval(self) -> Policy:
        return self.train(False)

    def _check_obs(self, obs: torch.Tensor) -> torch.Tensor:
        obs = torch.as_tensor(obs, dtype=torch.float32).reshape(-1)
        if obs.numel() != self.obs_dim:
            raise ValueError(f"Observation has {obs.numel()} features, the policy expects {self.obs_dim}")
        return obs

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that evolves: networks, optimizers, buffers, counters and the RNG."""
        return {"training": self.training, "rng": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. All or nothing: the whole state is checked
        first (:meth:`_check_state`: keys, network and optimizer shapes, buffer sizes, counters,
        the RNG state), then loaded (:meth:`_load_state`). A state that does not fit this policy
        (another ``hidden``, ``rollout_len``/``buffer_size`` or observation size) raises
        ``ValueError`` and leaves the policy exactly as it was. Subclasses extend those two
        methods, not this one."""
        if not isinstance(state, Mapping):
            raise TypeError(f"A policy state must be a dict, got {type(state).__name__}")
        self._check_state(state)
        self._load_state(state)

    def _check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless :meth:`_load_state` can load ``state`` completely. Changes
        nothing."""
        _require_keys(state, ("training", "rng"), f"{type(self).__name__} state")
        if not isinstance(state["training"], bool):
            raise ValueError(f"Invalid training flag in the policy state: {state['training']!r}")
        rng, own = state["rng"], self.generator.get_state()
        if not (isinstance(rng, torch.Tensor) and rng.dtype == own.dtype and rng.shape == own.shape):
            raise ValueError("The policy state's RNG state does not fit a CPU torch.Generator")
        try:
            torch.Generator().set_state(rng)  # a scratch generator: ours changes only in _load_state
        except RuntimeError as err:
            raise ValueError(f"Invalid RNG state in the policy state: {err}") from None

    def _load_state(self, state: Mapping[str, Any]) -> None:
        """Load a state that :meth:`_check_state` accepted."""
        self.training = state["training"]
        self.generator.set_state(state["rng"])

    def describe(self) -> dict[str, Any]:
        """What is needed to rebuild this policy (no learned state)."""
        return {
            "format": POLICY_FORMAT,
            "kind": self.kind,
            # (an instance: __init__ made it one; the stub's is_dataclass also admits a class)
            "config": dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {},  # type: ignore[arg-type]
            "obs_dim": self.obs_dim,
            "action_names": list(self.action_names),
            "obs_layout": self.obs_layout,
            "seed": self.seed,
        }

    def save(self, path: str | os.PathLike, **metadata: Any) -> None:
        """Write a checkpoint that :func:`load_policy` reads (``weights_only=True`` safe)."""
        from .. import __version__

        ckpt = self.describe()
        ckpt["state"] = self.state_dict()
        ckpt["metadata"] = {**self.metadata, **metadata, "rlopt_version": __version__}
        torch.save(ckpt, path)

    @classmethod
    def from_checkpoint(cls: type[_P], ckpt: dict[str, Any], *, train: Optional[bool] = None) -> _P:
        policy = cls(
            int(ckpt["obs_dim"]),
            ckpt["action_names"],
            ckpt.get("config") or None,
            seed=int(ckpt.get("seed", 0)),
            obs_layout=ckpt.get("obs_layout"),
        )
        policy.load_state_dict(ckpt["state"])
        policy.metadata = dict(ckpt.get("metadata") or {})
        if train is not None:
            policy.train(train)
        return policy

    # Generators pickle only on recent torch versions: carry their state instead.
    # (as bytes: a temporary tensor cannot cross to a spawned process through shared memory)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["generator"] = bytes(self.generator.get_state().numpy().tobytes())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        rng = state.pop("generator")
        self.__dict__.update(state)
        self.generator = torch.Generator()
        if isinstance(rng, bytes):
            rng = torch.frombuffer(bytearray(rng), dtype=torch.uint8)
        self.generator.set_state(rng)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(actions={list(self.action_names)}, obs_dim={self.obs_dim}, "
            f"training={self.training})"
        )


def _check_mode(mode: Any) -> bool:
    if not isinstance(mode, bool):
        raise TypeError(
            f"Invalid policy training mode: {mode!r} (train, or an optimizer's train_policy, must be a bool)"
        )
    return mode


# ----------------------------------------------------- state checks shared by the subclasses
def _require_keys(state: Any, keys: Iterable[str], what: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{what} lacks {missing}")


def _check_count(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"Invalid {what} in the policy state: {value!r}")


def _check_module_state(module: torch.nn.Module, saved: Any, what: str) -> None:
    """``saved`` loads into ``module`` with ``strict=True``: the same keys, tensors of the same
    shapes (``Module.load_state_dict`` copies what fits before it reports what does not)."""
    own = module.state_dict()
    _require_keys(saved, own, f"The {what} state")
    unexpected = sorted(set(saved) - set(own))
    if unexpected:
        raise ValueError(f"The {what} state has unexpected keys {unexpected}")
    for key, tensor in own.items():
        value = saved[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"The {what} state's {key} has shape {shape}, this policy's {tuple(tensor.shape)} "
                "(another hidden size, observation size or action set)"
            )


def _check_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, what: str) -> None:
    """``saved`` loads into ``optimizer``: the same groups with as many parameters each, and
    per-parameter state tensors shaped as their parameters (torch checks only the former)."""
    _require_keys(saved, ("state", "param_groups"), f"The {what} state")
    groups, saved_groups = optimizer.param_groups, saved["param_groups"]
    if (
        not isinstance(saved_groups, (list, tuple))
        or len(saved_groups) != len(groups)
        or any(
            not isinstance(s, Mapping) or len(s.get("params", ())) != len(g["params"])
            for g, s in zip(groups, saved_groups)
        )
    ):
        raise ValueError(f"The {what} state's parameter groups do not fit this policy's")
    params = dict(zip((i for s in saved_groups for i in s["params"]), (p for g in groups for p in g["params"])))
    if not isinstance(saved["state"], Mapping):
        raise ValueError(f"The {what} state's per-parameter state must be a dict")
    for index, entry in saved["state"].items():
        if index not in params or not isinstance(entry, Mapping):
            raise ValueError(f"The {what} state has state for an unknown parameter {index!r}")
        for name, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                raise ValueError(
                    f"The {what} state's {name} of parameter {index} has shape "
                    f"{tuple(value.shape)}, the parameter {tuple(params[index].shape)}"
                )


def _check_pending_obs(obs: Any, obs_dim: int) -> None:
    if obs is not None and not (isinstance(obs, torch.Tensor) and obs.numel() == obs_dim):
        raise ValueError(f"The policy state's pending observation does not have {obs_dim} features")


def load_policy(path: str | os.PathLike, *, train: bool = False) -> Policy:
    """Load a policy saved with :meth:`Policy.save`. Loaded policies are frozen unless
    ``train=True`` (fine-tune online)."""
    name = os.fspath(path)
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        raise ValueError(f"{name!r} is empty: not an rlopt policy checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # unpickling errors, truncated archives, foreign files: never torch's advice
        raise ValueError(
            f"{name!r} is not a readable rlopt policy checkpoint (the file is corrupt, truncated "
            f"or of another kind: {type(err).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != POLICY_FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an rlopt policy checkpoint ({POLICY_FORMAT})")
    return policy_class(ckpt["kind"]).from_checkpoint(ckpt, train=train)
