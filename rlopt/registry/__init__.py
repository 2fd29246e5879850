"""Registry of pretrained policy checkpoints shipped inside the package.

Each entry is ``<name>.pt`` in this folder, listed in ``index.json`` with a one-line description,
the command that reproduces it (``python -m rlopt.meta.train_policy ... --register ...``), the
number of training episodes and the measured training time. Loaded policies are frozen unless
``train=True``. Entries with ``"optimizer": "learned"`` are learned update rules
(:class:`rlopt.learned.LearnedOptimizer`'s ``policy=``), written by ``python -m rlopt.learned.train``;
:func:`load_pretrained` returns them as a :class:`rlopt.learned.LearnedRule`.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from ..learned.rule import LearnedRule
    from ..policies.base import Policy

__all__ = ["list_policies", "load_pretrained", "pretrained_info", "pretrained_path"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def _index() -> dict[str, dict[str, Any]]:
    path = os.path.join(_HERE, "index.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        index = json.load(f)
    return {name: entry for name, entry in index.items() if os.path.isfile(os.path.join(_HERE, f"{name}.pt"))}


def list_policies() -> dict[str, str]:
    """``{name: one-line description}`` of the shipped pretrained policies."""
    return {name: entry["description"] for name, entry in _index().items()}


def pretrained_info(name: str) -> dict[str, Any]:
    """The ``index.json`` entry of a shipped policy: description, command, episodes, training time."""
    index = _index()
    if name not in index:
        raise ValueError(f"Unknown pretrained policy '{name}'; available: {sorted(index)}")
    return dict(index[name])


def pretrained_path(name: str) -> str:
    """Path of a shipped policy's checkpoint."""
    pretrained_info(name)
    return os.path.join(_HERE, f"{name}.pt")


def load_pretrained(name: str, *, train: bool = False) -> Union[Policy, LearnedRule]:
    """Load a shipped policy by name (frozen unless ``train=True``); a learned update rule
    (``"optimizer": "learned"``) comes back as a :class:`rlopt.learned.LearnedRule`."""
    if pretrained_info(name).get("optimizer") == "learned":
        from ..learned.rule import load_rule

        return load_rule(pretrained_path(name))
    from ..policies import load_policy

    return load_policy(pretrained_path(name), train=train)
