"""The optimizers users import: the switching and learning-rate controllers, and SAM."""

from .lr_control import QLearningRateOptimizer
from .sam import SAM
from .switching import RLSwitchingOptimizer

__all__ = ["RLSwitchingOptimizer", "QLearningRateOptimizer", "SAM"]
