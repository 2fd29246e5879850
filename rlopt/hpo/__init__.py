"""Hyper-parameter search as reinforcement learning, as an Optuna sampler (which Ray Tune can drive).

- :class:`QLearningAgent`: tabular Q-learning over configurations with variance-adaptive epsilon.
- :class:`ReinforceAgent`: REINFORCE with a factored MLP or an autoregressive RNN policy.
- :class:`RLSampler`: ``optuna.samplers.BaseSampler`` around either agent (needs ``optuna``).

The agents need only numpy and torch; the sampler is imported lazily so that the agents work
without Optuna installed.
"""

from .base import Observation
from .qlearning import QLearningAgent
from .reinforce import ReinforceAgent
from .space import GridSpace

__all__ = ["QLearningAgent", "ReinforceAgent", "RLSampler", "GridSpace", "Observation"]


def __getattr__(name: str) -> type:
    if name == "RLSampler":
        from .sampler import RLSampler

        return RLSampler
    raise AttributeError(f"module 'rlopt.hpo' has no attribute {name!r}")
