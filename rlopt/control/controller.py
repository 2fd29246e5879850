"""Decisions: when they happen, what the policy sees and is paid, and what is recorded.

A :class:`Controller` is a plain object with no parameters and no torch optimizer. It counts
steps, epochs and compute, knows the budget (``total_steps`` or ``total_epochs``), and at each
decision point runs :meth:`Controller.decide`:

1. read the interval's signals from the tracker (the only host sync) and, under DDP, reduce
   them over the ranks (:mod:`rlopt.control.distributed`);
2. build the observation (:mod:`rlopt.control.observation`) and the reward of the interval that
   ended (:mod:`rlopt.rewards`); a non-finite reward or a long run of skipped steps raises here;
3. pay the policy, ask it for an action, and only then commit: the owner applies the action,
   the history records it, the counters move on.

Everything that can fail does so before step 3 commits, so a decision that raises leaves the
controller, the observer and the history as they were. Decisions run with gradients on and
outside inference mode, whatever the caller's context, since a learning policy needs them.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from ..policies import Policy
from ..rewards import RewardContext
from . import distributed
from .observation import ObservationBuilder, Signals
from .signals import SignalTracker
from .torch_compat import user_stacklevel

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Controller", "NonFiniteError"]

_COUNTERS = (
    "step",
    "epoch",
    "interval_steps",
    "decisions",
    "epoch_start_step",
    "steps_per_epoch",
    "last_decision_step",
    "skipped_total",
    "val_epoch",
)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient (all were skipped)."""


class Controller:
    """Progress, budget and decisions of one controlled optimizer (see module doc).

    Args:
        action_names: the actions, by name.
        policy: the :class:`~rlopt.policies.Policy` that decides.
        reward_fn: ``reward(RewardContext) -> float``.
        observer: builds observations.
        costs: per action, the gradient evaluations per step it costs (for a switching
            optimizer the choice's cost; 1 where an action does not change the cost).
        interval: ``"epoch"`` or a positive int.
        total_steps, total_epochs: the budget, when known.
        max_nonfinite_steps: raise after this many consecutive skipped steps (None: never).
        history_size: decisions kept in :attr:`history` (None: all).
        process_group: ranks that decide together (see :mod:`rlopt.control.distributed`).
    """

    def __init__(
        self,
        action_names: Sequence[str],
        policy: Policy,
        reward_fn: Callable[[RewardContext], float],
        observer: ObservationBuilder,
        costs: Sequence[float],
        *,
        interval: Union[str, int],
        total_steps: Optional[int],
        total_epochs: Optional[int],
        max_nonfinite_steps: Optional[int],
        history_size: Optional[int],
        process_group: Any,
    ):
        self.action_names = tuple(action_names)
        self.policy, self.reward_fn, self.observer = policy, reward_fn, observer
        self.costs = tuple(float(c) for c in costs)
        self.interval = interval
        self.total_steps, self.total_epochs = total_steps, total_epochs
        self.max_nonfinite_steps = max_nonfinite_steps
        self.history_size = history_size
        self.history: list[dict[str, Any]] = []
        self.counts: dict[str, int] = {k: 0 for k in _COUNTERS}
        self.counts["last_decision_step"] = -1
        self.action: Optional[int] = None
        self.interval_cost = 0.0
        self.val: dict[str, float] = {}
        self.val_fresh: list[str] = []  # metrics given since the last decision
        self.prev_signals: Optional[Signals] = None
        self.process_group = process_group
        self.group: Optional[ProcessGroup] = None  # resolved at the last decision (None: this rank decides alone)
        self.synced_group: Optional[ProcessGroup] = None  # the group this rank's policy was last made equal over
        self.warned: dict[str, bool] = {}

    # ------------------------------------------------------------- progress
    def progress(self) -> float:
        c = self.counts
        if self.total_steps is not None:
            return min(1.0, c["step"] / self.total_steps)
        if self.total_epochs is not None:
            if self.interval != "epoch" and c["steps_per_epoch"] > 0:
                done = c["epoch"] + (c["step"] - c["epoch_start_step"]) / c["steps_per_epoch"]
                return min(1.0, done / self.total_epochs)
            return min(1.0, c["epoch"] / self.total_epochs)
        return math.nan

    def budget_share(self, steps: int) -> float:
        """The share of the whole budget that ``steps`` steps of this interval were (NaN: unknown)."""
        c = self.counts
        if self.total_steps is not None:
            return steps / self.total_steps
        if self.total_epochs is not None:
            if self.interval == "epoch":
                return 1.0 / self.total_epochs if steps else 0.0
            if c["steps_per_epoch"] > 0:
                return steps / (c["steps_per_epoch"] * self.total_epochs)
        return math.nan

    def last_budget_step(self) -> bool:
        c = self.counts
        if self.total_steps is not None:
            return c["step"] == self.total_steps
        return self.total_epochs is not None and c["epoch"] == self.total_epochs - 1 and self.progress() >= 1.0

    def count_step(self, cost: float) -> Optional[bool]:
        """Count a step taken; return None when no decision is due after it, else whether that
        decision is the final one."""
        c = self.counts
        c["step"] += 1
        c["interval_steps"] += 1
        self.interval_cost += cost
        if isinstance(self.interval, str):  # "epoch"
            return None
        last = self.last_budget_step()
        if last and self.total_epochs is not None:
            return None  # epoch_end follows: it makes the final decision, paid on the final validation
        if c["interval_steps"] >= self.interval:
            return self.progress() >= 1.0
        return True if last else None  # the budget ends between two decision points

    def uncount_step(self, cost: float) -> None:
        c = self.counts
        c["step"] -= 1
        c["interval_steps"] -= 1
        self.interval_cost -= cost

    def end_epoch(self, val: Mapping[str, float]) -> Optional[bool]:
        """Record an epoch end (``val``: the metrics given); return whether a decision is due now
        (None: not due), and if so whether it is the final one."""
        c = self.counts
        self.val.update(val)
        self.val_fresh = sorted(set(self.val_fresh) | set(val))
        c["epoch"] += 1
        if val:
            c["val_epoch"] = c["epoch"]
        c["steps_per_epoch"] = c["step"] - c["epoch_start_step"]
        c["epoch_start_step"] = c["step"]
        final = (self.total_epochs is not None and c["epoch"] == self.total_epochs) or self.progress() >= 1.0
        if self.interval == "epoch" or (final and c["last_decision_step"] != c["step"]):
            return final
        return None

    # ------------------------------------------------------------- decisions
    def decide(
        self,
        tracker: SignalTracker,
        *,
        final: bool,
        extra_features: Callable[[Signals], Sequence[float]],
        apply_action: Callable[[int], None],
        history_extra: Callable[[], dict[str, Any]],
        device: torch.device,
        lr: float = math.nan,
    ) -> int:
        """One decision (see module doc); returns the action now in effect. ``lr``: the learning
        rate now (the first param group's), observed against its peak."""
        if torch.is_inference_mode_enabled():  # (entered only where needed: leaving it costs)
            with torch.inference_mode(False), torch.enable_grad():
                return self._decide(tracker, final, extra_features, apply_action, history_extra, device, lr)
        with torch.enable_grad():
            return self._decide(tracker, final, extra_features, apply_action, history_extra, device, lr)

    def _decide(
        self,
        tracker: SignalTracker,
        final: bool,
        extra_features: Callable[[Signals], Sequence[float]],
        apply_action: Callable[[int], None],
        history_extra: Callable[[], dict[str, Any]],
        device: torch.device,
        lr: float,
    ) -> int:
        c = self.counts
        summary: Mapping[str, Any] = tracker.read()
        val = dict(self.val)
        val_fresh, val_epoch = bool(self.val_fresh), c["val_epoch"]
        group = self.group = distributed.resolve_group(self.process_group)
        if group is not None:  # data-parallel ranks: one observation and one reward for all
            device = distributed.collective_device(group, device)
            given = {k: val.get(k, math.nan) if k in self.val_fresh else math.nan for k in ("val_loss", "val_acc")}
            means, top = distributed.reduce_signals(
                {k: summary[k] for k in ("loss", "grad_norm", "grad_cosine", "grad_sign_agreement", "sharpness")}
                | given,
                {
                    "skipped": summary["skipped"],
                    "longest_skip_run": summary["longest_skip_run"],
                    "val_fresh": val_fresh,
                    "val_epoch": val_epoch,
                },
                group,
                device,
            )
            summary = {
                **summary,
                **means,
                "skipped": int(top["skipped"]),
                "longest_skip_run": int(top["longest_skip_run"]),
            }
            # the metrics given since the last decision, over the ranks that gave them; else the last ones
            val.update({k: means[k] for k in given if not math.isnan(means[k])})
            val_fresh, val_epoch = bool(top["val_fresh"]), int(top["val_epoch"])
        if self.max_nonfinite_steps is not None and summary["longest_skip_run"] >= self.max_nonfinite_steps:
            tracker.reset_run()
            raise self.nonfinite_error(summary["longest_skip_run"])
        if math.isnan(summary["loss"]) and summary["skipped"] < c["interval_steps"]:
            self.warn_once("no_loss", self.no_loss_message(c["interval_steps"]))
        cheapest = min(self.costs)
        steps = c["interval_steps"]
        signals = Signals(
            loss=summary["loss"],
            grad_norm=summary["grad_norm"],
            grad_cosine=summary["grad_cosine"],
            grad_sign_agreement=summary["grad_sign_agreement"],
            val_loss=val.get("val_loss", math.nan),
            val_acc=val.get("val_acc", math.nan),
            steps=steps,
            skipped=summary["skipped"],
            cost=self.interval_cost / steps / cheapest if steps else math.nan,
            progress=self.progress(),
            budget_share=self.budget_share(steps),
            val_fresh=val_fresh,
            val_epoch=val_epoch,
            sharpness=summary["sharpness"],
            lr=lr,
        )
        obs = self.observer.peek(signals, self.action, max(self.costs) / cheapest, extra_features(signals))
        reward, info = None, {}
        if c["decisions"] > 0:
            assert self.action is not None  # set by the first decision
            ctx = RewardContext(
                now=signals, before=self.prev_signals, action=self.action_names[self.action], final=final
            )
            reward = self.reward_fn(ctx)
            try:
                reward = float(reward)
            except (TypeError, ValueError):
                raise TypeError(f"The reward function returned {reward!r}, not a number") from None
            if not math.isfinite(reward):
                raise ValueError(
                    f"The reward function returned {reward}; nothing was changed (the policy was "
                    "not paid and the step was not applied)"
                )
            info = self.policy.observe(reward, obs, terminal=False, truncated=final)
        if group is not None and self.synced_group is not group:
            distributed.broadcast_policy(self.policy, group, device)  # the ranks may have had other seeds
            self.synced_group = group
        action = self.policy.act(obs)
        if group is not None:
            action = distributed.agree(action, self.policy, group, device)
        if isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < len(self.action_names):
            raise ValueError(f"The policy returned an invalid action: {action!r}")
        # commit
        apply_action(action)
        tracker.new_interval()
        self.observer.commit(signals)
        self.val = val
        self.val_fresh = []
        c["val_epoch"] = val_epoch
        self.record(
            {
                "decision": c["decisions"],
                "step": c["step"],
                "epoch": c["epoch"],
                "choice": self.action_names[action],
                "action": action,
                "observation": obs.tolist(),
                "reward": reward,
                "final": final,
                "signals": signals.as_dict(),
                "policy": dict(info or {}),
                **history_extra(),
            }
        )
        self.action = action
        c["decisions"] += 1
        c["interval_steps"], self.interval_cost = 0, 0.0
        c["skipped_total"] += summary["skipped"]
        c["last_decision_step"] = c["step"]
        self.prev_signals = signals
        return action

    def record(self, entry: dict[str, Any]) -> None:
        """Append to :attr:`history`, keeping the last ``history_size`` entries."""
        self.history.append(entry)
        if self.history_size is not None and len(self.history) > self.history_size:
            del self.history[: len(self.history) - self.history_size]

    # ------------------------------------------------------------- messages
    def nonfinite_error(self, run: int) -> NonFiniteError:
        return NonFiniteError(
            f"The loss or gradient was not finite for {run} consecutive steps (max_nonfinite_steps="
            f"{self.max_nonfinite_steps}); those steps were skipped and the parameters and optimizer state are "
            "as they were before them. Lower the learning rate or check the data, then go on: the count starts "
            "again, and steps are applied again once they are finite. Or raise max_nonfinite_steps."
        )

    def no_loss_message(self, steps: int) -> str:
        return (
            f"None of the last {steps} steps gave the optimizer its training loss (step() was called without "
            "a closure, or the closure returned no loss): the policy's loss features are missing and rewards "
            "built on the training loss see no change. Pass the loss: opt.step(lambda: loss) after "
            "loss.backward(), or a closure that computes it and returns it (or a tuple whose first element "
            "is the loss)"
        )

    def warn_once(self, key: str, message: str, category: type = UserWarning) -> None:
        if self.warned.get(key):
            return
        self.warned[key] = True
        warnings.warn(message, category, stacklevel=user_stacklevel())

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "action": self.action,
            "interval_cost": self.interval_cost,
            "val": dict(self.val),
            "val_fresh": list(self.val_fresh),
            "prev_signals": None if self.prev_signals is None else self.prev_signals.as_dict(),
            "history": [dict(h) for h in self.history],
            "observer": self.observer.state_dict(),
            "total_steps": self.total_steps,
            "total_epochs": self.total_epochs,
        }

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` (naming the key) unless :meth:`load_state_dict` can load ``state``."""
        keys = ("counts", "action", "interval_cost", "val", "val_fresh", "prev_signals", "history", "observer")
        if not isinstance(state, Mapping):
            raise ValueError(f"rlopt.controller must be a dict, got {type(state).__name__}")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"rlopt.controller lacks {missing}")
        counts = state["counts"]
        if not isinstance(counts, Mapping) or set(counts) != set(_COUNTERS):
            raise ValueError(f"rlopt.controller.counts must hold {sorted(_COUNTERS)}")
        for key, value in counts.items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (-1 if key == "last_decision_step" else 0)
            ):
                raise ValueError(f"Invalid rlopt.controller.counts[{key!r}]: {value!r}")
        action = state["action"]
        if action is not None and (
            isinstance(action, bool) or not isinstance(action, int) or not 0 <= action < len(self.action_names)
        ):
            raise ValueError(
                f"Invalid rlopt.controller.action: {action!r} (this optimizer has {len(self.action_names)} actions)"
            )
        if (action is None) != (counts["decisions"] == 0):
            raise ValueError("rlopt.controller.action and counts['decisions'] disagree")
        if not isinstance(state["interval_cost"], (int, float)) or not math.isfinite(state["interval_cost"]):
            raise ValueError(f"Invalid rlopt.controller.interval_cost: {state['interval_cost']!r}")
        if not isinstance(state["val"], Mapping) or not set(state["val"]) <= {"val_loss", "val_acc"}:
            raise ValueError("rlopt.controller.val must be a dict of val_loss / val_acc")
        if not isinstance(state["val_fresh"], (list, tuple)):
            raise ValueError("rlopt.controller.val_fresh must be a list")
        if state["prev_signals"] is not None:
            Signals.from_dict(state["prev_signals"])
        if not isinstance(state["history"], (list, tuple)) or not all(isinstance(h, Mapping) for h in state["history"]):
            raise ValueError("rlopt.controller.history must be a list of dicts")
        self.observer.check_state(state["observer"])

    def load_state_dict(self, state: Mapping[str, Any], *, extend_budget: bool = False) -> None:
        self.check_state(state)
        self.counts = dict(state["counts"])
        self.action = state["action"]
        self.interval_cost = float(state["interval_cost"])
        self.val = {k: float(v) for k, v in state["val"].items()}
        self.val_fresh = list(state["val_fresh"])
        self.prev_signals = None if state["prev_signals"] is None else Signals.from_dict(state["prev_signals"])
        history = [dict(h) for h in state["history"]]
        if self.history_size is not None:
            history = history[-self.history_size :] if self.history_size else []
        self.history = history
        self.observer.load_state_dict(state["observer"])
        saved_budget = (state.get("total_steps"), state.get("total_epochs"))
        if saved_budget != (self.total_steps, self.total_epochs) and history and history[-1].get("final"):
            self.warn_once(
                "budget",
                f"The checkpoint's run already ended (budget total_steps={saved_budget[0]}, "
                f"total_epochs={saved_budget[1]}) and its final reward was paid; this optimizer's "
                f"budget (total_steps={self.total_steps}, total_epochs={self.total_epochs}) "
                "extends it, so a final reward is paid again at the new end. Save the checkpoint "
                "before the last epoch_end() of a run you mean to extend",
            )

    def snapshot(self) -> dict[str, Any]:
        """Everything a failed decision or load could change, to :meth:`restore` (cheap: the
        history list is copied, not its entries)."""
        return {
            "counts": dict(self.counts),
            "action": self.action,
            "interval_cost": self.interval_cost,
            "val": dict(self.val),
            "val_fresh": list(self.val_fresh),
            "prev_signals": self.prev_signals,
            "history": list(self.history),
            "observer": self.observer.state_dict(),
            "group": self.group,
            "synced_group": self.synced_group,
        }

    def restore(self, snap: Mapping[str, Any]) -> None:
        self.counts, self.action, self.interval_cost = dict(snap["counts"]), snap["action"], snap["interval_cost"]
        self.val, self.val_fresh, self.prev_signals = dict(snap["val"]), list(snap["val_fresh"]), snap["prev_signals"]
        self.history = list(snap["history"])
        self.observer.load_state_dict(snap["observer"])
        self.group, self.synced_group = snap["group"], snap["synced_group"]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        group = state["process_group"]
        if not (group is None or isinstance(group, str)):  # a ProcessGroup does not pickle, and "auto"
            if not distributed.outside(group):  # could widen a subgroup to every rank
                warnings.warn(
                    "A pickled rlopt optimizer does not keep its ProcessGroup: the copy decides alone "
                    "(process_group=None) until given one",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            state["process_group"] = None
        state["group"] = state["synced_group"] = None  # resolved again at the next decision
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.group = distributed.resolve_group(self.process_group)  # in step with the ranks at once

    def __deepcopy__(self, memo: dict[int, Any]) -> Controller:
        """A deep copy decides with the same ranks: the ProcessGroup is shared, not copied."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        shared = ("process_group", "group", "synced_group")
        new.__dict__.update({k: v if k in shared else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new
