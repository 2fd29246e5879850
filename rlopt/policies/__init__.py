"""Decision policies: one module per algorithm, a shared interface and buffers."""

from .base import Policy, load_policy, policy_class, register_policy
from .buffers import ReplayBuffer, RolloutBuffer, Transition, compute_gae
from .dqn import DQNConfig, DQNPolicy
from .fixed import ConstantConfig, ConstantPolicy, RandomConfig, RandomPolicy
from .ppo import PPOConfig, PPOPolicy
from .rules import (
    AdaptiveSamConfig,
    AdaptiveSamPolicy,
    SamEveryConfig,
    SamEveryPolicy,
    SamLateConfig,
    SamLatePolicy,
    ScheduledRandomConfig,
    ScheduledRandomPolicy,
)

__all__ = [
    "Policy",
    "load_policy",
    "policy_class",
    "register_policy",
    "ReplayBuffer",
    "RolloutBuffer",
    "Transition",
    "compute_gae",
    "DQNConfig",
    "DQNPolicy",
    "PPOConfig",
    "PPOPolicy",
    "ConstantConfig",
    "ConstantPolicy",
    "RandomConfig",
    "RandomPolicy",
    "SamLateConfig",
    "SamLatePolicy",
    "SamEveryConfig",
    "SamEveryPolicy",
    "ScheduledRandomConfig",
    "ScheduledRandomPolicy",
    "AdaptiveSamConfig",
    "AdaptiveSamPolicy",
]
