"""Where users train: a Lightning callback (:mod:`rlopt.integrations.lightning`), a Hugging Face
``Trainer`` callback and subclass (:mod:`rlopt.integrations.transformers`), and the decision logger
they share (:mod:`rlopt.integrations.logging`). Each framework module imports its framework, an
optional dependency (``pip install 'rlopt[lightning]'`` or ``'rlopt[transformers]'``), so import
them by their full name."""

from .logging import DecisionLogger, decision_record, find_controlled_optimizer

__all__ = ["DecisionLogger", "decision_record", "find_controlled_optimizer"]
