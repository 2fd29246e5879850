"""The ``policy=`` argument of an optimizer, resolved to a :class:`~rlopt.policies.Policy` that fits
its action set and observation layout."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Optional, cast

from ..policies import ConstantConfig, DQNConfig, Policy, PPOConfig, RandomConfig, load_policy, policy_class
from ..policies.rules import (
    RULE_NAMES,
    AdaptiveSamConfig,
    SamEveryConfig,
    SamLateConfig,
    ScheduledRandomConfig,
    rule_from_name,
)

__all__ = ["make_policy", "check_policy"]

_CONFIGS = {
    DQNConfig: "dqn",
    PPOConfig: "ppo",
    RandomConfig: "random",
    ConstantConfig: "constant",
    SamLateConfig: "sam-late",
    SamEveryConfig: "sam-every",
    ScheduledRandomConfig: "ss-sam",
    AdaptiveSamConfig: "ae-sam",
}


def make_policy(
    spec: Any,
    action_names: Sequence[str],
    obs_layout: dict[str, Any],
    seed: int,
    train: Optional[bool] = None,
    layouts: Optional[Callable[[int], dict[str, Any]]] = None,
) -> Policy:
    """A name (``"ppo"``, ``"dqn"``, ``"random"``, ``"constant:<action>"``, a rule such as
    ``"sam-late"`` or ``"sam-every:4"`` (:mod:`rlopt.policies.rules`), a registered policy's name), a
    config, a :class:`Policy` or a checkpoint path; checked against the action set and
    the observation layout. A new policy gets ``obs_layout``; a given one (a Policy, a file, a
    registered name) trained on another layout version is checked against ``layouts(version)``,
    the layout the optimizer can make for it, where that version exists."""
    action_names = tuple(action_names)
    obs_dim = len(obs_layout["names"])
    if isinstance(spec, Policy):
        policy = spec
    elif type(spec) in _CONFIGS:
        policy = policy_class(_CONFIGS[type(spec)])(obs_dim, action_names, spec, seed=seed, obs_layout=obs_layout)
    elif isinstance(spec, (str, os.PathLike)):
        policy = _from_name(os.fspath(spec), action_names, obs_dim, obs_layout, seed)
    else:
        raise TypeError(f"Invalid policy: {spec!r} (expected a name, a config, a Policy or a checkpoint path)")
    own = policy.obs_layout
    version = None if own is None else own.get("version")
    if layouts is not None and isinstance(version, int) and version != obs_layout["version"]:
        try:
            obs_layout = layouts(version)
        except ValueError:
            pass  # a version this rlopt cannot make: the check below says so
    check_policy(policy, action_names, obs_layout)
    if train is not None:
        policy.train(train)
    return policy


def _from_name(name: str, action_names: tuple[str, ...], obs_dim: int, obs_layout: dict[str, Any], seed: int) -> Policy:
    if name in ("dqn", "ppo", "random"):
        return policy_class(name)(obs_dim, action_names, seed=seed, obs_layout=obs_layout)
    if name.startswith("constant:"):
        return policy_class("constant")(
            obs_dim, action_names, ConstantConfig(name.split(":", 1)[1]), seed=seed, obs_layout=obs_layout
        )
    rule = rule_from_name(name, obs_dim, action_names, obs_layout, seed)
    if rule is not None:
        return rule
    if os.path.isfile(name):
        return load_policy(name)
    from ..registry import list_policies, load_pretrained, pretrained_info

    if name not in list_policies():
        raise ValueError(
            f"Unknown policy '{name}': expected 'ppo', 'dqn', 'random', 'constant:<choice>', "
            f"a rule {list(RULE_NAMES)}, a pretrained name {sorted(list_policies())}, a checkpoint path, a Policy "
            "or a config"
        )
    if pretrained_info(name).get("optimizer") == "learned":
        raise ValueError(
            f"'{name}' is a learned update rule, not a decision policy: use "
            f"rlopt.LearnedOptimizer(params, policy='{name}')"
        )
    return cast(Policy, load_pretrained(name))  # a decision policy: a learned rule was refused above


def check_policy(policy: Policy, action_names: tuple[str, ...], obs_layout: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``policy`` was made for these actions and this layout."""
    if tuple(policy.action_names) != tuple(action_names):
        raise ValueError(
            f"The policy's action set {list(policy.action_names)} does not match this optimizer's {list(action_names)}"
        )
    if policy.obs_dim != len(obs_layout["names"]):
        raise ValueError(
            f"The policy expects {policy.obs_dim} observation features, this optimizer makes "
            f"{len(obs_layout['names'])} (observation layout version {obs_layout['version']})"
        )
    if policy.obs_layout is None:
        policy.obs_layout = dict(obs_layout)
    elif policy.obs_layout.get("version") != obs_layout["version"] or list(policy.obs_layout.get("names", [])) != list(
        obs_layout["names"]
    ):
        raise ValueError(
            f"The policy was trained on observation layout version {policy.obs_layout.get('version')} "
            f"{policy.obs_layout.get('names')}, this optimizer makes version {obs_layout['version']} "
            f"{obs_layout['names']}"
        )
