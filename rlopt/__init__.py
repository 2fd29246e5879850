"""rlopt: PyTorch optimizers whose choices during training (which optimizer runs, when to pay for
SAM, what the learning rate does) are taken by small policies, learned by reinforcement learning
or written as rules."""

__version__ = "0.1.0"

import os as _os
from typing import TYPE_CHECKING, Union

# the optimizers first: rlopt.control.choices needs rlopt.optim loaded (SAM is one of its families)
from .optim import SAM, QLearningRateOptimizer, RLSwitchingOptimizer

# isort: split
from .control.choices import register_family
from .learned import LearnedOptimizer
from .policies import load_policy as _load_policy_file

if TYPE_CHECKING:
    from .learned.rule import LearnedRule
    from .policies.base import Policy


def load_policy(name_or_path: "Union[str, _os.PathLike]", *, train: bool = False) -> "Union[Policy, LearnedRule]":
    """Load a policy by registered name (see :func:`list_policies`) or checkpoint path.
    Loaded policies are frozen unless ``train=True``."""
    from .registry import list_policies as _names
    from .registry import load_pretrained

    if isinstance(name_or_path, str) and not _os.path.isfile(name_or_path):
        if name_or_path in _names():
            return load_pretrained(name_or_path, train=train)
        raise ValueError(
            f"No policy checkpoint at '{name_or_path}' and no pretrained policy of that name; "
            f"available: {sorted(_names())}"
        )
    return _load_policy_file(name_or_path, train=train)


def list_policies() -> dict[str, str]:
    """Names of the pretrained policies shipped with rlopt, with a one-line description each."""
    from .registry import list_policies as _list

    return _list()


__all__ = [
    "RLSwitchingOptimizer",
    "QLearningRateOptimizer",
    "SAM",
    "LearnedOptimizer",
    "load_policy",
    "list_policies",
    "register_family",
    "__version__",
]
