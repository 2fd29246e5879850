"""ControlledOptimizer: a ``torch.optim.Optimizer`` whose inner optimizer, learning rate or weight
decay a policy controls. It composes the mechanics of :mod:`rlopt.control`:

* :class:`~rlopt.control.inner.InnerSet`: the inner torch optimizers, kept in step with this
  optimizer's ``param_groups`` (which are the user's: LR schedulers, ``zero_grad`` and
  GradScaler work on them);
* :mod:`~rlopt.control.guarded`: each step checked for non-finite values on the device;
* :class:`~rlopt.control.signals.SignalTracker`: the interval's signals, on the device;
* :class:`~rlopt.control.controller.Controller`: progress, budget and decisions.

Subclasses say what an action means, through these override points (and nothing else):

* :meth:`_apply_action` (required): apply action ``a``;
* :meth:`_default_reward` (required): the reward when the user gives none;
* :meth:`_active`: the inner optimizer that runs now (default: the first);
* :meth:`_factors`: multipliers of the learning rate and weight decay (default: none);
* :meth:`_extra_features` / :meth:`_history_extra`: the subclass's own observation features and
  history entries;
* :meth:`_extra_state` / :meth:`_check_extra_state` / :meth:`_load_extra_state`: its checkpoint.

Contracts: ordinary steps never synchronise with the device; the first decision is taken at the
first :meth:`step` (or :meth:`epoch_end`); an exception from :meth:`step`, :meth:`epoch_end` or
:meth:`load_state_dict` leaves the parameters, every inner optimizer, the policy, the tracker and
the history as they were (a policy that raises while it learns is the one exception).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch.optim import Optimizer

from ..rewards import RewardContext
from . import checkpoint, distributed, guarded
from .choices import ChoiceSpec
from .controller import Controller
from .inner import InnerSet
from .observation import ObservationBuilder, Signals, observation_layout
from .resolve import make_policy
from .signals import SignalTracker
from .torch_compat import hooks_silenced
from .validation import check_bool, check_count, check_group_hparams, check_lr, check_seed

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

    from ..policies import Policy

__all__ = ["ControlledOptimizer"]

# torch's keyword arguments for how an optimizer runs: accepted as torch accepts them
_TORCH_OPTIONS = ("maximize", "foreach", "fused", "capturable", "differentiable")


class ControlledOptimizer(Optimizer):
    """Base class; see the module doc. Subclasses define the actions and what they do."""

    kind = ""

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        specs: Sequence[ChoiceSpec],
        *,
        action_names: Sequence[str],
        costs: Sequence[float],
        policy: Any,
        interval: Union[str, int],
        seed: Any,
        total_steps: Any,
        total_epochs: Any,
        reward: Optional[Callable[[RewardContext], float]],
        max_nonfinite_steps: Any,
        signal_every: Any,
        train_policy: Optional[bool],
        extra_features: Sequence[str] = (),
        share_momentum: bool = True,
        process_group: Any = distributed.AUTO,
        history_size: Optional[int] = 1000,
    ):
        check_lr(defaults.get("lr"))
        if interval != "epoch":
            if isinstance(interval, (str, bool)) or not isinstance(interval, numbers.Integral):
                raise TypeError(f"interval must be 'epoch' or a positive int, got {interval!r}")
            interval = check_count(interval, "interval")
        total_steps = check_count(total_steps, "total_steps", allow_none=True)
        total_epochs = check_count(total_epochs, "total_epochs", allow_none=True)
        max_nonfinite_steps = check_count(max_nonfinite_steps, "max_nonfinite_steps", allow_none=True)
        history_size = check_count(history_size, "history_size", minimum=0, allow_none=True)
        seed = check_seed(seed)
        if reward is not None and not callable(reward):
            raise TypeError(f"reward must be callable, got {reward!r}")
        check_bool(share_momentum, "share_momentum")
        if train_policy is not None and not isinstance(train_policy, bool):
            raise TypeError(f"Invalid policy training mode: {train_policy!r} (train_policy must be a bool or None)")
        distributed.check_group_arg(process_group)
        signal_every = check_count(signal_every, "signal_every", allow_none=True)
        if signal_every is None:
            # a sample per interval, at most one per 100 steps: each costs a copy of the gradient
            signal_every = max(1, min(100, interval)) if isinstance(interval, int) else 100
        self._explicit: list[dict[str, Any]] = []  # keys each user group set itself
        self._lr_checked: set = set()  # choices whose learning rate was checked when they first ran
        self._epoch_end_check_at = 0  # the step count at which to look for a forgotten epoch_end() next
        super().__init__(params, defaults)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self.inner = InnerSet(specs, self.param_groups, self._explicit, self.defaults, share_momentum)
        self.tracker = SignalTracker(signal_every)
        action_names = tuple(action_names)
        observer = ObservationBuilder(action_names, tuple(extra_features))
        policy = make_policy(
            policy,
            action_names,
            observer.layout,
            seed,
            train_policy,
            layouts=lambda version: observation_layout(action_names, tuple(extra_features), version),
        )
        observer.version = policy.obs_layout["version"]  # a policy trained on an earlier layout gets it
        self.controller = Controller(
            action_names,
            policy,
            reward if reward is not None else self._default_reward(),
            observer,
            costs,
            interval=interval,
            total_steps=total_steps,
            total_epochs=total_epochs,
            max_nonfinite_steps=max_nonfinite_steps,
            history_size=history_size,
            process_group=process_group,
        )

    # ------------------------------------------------------------ override points
    def _default_reward(self) -> Callable[[RewardContext], float]:
        raise NotImplementedError

    def _apply_action(self, action: int) -> None:
        raise NotImplementedError

    def _active(self) -> int:
        """Index of the inner optimizer that runs now."""
        return 0

    def _factors(self) -> tuple[float, Optional[float]]:
        """Multipliers of the inner learning rate and weight decay (None: the group's own)."""
        return 1.0, None

    def _extra_features(self, signals: Signals) -> Sequence[float]:
        return ()

    def _history_extra(self) -> dict[str, Any]:
        return {}

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------ public state
    @property
    def policy(self) -> Policy:
        return self.controller.policy

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last ``history_size`` decisions, oldest first."""
        return self.controller.history

    @property
    def choice(self) -> Optional[str]:
        """Name of the action in effect (None before the first step)."""
        action = self.controller.action
        return None if action is None else self.controller.action_names[action]

    @property
    def action_names(self) -> tuple[str, ...]:
        return self.controller.action_names

    @property
    def observation_layout(self) -> dict[str, Any]:
        return self.controller.observer.layout

    @property
    def interval(self) -> Union[str, int]:
        return self.controller.interval

    @property
    def total_steps(self) -> Optional[int]:
        return self.controller.total_steps

    @property
    def total_epochs(self) -> Optional[int]:
        return self.controller.total_epochs

    @property
    def inner_optimizers(self) -> dict[str, Optimizer]:
        """The inner torch optimizers by choice name (read-only use: inspect their state). Their
        groups show the values the next step would use (a scheduler's last change included)."""
        factors = self._factors()
        for i in range(len(self.inner.specs)):
            self.inner.sync(i, *factors)
        return {s.name: o for s, o in zip(self.inner.specs, self.inner.optimizers)}

    @property
    def steps_taken(self) -> int:
        return self.controller.counts["step"]

    # ------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        check_group_hparams(param_group)
        explicit = {k: v for k, v in param_group.items() if k != "params"}
        super().add_param_group(param_group)
        self._explicit.append(explicit)
        if "inner" in self.__dict__:  # a group added after construction reaches every inner optimizer
            self.inner.add_group(len(self.param_groups) - 1)
            self._params = [p for g in self.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ steps
    #: ``torch.amp.GradScaler.step`` calls :meth:`step` at every step, giving the scale of the
    #: gradients (``grad_scale``, None once unscaled) and its own overflow flag (``found_inf``)
    #: as attributes: the wrapper unscales on the device and skips an overflowed step as any
    #: non-finite one (counted, no host sync).
    _step_supports_amp_scaling = True

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One optimisation step with the inner optimizer in use; returns what the closure returned.

        The closure clears the gradients, computes the loss, calls ``backward()`` and returns the
        loss, or a tuple whose first element is the loss (``(loss, outputs)``). It is required when
        a choice needs one (SAM), from the first step on, whichever choice runs.
        """
        inner, ctl = self.inner, self.controller
        if closure is None and inner.needs_closure:
            names = [s.name for s in inner.specs if s.needs_closure]
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure because choices {names} evaluate the gradient "
                "twice; call step(closure) where the closure clears the gradients, computes the loss, calls "
                "backward() and returns the loss"
            )
        if ctl.action is not None:
            return self._step(closure)
        undo = ctl.snapshot(), copy.deepcopy(ctl.policy.state_dict())
        self._decide(final=False)  # the first decision
        try:
            return self._step(closure)
        except BaseException:  # a first step that fails takes its first decision back too
            ctl.restore(undo[0])
            ctl.policy.load_state_dict(undo[1])
            raise

    def _step(self, closure: Optional[Callable[[], Any]]) -> Any:
        inner, ctl = self.inner, self.controller
        if ctl.interval == "epoch" and ctl.counts["step"] >= self._epoch_end_check_at:
            self._check_epoch_end_calls()
        i = self._active()
        inner.sync(i, *self._factors())
        if i not in self._lr_checked:
            self._lr_checked.add(i)
            self._warn_implausible_lr(i)
        out = None
        if closure is not None:
            if torch.is_grad_enabled():
                out = closure()
            else:
                with torch.enable_grad():
                    out = closure()
        tracker = self.tracker
        with torch.no_grad():
            in_group = self._in_group()
            flag, grads = guarded.prepare(
                inner,
                i,
                self._params,
                tracker,
                closure,
                _loss_of(out),
                loss_skips=not in_group,
                grad_scale=self.__dict__.get("grad_scale"),
                scaler_inf=self.__dict__.get("found_inf"),
            )
            if ctl.max_nonfinite_steps is not None and not in_group:  # ranks: checked at decisions
                run = tracker.poll_skip_run(current=flag)
                if run is not None and run >= ctl.max_nonfinite_steps:
                    tracker.cancel()
                    tracker.reset_run()
                    raise ctl.nonfinite_error(run)
            cost = inner.specs[i].cost
            final = ctl.count_step(cost)
            if final is None:
                try:
                    guarded.apply(inner, i, flag, grads)
                except BaseException:
                    ctl.uncount_step(cost)
                    tracker.cancel()
                    raise
                tracker.end()
                return out
            snap = tracker.snapshot()  # the step that ends an interval: decide before its update
            flag = flag.clone()  # a view of the tracker's window, which the decision's read folds and resets
            ctl_snap = ctl.snapshot()
            tracker.end()
            try:
                self._decide(final=final)
                guarded.apply(inner, i, flag, grads)
            except BaseException:  # (a policy that already learned from the decision keeps what it learned)
                tracker.restore(snap)
                tracker.cancel()
                ctl.restore(ctl_snap)
                ctl.uncount_step(cost)  # (the snapshot was taken with this step counted)
                raise
        return out

    def _warn_implausible_lr(self, i: int) -> None:
        """One warning when choice ``i`` is about to run at a learning rate far outside what its
        family trains with (e.g. an lr carried over from another optimizer, as Adadelta's 1.0)."""
        spec, group = self.inner.specs[i], self.inner.optimizers[i].param_groups[0]
        lr, momentum = float(group["lr"]), float(group.get("momentum", 0.0) or 0.0)
        sgd_like = spec.family in ("sgd", "sam")
        if (sgd_like and momentum >= 0.5 and lr >= 1.0) or (spec.family in ("adam", "adamw") and lr >= 0.1):
            usual = "0.01-0.5 with momentum" if sgd_like else "1e-4-1e-2"
            self.controller.warn_once(
                "lr",
                f"Choice '{spec.name}' runs at lr={lr:g}"
                + (f" with momentum {momentum:g}" if sgd_like else "")
                + f": {spec.family} usually trains at {usual}. An lr carried over from another optimizer (as "
                "Adadelta's 1.0) is rarely right here; Adam and AdamW run at lr * 0.01 unless their choice sets "
                "lr or lr_scale",
            )

    def _check_epoch_end_calls(self) -> None:
        """Warn once when ``interval="epoch"`` and no :meth:`epoch_end` came for far longer than
        an epoch could last."""
        ctl = self.controller
        if ctl.interval != "epoch" or ctl.warned.get("epoch_end"):
            return
        c = ctl.counts
        since = c["step"] - c["epoch_start_step"]
        limit = 10 * c["steps_per_epoch"] if c["epoch"] > 0 and c["steps_per_epoch"] > 0 else 10_000
        self._epoch_end_check_at = c["epoch_start_step"] + limit if since < limit else 0
        if since >= limit:
            ctl.warn_once(
                "epoch_end",
                f"{type(self).__name__} decides at each epoch_end() (interval='epoch'), "
                f"but none came in the last {since} steps: call opt.epoch_end(val_loss=..., "
                "val_acc=...) after each epoch, or give interval=N to decide every N steps",
            )

    def _in_group(self) -> bool:
        return self.controller.group is not None and torch.distributed.is_initialized()

    def _decide(self, final: bool) -> None:
        ctl = self.controller
        device = self._params[0].device if self._params else torch.device("cpu")
        lr = self.param_groups[0]["lr"] if self.param_groups else math.nan
        ctl.decide(
            self.tracker,
            final=final,
            extra_features=self._extra_features,
            apply_action=self._apply_action,
            history_extra=self._history_extra,
            device=device,
            lr=float(lr),
        )

    def baseline(self, val_loss: Optional[float] = None, val_acc: Optional[float] = None) -> None:
        """Give the validation metrics measured before training (before the first step), so that
        the first interval's reward pays for the progress from there, as later ones do. Not an
        epoch: nothing is counted and no decision is taken."""
        if self.controller.counts["step"] or self.controller.action is not None:
            raise RuntimeError("baseline() gives the metrics before training: call it before the first step()")
        self.controller.val.update(_metrics(val_loss, val_acc))

    def epoch_end(self, val_loss: Optional[float] = None, val_acc: Optional[float] = None) -> Optional[str]:
        """Mark the end of an epoch and give the validation metrics (``val_acc`` as a fraction).

        With ``interval="epoch"`` this is the decision point. Works under ``torch.no_grad()`` and
        ``torch.inference_mode()``. Returns the choice now in use.
        """
        val = _metrics(val_loss, val_acc)
        self._epoch_end_check_at = 0  # the epoch's length changes the limit: recomputed at the next step
        ctl = self.controller
        snap, tracker_snap = ctl.snapshot(), self.tracker.snapshot()
        try:
            if ctl.action is None:
                self._decide(final=False)
            final = ctl.end_epoch(val)
            if final is not None:
                self._decide(final=final)
        except BaseException:
            ctl.restore(snap)
            self.tracker.restore(tracker_snap)
            raise
        return self.choice

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit for bit: the wrapper's groups, every inner optimizer's
        state, the policy (networks, optimizer, buffers, counters, RNG), the signal tracker, the
        controller and the history. Loadable with ``torch.load(weights_only=True)``. State-dict
        hooks run around all of it, so a post-hook sees the ``"rlopt"`` entry too."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        with hooks_silenced(self):
            sd = super().state_dict()
        specs = self.inner.specs
        policy = self.controller.policy
        sd["rlopt"] = {
            "format": checkpoint.FORMAT,
            "version": checkpoint.VERSION,
            "kind": self.kind,
            "actions": list(self.action_names),
            "choices": [s.name for s in specs],
            "families": [s.family for s in specs],
            "share_momentum": self.inner.share_momentum,
            "inner": self.inner.state_dict(),
            "policy": {**policy.describe(), "state": policy.state_dict()},
            "tracker": self.tracker.state_dict(),
            "controller": self.controller.state_dict(),
            "extra": self._extra_state(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. Everything is checked first; on any problem a ``ValueError``
        names the bad entry and this optimizer is left exactly as it was. Load hooks run around all
        of it."""
        if isinstance(state_dict, dict) and self._optimizer_load_state_dict_pre_hooks:
            state_dict = state_dict.copy()
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
        rl = checkpoint.check(self, state_dict)
        with hooks_silenced(self):
            checkpoint.load(self, state_dict, rl)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """The whole object, each component by its own pickling rules; torch's hooks (callables
        that may not pickle) are left out, as torch's optimizers leave them out."""
        return {k: v for k, v in self.__dict__.items() if not (k.startswith("_optimizer_") and k.endswith("_hooks"))}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(actions={list(self.action_names)}, choice={self.choice!r}, "
            f"interval={self.interval!r}, policy={self.policy!r})"
        )


def _metrics(val_loss: Any, val_acc: Any) -> dict[str, float]:
    """Validation metrics as host floats, checked (``val_acc`` a fraction)."""
    val = {}
    for name, value in (("val_loss", val_loss), ("val_acc", val_acc)):
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
        val[name] = float(value)
    if "val_acc" in val and not 0.0 <= val["val_acc"] <= 1.0:
        raise ValueError(f"val_acc must be a fraction in [0, 1], got {val['val_acc']}")
    if "val_loss" in val and math.isnan(val["val_loss"]):
        raise ValueError("val_loss is NaN")
    return val


def _loss_of(out: Any) -> Any:
    """The loss in what a closure returned: itself, or the first element of a tuple or list
    (``(loss, outputs)``)."""
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out
