"""Learned update rules: an optimizer whose per-coordinate step is a small meta-trained MLP.

* :class:`LearnedOptimizer`: the ``torch.optim.Optimizer`` that applies a rule.
* :mod:`rlopt.learned.rule`: the rule (weights, spec, checkpoint format).
* :mod:`rlopt.learned.features`: the features and the whole step as pure functions.
* :mod:`rlopt.learned.tasks`: the meta-training task distribution.
* :mod:`rlopt.learned.es` / :mod:`rlopt.learned.train`: meta-training by antithetic evolution
  strategies (``python -m rlopt.learned.train``); :mod:`rlopt.learned.td3`: the off-policy
  actor-critic alternative it is compared with.
"""

from .optimizer import DEFAULT_POLICY, LearnedOptimizer
from .rule import LearnedRule, RuleSpec, load_rule

__all__ = ["LearnedOptimizer", "LearnedRule", "RuleSpec", "load_rule", "DEFAULT_POLICY"]
