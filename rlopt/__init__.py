"""rlopt: drop-in PyTorch meta-optimizers driven by small reinforcement-learning policies."""
__version__ = "0.1.0"

from .policies import load_policy as _load_policy_file
from .sam import SAM
from .switching import RLSwitchingOptimizer
from .lr_control import QLearningRateOptimizer


def load_policy(name_or_path, *, train: bool = False):
    """Load a policy by pretrained name (see :func:`list_policies`) or checkpoint path.
    Loaded policies are frozen unless ``train=True``."""
    import os

    from .registry import list_policies, load_pretrained

    if isinstance(name_or_path, str) and not os.path.isfile(name_or_path):
        if name_or_path in list_policies():
            return load_pretrained(name_or_path, train=train)
        raise ValueError(f"No policy checkpoint at '{name_or_path}' and no pretrained policy of that name; "
                         f"available: {sorted(list_policies())}")
    return _load_policy_file(name_or_path, train=train)


def list_policies():
    """Names of the pretrained policies shipped with rlopt, with a one-line description each."""
    from .registry import list_policies as _list

    return _list()


__all__ = ["RLSwitchingOptimizer", "QLearningRateOptimizer", "SAM", "load_policy", "list_policies", "__version__"]
