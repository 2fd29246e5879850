"""A compute budget for the costlier choices of a switching optimizer (SAM).

The budget is the extra compute, as a share of the run's steps, that choices costlier than the
cheapest may use: with SGD (cost 1) and SAM (cost 2), ``share=0.3`` lets SAM run on 30% of the
steps (each SAM step costs one gradient evaluation more than SGD), so the whole run costs at most
1.3x SGD's. Counted in gradient evaluations beyond the cheapest choice's::

    limit = share * run_steps                       # extra evaluations the run may use
    step with action a:  if spent + extra[a] > limit: run the cheapest choice instead
                         spent += extra[a actually run]

:class:`ComputeBudget` does the counting on the host from the choices' known costs (never a
device read, never a host sync), so the decision it makes before each step is free. The
optimizer asks :meth:`ComputeBudget.choose` for the choice of every step; a step that raises
before it is counted is not charged (the charge is committed only once the controller's step
count has moved past it), so an exception leaves the budget as it was.

Under DDP every rank takes the same action at every decision and counts the same steps, so
every rank's count is the same without any communication.

The run's length: ``total_steps``, or with only ``total_epochs`` given, ``total_epochs`` times
the first epoch's length (known at the first ``epoch_end()``). Until the length is known the
costlier choices do not run (conservative: the first epoch runs the cheapest choice whatever the
policy says). An epoch shorter than the first makes the run shorter than counted; give
``total_steps`` where the share must hold to the step. A checkpoint carries the count, not the
run's length: a resumed run with a larger ``total_steps`` or ``total_epochs`` (an extended run)
may spend the share of its new length.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["ComputeBudget", "BUDGET_FEATURES", "check_budget"]

#: The observation features a budget adds (each in [0, 1]):
#: ``budget_left``: the share of the budget not yet spent;
#: ``steps_left``: the share of the run's steps still to come;
#: ``budget_affordable``: the share of the remaining steps that the budget left can pay for at the
#: costliest choice (1: the costliest choice can run to the end).
BUDGET_FEATURES: tuple[str, ...] = ("budget_left", "steps_left", "budget_affordable")

_REL_TOL = 1e-12  # float rounding of share * run_steps (0.3 * 100 = 30.000000000000004)


def check_budget(share: Any, costs: Sequence[float], total_steps: Optional[int], total_epochs: Optional[int]) -> float:
    """``share`` as a float, or a clear error: a number in ``[0, max extra cost]`` and a run
    whose length is known."""
    if isinstance(share, bool) or not isinstance(share, numbers.Real):
        raise TypeError(f"compute_budget must be a number, got {share!r}")
    share = float(share)
    cheapest = min(costs)
    top = max(costs) - cheapest
    if not 0.0 <= share <= top:  # NaN fails too
        raise ValueError(
            f"Invalid compute_budget: {share} (the extra gradient evaluations per step of the run, "
            f"in [0, {top:g}]: {top:g} lets the costliest choice run on every step)"
        )
    if total_steps is None and total_epochs is None:
        raise ValueError("compute_budget needs the run's length: give total_steps (exact) or total_epochs")
    return share


class ComputeBudget:
    """The host-side count of a compute budget (see the module doc).

    Args:
        share: extra gradient evaluations the run may use, per step of the run.
        costs: per action, gradient evaluations per step.
        total_steps, total_epochs: the run's length (one at least).
    """

    def __init__(
        self, share: float, costs: Sequence[float], *, total_steps: Optional[int], total_epochs: Optional[int]
    ):
        self.share = check_budget(share, costs, total_steps, total_epochs)
        cheapest = min(costs)
        self.extra = tuple(float(c) - cheapest for c in costs)
        self.cheapest = self.extra.index(0.0)
        self.max_extra = max(self.extra)
        self.total_steps, self.total_epochs = total_steps, total_epochs
        self.epoch_steps: Optional[float] = None  # without total_steps: the first epoch's length, once known
        self.spent = 0.0  # extra evaluations of the steps counted
        self.overridden = 0  # steps counted on which the policy's choice was replaced by the cheapest
        self._pending: Optional[tuple[int, float, bool]] = None  # (step, extra, overridden) of the step under way

    # ------------------------------------------------------------- counting
    def length(self, counts: Mapping[str, int]) -> Optional[int]:
        """The run's length in steps (None: not known yet)."""
        if self.total_steps is not None:
            return self.total_steps
        epoch_steps = self.epoch_steps
        if epoch_steps is None and counts["epoch"] >= 1 and counts["epoch_start_step"] > 0:
            epoch_steps = counts["epoch_start_step"] / counts["epoch"]
        return None if epoch_steps is None or self.total_epochs is None else int(round(epoch_steps * self.total_epochs))

    def limit(self, counts: Mapping[str, int]) -> Optional[float]:
        n = self.length(counts)
        return None if n is None else self.share * n

    def used(self, step: int) -> tuple[float, int]:
        """Extra evaluations spent and steps overridden, over the ``step`` steps counted so far."""
        spent, over = self.spent, self.overridden
        if self._pending is not None and step > self._pending[0]:
            spent, over = spent + self._pending[1], over + int(self._pending[2])
        return spent, over

    def choose(self, action: int, counts: Mapping[str, int]) -> int:
        """The choice that runs at the step about to be taken: ``action``, or the cheapest choice
        where ``action``'s extra cost would cross the budget. Host arithmetic only."""
        step = counts["step"]
        self.spent, self.overridden = self.used(step)  # the previous step, if it was counted
        self._pending = None
        n = self.length(counts)
        if n is not None and self.total_steps is None and self.epoch_steps is None:
            self.epoch_steps = counts["epoch_start_step"] / counts["epoch"]
        extra = self.extra[action]
        over = False
        if extra > 0.0 and (n is None or self.spent + extra > self.share * n * (1.0 + _REL_TOL)):
            action, extra, over = self.cheapest, 0.0, True
        self._pending = (step, extra, over)
        return action

    # ------------------------------------------------------------- what the policy sees
    def features(self, counts: Mapping[str, int]) -> tuple[float, float, float]:
        """:data:`BUDGET_FEATURES` after ``counts["step"]`` steps."""
        n = self.length(counts)
        if n is None:  # nothing can be spent before the run's length is known
            return 1.0, 1.0, 0.0
        limit = self.share * n
        spent = self.used(counts["step"])[0]
        left = max(0.0, limit - spent)
        steps_left = max(0, n - counts["step"])
        budget_left = left / limit if limit > 0 else 0.0
        affordable = min(1.0, left / (self.max_extra * steps_left)) if steps_left and self.max_extra > 0 else 0.0
        return min(1.0, budget_left), steps_left / n if n else 0.0, affordable

    def history(self, counts: Mapping[str, int]) -> dict[str, Any]:
        """What a history entry records: the budget used as a share of the run's steps (comparable
        to ``share``), in extra gradient evaluations, and the steps overridden."""
        n = self.length(counts)
        spent, over = self.used(counts["step"])
        return {"budget_used": spent / n if n else math.nan, "budget_spent": spent, "budget_overridden": over}

    # ------------------------------------------------------------- checkpoints
    def state_dict(self, counts: Mapping[str, int]) -> dict[str, Any]:
        spent, over = self.used(counts["step"])
        return {"compute_budget": self.share, "epoch_steps": self.epoch_steps, "spent": spent, "overridden": over}

    def check_state(self, state: Mapping[str, Any]) -> None:
        keys = ("compute_budget", "epoch_steps", "spent", "overridden")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(
                f"rlopt.extra lacks {missing}: the checkpoint was saved without a compute_budget, "
                f"this optimizer has compute_budget={self.share}"
            )
        if state["compute_budget"] != self.share:
            raise ValueError(
                f"rlopt.extra.compute_budget: the checkpoint's budget is {state['compute_budget']!r}, "
                f"this optimizer's {self.share}"
            )
        n = state["epoch_steps"]
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 < n < math.inf):
            raise ValueError(f"Invalid rlopt.extra.epoch_steps: {n!r}")
        spent = state["spent"]
        if isinstance(spent, bool) or not isinstance(spent, (int, float)) or not 0.0 <= spent < math.inf:
            raise ValueError(f"Invalid rlopt.extra.spent: {spent!r}")
        over = state["overridden"]
        if isinstance(over, bool) or not isinstance(over, int) or over < 0:
            raise ValueError(f"Invalid rlopt.extra.overridden: {over!r}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        self.epoch_steps = None if state["epoch_steps"] is None else float(state["epoch_steps"])
        self.spent, self.overridden = float(state["spent"]), state["overridden"]
        self._pending = None

    def __repr__(self) -> str:
        return f"ComputeBudget(share={self.share}, spent={self.spent})"
