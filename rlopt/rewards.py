"""Rewards: what a policy is paid for the interval that followed its decision.

A reward is any callable ``reward(ctx: RewardContext) -> float``. The default for switching,
:class:`SwitchingReward`, pays for progress and charges for compute, so that the policy aims at
accuracy per unit of compute (SAM's accuracy at well under SAM's cost)::

    r = acc   * (a - a_prev)                 # validation-accuracy gain (fraction)
      + loss  * log(V_prev / V)              # validation-loss drop; the training-loss drop for
                                             # intervals in which no validation metrics were given
      - cost  * (c - 1) * share              # c: gradient evaluations per step / the cheapest choice's;
                                             # share: the interval's fraction of the budget
      - skipped * share of skipped steps     # non-finite loss or gradient
      + final * a  at the end of the budget  # (final/10 * -log L without validation)

The accuracy terms add up to about ``2 * acc`` per unit of final accuracy (the gains telescope,
and the final bonus pays it again): with the defaults one point of accuracy is worth 0.2. The
cost term charges by compute, not by decision: running SAM (c = 2) over the whole budget costs
``cost`` (0.2) whatever the interval, so SAM throughout pays off where it gains more than one
point, and SAM over the last 30% where it gains more than 0.3. Without a known budget the share
is unknown and the charge is ``cost_per_decision * (c - 1)`` per interval.

:class:`BaselineReward` pays the same terms measured against a reference run of the same task
(for meta-training: plain SGD from the same initial weights with the same batch order), so the
policy is paid for what it gains over that reference, not for the progress any optimizer makes.

:class:`FinalReward` pays what a compute budget promises and nothing else: at the end of the run,
the final validation accuracy and loss against a paired reference run under the same budget (for
meta-training: the rule ``"sam-late"``, same initial weights, same batches); no credit in between,
so the swing of the validation metrics that follows each switch earns nothing. Optionally a
potential-based shaping term ``gamma * Phi(s') - Phi(s)`` (Ng et al., 1999), which leaves the best
policy unchanged, e.g. :func:`sharpness_potential`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional, cast

from .control.observation import Signals

__all__ = ["RewardContext", "SwitchingReward", "BaselineReward"]


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
    cost: float = 0.2
    """Charge for one extra gradient evaluation per step over the whole budget."""
    skipped: float = 1.0
    final: float = 10.0
    cost_per_decision: float = 0.05
    """Charge per interval for one extra gradient evaluation per step, when the budget is unknown."""

    def __call__(self, ctx: RewardContext) -> float:
        now, before = ctx.now, ctx.before
        r = 0.0
        if before is not None:
            # Validation terms only where validation was measured during this interval (with a
            # decision every N steps most intervals see none): elsewhere the training loss.
            if now.val_fresh and _finite(now.val_acc, before.val_acc):
                r += self.acc * (now.val_acc - before.val_acc - self._ref_gain(now, before, 1))
            if now.val_fresh and _finite(now.val_loss, before.val_loss) and now.val_loss > 0 and before.val_loss > 0:
                r += self.loss * (math.log(before.val_loss / now.val_loss) - self._ref_gain(now, before, 0))
            elif _finite(now.loss, before.loss) and now.loss > 0 and before.loss > 0:
                r += self._train_loss_term(math.log(before.loss / now.loss))
        if _finite(now.cost):
            if _finite(now.budget_share):
                r -= self.cost * (now.cost - 1.0) * now.budget_share
            else:
                r -= self.cost_per_decision * (now.cost - 1.0)
        r -= self.skipped * now.skipped_frac
        if ctx.final:
            if _finite(now.val_acc):
                r += self.final * (now.val_acc - self._ref_level(now))
            elif _finite(now.loss) and now.loss > 0:
                r -= self.final / 10 * math.log(now.loss)
        return r

    # the reference run's terms; none here (BaselineReward)
    def _train_loss_term(self, log_drop: float) -> float:
        return self.loss * log_drop

    def _ref_gain(self, now: Signals, before: Signals, which: int) -> float:
        return 0.0

    def _ref_level(self, now: Signals) -> float:
        return 0.0


@dataclass
class BaselineReward(SwitchingReward):
    """:class:`SwitchingReward` relative to a reference run of the same task.

    ``reference`` holds the reference run's ``(val_loss, val_acc)`` after each of its epochs. Each
    validation term subtracts what the reference gained over the same epochs (accuracy gain,
    log-drop of the loss), and the final bonus pays the final accuracy minus the reference's at
    the same epoch: a run that matches the reference earns nothing but the compute charge. The
    epoch of a validation figure is ``Signals.val_epoch`` (the epochs completed when it was given),
    so validation metrics must be given at every epoch end, as :func:`rlopt.meta.tasks.run_episode`
    does. Intervals without validation (decisions every N steps) earn no training-loss term: the
    reference records no training loss, and an un-referenced term would pay for progress any
    optimizer makes.

    Meta-training uses it with plain SGD as the reference (``train_policy(reward="paired")``):
    the differences between tasks (an easy task raises everyone's accuracy) cancel, and what is
    left is what the choices changed.
    """

    reference: Sequence[tuple[float, float]] = ()

    def __post_init__(self) -> None:
        ref = [tuple(map(float, r)) for r in self.reference]
        if not ref or any(len(r) != 2 or not all(map(math.isfinite, r)) or r[0] <= 0 for r in ref):
            raise ValueError("BaselineReward needs reference = [(val_loss > 0, val_acc), ...] per epoch, all finite")
        self.reference = cast(list[tuple[float, float]], ref)  # pairs: checked above

    def _epoch(self, s: Signals) -> Optional[int]:
        """0-based index into ``reference`` of the epoch whose validation ``s`` carries."""
        k = s.val_epoch
        return min(k, len(self.reference)) - 1 if k >= 1 else None

    def _train_loss_term(self, log_drop: float) -> float:
        return 0.0

    def _ref_gain(self, now: Signals, before: Signals, which: int) -> float:
        k, j = self._epoch(now), self._epoch(before)
        if k is None or j is None:
            return 0.0
        a, b = self.reference[k][which], self.reference[j][which]
        return a - b if which == 1 else math.log(b / a)

    def _ref_level(self, now: Signals) -> float:
        k = self._epoch(now)
        return 0.0 if k is None else self.reference[k][1]


@dataclass
class FinalReward:
    r"""Credit at the end of the budget only, against a paired reference run::

        r = - skipped * share of skipped steps                   # every interval
          + shaping: gamma * Phi(s') - Phi(s)                    # every interval, when a potential is given
          + acc  * (a - a_ref) + loss * log(L_ref / L)           # at the decision that ends the budget

    ``reference`` is the reference run's final ``(val_loss, val_acc)``: for meta-training, the same
    task trained by the rule ``"sam-late"`` under the same ``compute_budget`` (same initial weights,
    same batches and augmentation), so a policy that matches SAM-late earns 0 and one that beats it
    at the same compute earns more. With the defaults one point of accuracy is worth 0.1 and a 1%
    lower validation loss about 0.01. No compute charge: under a budget the optimizer enforces the
    compute exactly, and both runs spend at most the same. ``a`` and ``L`` are the final
    validation metrics the run gave to ``epoch_end()``; where the last interval carries none
    (``val_fresh`` false) the final term is 0 (the run was not measured).

    ``potential(signals) -> float`` adds potential-based shaping (the telescoping sum changes each
    episode's return by ``-Phi(s_0)`` only, so the best policy is the same); the potential of the
    state after the final decision is taken as 0. E.g. :func:`sharpness_potential`.
    """

    reference: tuple[float, float] = (math.nan, math.nan)
    acc: float = 10.0
    loss: float = 1.0
    skipped: float = 1.0
    potential: Optional[Callable[[Signals], float]] = None
    gamma: float = 1.0

    def __post_init__(self) -> None:
        ref = tuple(float(v) for v in self.reference)
        if len(ref) != 2 or not all(map(math.isfinite, ref)) or ref[0] <= 0:
            raise ValueError(f"FinalReward needs reference = (val_loss > 0, val_acc), finite; got {self.reference!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"Invalid gamma: {self.gamma}")
        self.reference = ref

    def _phi(self, s: Optional[Signals]) -> float:
        if s is None or self.potential is None:
            return 0.0
        v = float(self.potential(s))
        return v if math.isfinite(v) else 0.0

    def __call__(self, ctx: RewardContext) -> float:
        now = ctx.now
        r = -self.skipped * now.skipped_frac
        if self.potential is not None:
            r += (0.0 if ctx.final else self.gamma * self._phi(now)) - self._phi(ctx.before)
        if ctx.final and now.val_fresh and _finite(now.val_acc):
            r += self.acc * (now.val_acc - self.reference[1])
            if _finite(now.val_loss) and now.val_loss > 0:
                r += self.loss * math.log(self.reference[0] / now.val_loss)
        return r


def sharpness_potential(scale: float = 1.0) -> Callable[[Signals], float]:
    """A shaping potential ``Phi(s) = -scale * (sharpness - 1)`` from the interval's sharpness
    estimate ``(L(w + e) - L(w)) / (rho |g|)`` (1 on a linear loss, larger where the loss curves
    up along the gradient): flatter states are worth more. 0 where the signals carry no sharpness."""

    def phi(s: Signals) -> float:
        v = getattr(s, "sharpness", math.nan)
        return -scale * (v - 1.0) if _finite(v) else 0.0

    return phi


__all__ += ["FinalReward", "sharpness_potential"]


# --------------------------------------------------------------------------------------------
# Rewards for hyper-parameter control (QLearningRateOptimizer). Each has a learning-rate term
# (training loss) and a weight-decay term (validation); an optimizer that does not control
# weight decay sets ``wd=0``.


def _val_error(s: Signals) -> float:
    if _finite(s.val_acc):
        return 1.0 - s.val_acc
    return s.val_loss if _finite(s.val_loss) else math.nan


@dataclass
class InverseDistanceReward:
    r"""Hansen (2016), "Using deep Q-learning to control optimization hyperparameters":
    pay the inverse distance of the objective to a lower bound of it::

        r = lr * 1 / max(L - L_lb, d_min)      # L: the interval's mean training loss
          + wd * 1 / max(E - E_lb, d_min)      # E: validation error 1 - acc (val loss without acc)
          - skipped * share of skipped steps   # non-finite loss or gradient

    ``L_lb`` and ``E_lb`` are fixed lower bounds of the objectives (0 for cross-entropy and
    error rates). The guard ``d_min`` floors the distance, so a term never exceeds
    ``coefficient / d_min`` (also when ``L`` dips below the stated bound). A term is 0 when its
    objective was not measured (no closure loss, no validation metrics).

    Note: the paper's objective is the full training loss; here it is the mean mini-batch loss
    over the interval that followed the decision (no extra forward passes).
    """

    lr: float = 0.1
    wd: float = 0.1
    loss_bound: float = 0.0
    error_bound: float = 0.0
    min_distance: float = 1e-2
    skipped: float = 1.0

    def __post_init__(self) -> None:
        if not self.min_distance > 0:
            raise ValueError(f"Invalid min_distance: {self.min_distance}")

    def _term(self, f: float, bound: float) -> float:
        if not _finite(f):
            return 0.0
        return 1.0 / max(f - bound, self.min_distance)

    def __call__(self, ctx: RewardContext) -> float:
        now = ctx.now
        r = 0.0
        if self.lr:
            r += self.lr * self._term(now.loss, self.loss_bound)
        if self.wd:
            r += self.wd * self._term(_val_error(now), self.error_bound)
        return r - self.skipped * now.skipped_frac


@dataclass
class LogImprovementReward:
    r"""Pay the relative improvement of the objectives over the last interval::

        r = lr * log(L_prev / L)               # training loss, interval means
          + wd * log(V_prev / V)               # validation loss (validation error without loss)
          - skipped * share of skipped steps

    A term is 0 when either value is missing or not positive (first interval, no validation).
    Where no training loss was measured (``step()`` without a closure) and the ``wd`` term is off,
    the ``lr`` term pays the validation objective instead, so a loop that only gives validation
    metrics to ``epoch_end()`` still pays the policy.
    """

    lr: float = 10.0
    wd: float = 10.0
    skipped: float = 1.0

    @staticmethod
    def _log_gain(prev: float, now: float) -> float:
        if _finite(prev, now) and prev > 0 and now > 0:
            return math.log(prev / now)
        return 0.0

    def __call__(self, ctx: RewardContext) -> float:
        now, before = ctx.now, ctx.before
        r = 0.0
        if before is not None:
            if self.lr:
                if _finite(before.loss, now.loss) or self.wd:
                    r += self.lr * self._log_gain(before.loss, now.loss)
                else:  # no training loss: the validation objective stands in
                    v_now = now.val_loss if _finite(now.val_loss) else _val_error(now)
                    v_prev = before.val_loss if _finite(before.val_loss) else _val_error(before)
                    r += self.lr * self._log_gain(v_prev, v_now)
            if self.wd:
                v_now = now.val_loss if _finite(now.val_loss) else _val_error(now)
                v_prev = before.val_loss if _finite(before.val_loss) else _val_error(before)
                r += self.wd * self._log_gain(v_prev, v_now)
        return r - self.skipped * now.skipped_frac


__all__ += ["InverseDistanceReward", "LogImprovementReward"]
