"""Rewards: what a policy is paid for the interval that followed its decision.

A reward is any callable ``reward(ctx: RewardContext) -> float``. The default for switching,
:class:`SwitchingReward`, pays for progress and charges for compute, so that the policy aims at
accuracy per unit of compute (SAM's accuracy at well under SAM's cost)::

    r = acc   * (a - a_prev)                 # validation-accuracy gain (fraction)
      + loss  * log(V_prev / V)              # validation-loss drop (training loss without validation)
      - cost  * (c - 1)                      # c: gradient evaluations per step / the cheapest choice's
      - skipped * share of skipped steps     # non-finite loss or gradient
      + final * a  at the end of the budget  # (final/10 * -log L without validation)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .features import Signals

__all__ = ["RewardContext", "SwitchingReward"]


@dataclass
class RewardContext:
    now: Signals
    """The interval that just ended."""
    before: Optional[Signals]
    """The interval before it (None for the first)."""
    action: str
    """Name of the action that ran during ``now``."""
    final: bool
    """True at the decision that ends the budget."""


def _finite(*xs: float) -> bool:
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


@dataclass
class SwitchingReward:
    acc: float = 10.0
    loss: float = 1.0
    cost: float = 0.05
    skipped: float = 1.0
    final: float = 10.0

    def __call__(self, ctx: RewardContext) -> float:
        now, before = ctx.now, ctx.before
        r = 0.0
        if before is not None:
            if _finite(now.val_acc, before.val_acc):
                r += self.acc * (now.val_acc - before.val_acc)
            if _finite(now.val_loss, before.val_loss) and now.val_loss > 0 and before.val_loss > 0:
                r += self.loss * math.log(before.val_loss / now.val_loss)
            elif _finite(now.loss, before.loss) and now.loss > 0 and before.loss > 0:
                r += self.loss * math.log(before.loss / now.loss)
        if _finite(now.cost):
            r -= self.cost * (now.cost - 1.0)
        r -= self.skipped * now.skipped_frac
        if ctx.final:
            if _finite(now.val_acc):
                r += self.final * now.val_acc
            elif _finite(now.loss) and now.loss > 0:
                r -= self.final / 10 * math.log(now.loss)
        return r
