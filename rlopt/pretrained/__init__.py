"""Registry of pretrained policy checkpoints shipped inside the package.

Each entry is ``<name>.pt`` in this folder, with a one-line description in ``index.json``.
"""
from __future__ import annotations

import json
import os
from typing import Dict

_HERE = os.path.dirname(os.path.abspath(__file__))


def list_policies() -> Dict[str, str]:
    """``{name: one-line description}`` of the shipped pretrained policies."""
    path = os.path.join(_HERE, "index.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        index = json.load(f)
    return {name: entry["description"] for name, entry in index.items()
            if os.path.isfile(os.path.join(_HERE, f"{name}.pt"))}


def load_pretrained(name: str, *, train: bool = False):
    from ..policies import load_policy

    if name not in list_policies():
        raise ValueError(f"Unknown pretrained policy '{name}'; available: {sorted(list_policies())}")
    return load_policy(os.path.join(_HERE, f"{name}.pt"), train=train)
