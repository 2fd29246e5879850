"""Mechanics shared by the rlopt optimizers: inner optimizers, guarded steps, decision points,
policies, rewards, history and checkpoints.

An :class:`RLControlledOptimizer` is a ``torch.optim.Optimizer`` whose ``param_groups`` are the
user's (so LR schedulers, ``zero_grad`` and GradScaler's unscaling work on it) and which runs one
of several inner torch optimizers, each with its own group dicts. At every decision point it

1. reads the interval's training signals back from the device (the only host sync),
2. builds an observation (:mod:`rlopt.features`), pays the policy the reward of the interval
   that just ended (:mod:`rlopt.rewards`), and asks it for an action,
3. applies the action (subclasses: :meth:`_apply_action`).

Ordinary steps never synchronise with the device. A step whose loss or gradient is not finite
does not reach the parameters: fused torch optimizers skip it on the device (``found_inf``,
the mechanism GradScaler uses); where fused kernels are unavailable the check runs on the host.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.optim import Optimizer

from . import distributed
from .choices import ChoiceSpec
from .features import ObservationBuilder, SignalTracker, Signals
from .policies import (ConstantConfig, DQNConfig, Policy, PPOConfig, RandomConfig, load_policy,
                       policy_class)
from .rewards import RewardContext

__all__ = ["RLControlledOptimizer", "make_policy"]

STATE_FORMAT = "rlopt.optimizer/1"
_CONFIGS = {DQNConfig: "dqn", PPOConfig: "ppo", RandomConfig: "random", ConstantConfig: "constant"}


def make_policy(spec: Any, action_names: Sequence[str], obs_layout: Dict[str, Any], seed: int,
                train: Optional[bool] = None) -> Policy:
    """Resolve the ``policy=`` argument: a name, a config, a :class:`Policy`, a checkpoint path
    or a pretrained policy's name; check that it fits the action set and observation layout."""
    action_names = tuple(action_names)
    obs_dim = len(obs_layout["names"])
    policy: Policy
    if isinstance(spec, Policy):
        policy = spec
    elif type(spec) in _CONFIGS:
        policy = policy_class(_CONFIGS[type(spec)])(obs_dim, action_names, spec, seed=seed, obs_layout=obs_layout)
    elif isinstance(spec, (str, os.PathLike)):
        name = os.fspath(spec)
        if name in ("dqn", "ppo", "random"):
            policy = policy_class(name)(obs_dim, action_names, seed=seed, obs_layout=obs_layout)
        elif name.startswith("constant:"):
            policy = policy_class("constant")(obs_dim, action_names, ConstantConfig(name.split(":", 1)[1]),
                                              seed=seed, obs_layout=obs_layout)
        elif os.path.isfile(name):
            policy = load_policy(name)
        else:
            from .registry import list_policies, load_pretrained

            if name not in list_policies():
                raise ValueError(
                    f"Unknown policy '{name}': expected 'ppo', 'dqn', 'random', 'constant:<choice>', "
                    f"a pretrained name {sorted(list_policies())}, a checkpoint path, a Policy or a config"
                )
            policy = load_pretrained(name)
    else:
        raise TypeError(f"Invalid policy: {spec!r}")
    check_policy(policy, action_names, obs_layout)
    if train is not None:
        policy.train(train)
    return policy


def check_policy(policy: Policy, action_names: Tuple[str, ...], obs_layout: Dict[str, Any]) -> None:
    if tuple(policy.action_names) != tuple(action_names):
        raise ValueError(
            f"The policy's action set {list(policy.action_names)} does not match this optimizer's "
            f"{list(action_names)}"
        )
    if policy.obs_dim != len(obs_layout["names"]):
        raise ValueError(
            f"The policy expects {policy.obs_dim} observation features, this optimizer makes "
            f"{len(obs_layout['names'])} (layout version {obs_layout['version']})"
        )
    if policy.obs_layout is None:
        policy.obs_layout = dict(obs_layout)
    elif (policy.obs_layout.get("version") != obs_layout["version"]
          or list(policy.obs_layout.get("names", [])) != list(obs_layout["names"])):
        raise ValueError(
            f"The policy was trained on observation layout version {policy.obs_layout.get('version')} "
            f"{policy.obs_layout.get('names')}, this optimizer makes version {obs_layout['version']} "
            f"{obs_layout['names']}"
        )


#: group keys that say how an optimizer runs on this machine, not what it has learnt
_KERNEL_KEYS = ("fused", "foreach", "capturable")


def _with_own_kernels(sd: Dict[str, Any], inner: Optimizer) -> Dict[str, Any]:
    """``sd`` with ``inner``'s own kernel choice (fused, foreach, capturable) in every group.

    A checkpoint saved where a choice ran unfused (another device, ``fused=False``) would
    otherwise switch the inner optimizer's kernel under the wrapper, which decides once at
    construction how each choice steps. torch places loaded state by these flags, so they are
    set before the load, not after."""
    groups = [{**saved, **{k: own[k] for k in _KERNEL_KEYS if k in own}}
              for saved, own in zip(sd["param_groups"], inner.param_groups)]
    return {**sd, "param_groups": groups}


_HOOK_DICTS = ("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


class _hooks_off:
    """Inside: torch's ``Optimizer.state_dict`` / ``load_state_dict`` run none of the user's
    state-dict hooks (the wrapper runs them around its whole state instead)."""

    def __init__(self, opt: Optimizer):
        self.opt, self.saved = opt, {}

    def __enter__(self):
        for name in _HOOK_DICTS:
            self.saved[name] = self.opt.__dict__.get(name)
            if self.saved[name] is not None:
                setattr(self.opt, name, type(self.saved[name])())
        return self

    def __exit__(self, *exc):
        for name, hooks in self.saved.items():
            if hooks is not None:
                setattr(self.opt, name, hooks)
        return False


def _user_stacklevel() -> int:
    """``stacklevel`` for a warning raised inside rlopt that points at the caller's own line
    (past rlopt's and torch's frames, however the call arrived)."""
    import sys

    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def _inner_step(opt: Optimizer) -> None:
    """``opt.step()`` without torch's per-call wrapper (a profiler range and the step hooks).

    The wrapper's own ``step`` already has them, so one user step is one ``Optimizer.step``
    profiler range and one call of each global step hook, not one per optimizer, and the host
    does less work per step. Falls back to ``opt.step()`` where torch did not wrap ``step``.
    """
    step = type(opt).step
    raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if raw is None or "step" in opt.__dict__ or getattr(opt, "_optimizer_step_pre_hooks", None) or \
            getattr(opt, "_optimizer_step_post_hooks", None):  # patched or hooked: the full call
        opt.step()
    else:
        raw(opt)


def _check_lr(lr: Any) -> None:
    if isinstance(lr, torch.Tensor) or not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise TypeError(f"Invalid learning rate: {lr!r} (expected a float)")
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr}")


class RLControlledOptimizer(Optimizer):
    """Base class; see the module doc. Subclasses define the actions and how they apply."""

    kind = ""
    _PICKLED = ("_specs", "_inner", "_explicit", "_fused", "_params", "_needs_closure", "policy",
                "reward_fn", "tracker", "observer", "interval", "total_steps", "total_epochs",
                "max_nonfinite_steps", "history", "_ctl", "_prev_signals", "_val", "_action_names",
                "share_momentum")

    def __init__(self, params, defaults: Dict[str, Any], specs: Sequence[ChoiceSpec], *,
                 action_names: Sequence[str], policy: Any, interval: Union[str, int], seed: int,
                 total_steps: Optional[int], total_epochs: Optional[int],
                 reward: Optional[Callable[[RewardContext], float]], max_nonfinite_steps: Optional[int],
                 signal_every: Optional[int], train_policy: Optional[bool], extra_features: Sequence[str] = (),
                 share_momentum: bool = True, process_group: Any = distributed.AUTO):
        _check_lr(defaults.get("lr"))
        if interval != "epoch" and not (isinstance(interval, int) and not isinstance(interval, bool)):
            raise TypeError(f"interval must be 'epoch' or a positive int, got {interval!r}")
        if isinstance(interval, int) and interval < 1:
            raise ValueError(f"Invalid interval: {interval}")
        for name, value in (("total_steps", total_steps), ("total_epochs", total_epochs),
                            ("max_nonfinite_steps", max_nonfinite_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Invalid {name}: {value}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not -2 ** 63 <= seed < 2 ** 64:  # what torch.Generator.manual_seed takes
            raise ValueError(f"Invalid seed: {seed} (torch seeds are 64-bit)")
        if reward is not None and not callable(reward):
            raise TypeError(f"reward must be callable, got {reward!r}")
        if not isinstance(share_momentum, bool):
            raise TypeError(f"share_momentum must be a bool, got {share_momentum!r}")
        if train_policy is not None and not isinstance(train_policy, bool):
            raise TypeError(f"Invalid policy training mode: {train_policy!r} (train_policy must be a bool "
                            "or None)")
        distributed.check_group_arg(process_group)
        self._explicit: List[Dict[str, Any]] = []  # keys each user group set itself
        super().__init__(params, defaults)
        self._specs: Tuple[ChoiceSpec, ...] = tuple(specs)
        self._params = [p for g in self.param_groups for p in g["params"]]
        self._inner: List[Optimizer] = []
        self._fused: List[bool] = []
        for spec in self._specs:
            inner, fused = self._build_inner(spec)
            self._inner.append(inner)
            self._fused.append(fused)
        self.share_momentum = share_momentum
        self._link_momentum()
        self._needs_closure = any(s.needs_closure for s in self._specs)
        self._action_names = tuple(action_names)
        self.interval = interval
        self.total_steps, self.total_epochs = total_steps, total_epochs
        self.max_nonfinite_steps = max_nonfinite_steps
        if signal_every is None:
            signal_every = max(1, min(10, interval // 2)) if isinstance(interval, int) else 10
        self.tracker = SignalTracker(signal_every)
        self.observer = ObservationBuilder(self._action_names, tuple(extra_features))
        self.policy = make_policy(policy, self._action_names, self.observer.layout, seed, train_policy)
        self.reward_fn = reward if reward is not None else self._default_reward()
        self.history: List[Dict[str, Any]] = []
        self._ctl: Dict[str, Any] = dict(step=0, epoch=0, interval_steps=0, interval_cost=0.0, decisions=0,
                                         action=None, epoch_start_step=0, steps_per_epoch=0,
                                         last_decision_step=-1, skipped_total=0)
        self._prev_signals: Optional[Signals] = None
        self._val: Dict[str, float] = {}
        self._process_group = process_group
        self._group = None  # the group resolved at the last decision (None: this rank decides alone)
        self._synced_group = None  # the group this rank's policy was last made equal over
        self._decide()

    # ----------------------------------------------------------------- hooks
    def _default_reward(self) -> Callable[[RewardContext], float]:
        raise NotImplementedError

    def _apply_action(self, action: int) -> None:
        raise NotImplementedError

    def _active(self) -> int:
        """Index of the inner optimizer that runs now."""
        return 0

    def _sync_group(self, spec: ChoiceSpec, group: Dict[str, Any], inner_group: Dict[str, Any]) -> None:
        """Carry the wrapper group's values to the inner group that steps next: ``lr`` (times the
        choice's scale) and every hyper-parameter the choice takes from the wrapper group, so a
        scheduler or a hand edit of ``param_groups`` (weight decay, momentum, betas...) reaches it."""
        inner_group["lr"] = group["lr"] * spec.lr_scale
        for key in self._followed(spec, group):
            value = group[key]
            if value is not None:  # weight_decay=None: the family's own default stays
                inner_group[key] = value

    def _followed(self, spec: ChoiceSpec, group: Dict[str, Any]) -> Tuple[str, ...]:
        """The hyper-parameters ``spec``'s inner group takes from wrapper group ``group``, by the
        precedence of :mod:`rlopt.choices`: a key the user set in that group, ``momentum`` for the
        families that follow it and ``weight_decay``, unless the choice pins its own."""
        cache = self.__dict__.setdefault("_follow_cache", {})
        keys = cache.get((spec.name, id(group)))
        if keys is None:
            index = next(i for i, g in enumerate(self.param_groups) if g is group)
            explicit = self._explicit[index] if index < len(self._explicit) else {}
            hp = spec.kind.defaults
            wanted = {k for k in explicit if k in hp and k != "lr"}
            if spec.kind.follows_momentum and not spec.pins_momentum:
                wanted.add("momentum")
            if "weight_decay" in hp and "weight_decay" not in spec.hparams:
                wanted.add("weight_decay")
            keys = cache[(spec.name, id(group))] = tuple(sorted(k for k in wanted if k in group))
        return keys

    def _extra_features(self, signals: Signals) -> Sequence[float]:
        return ()

    def _history_extra(self) -> Dict[str, Any]:
        return {}

    # --------------------------------------------------------- inner optimizers
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        if "lr" in param_group:
            _check_lr(param_group["lr"])
        explicit = {k: v for k, v in param_group.items() if k != "params"}
        self.__dict__.pop("_follow_cache", None)
        super().add_param_group(param_group)
        self._explicit.append(explicit)
        if "_inner" in self.__dict__:  # a group added after construction reaches every inner optimizer
            group = self.param_groups[-1]
            for spec, inner in zip(self._specs, self._inner):
                inner.add_param_group(spec.inner_group(group, explicit, self.defaults))
                self._prepare_state(spec, inner)
            self._params = [p for g in self.param_groups for p in g["params"]]

    def _build_inner(self, spec: ChoiceSpec) -> Tuple[Optimizer, bool]:
        groups = [spec.inner_group(g, e, self.defaults) for g, e in zip(self.param_groups, self._explicit)]
        cls = spec.kind.optimizer
        extra = {"base_optimizer": torch.optim.SGD} if cls.__name__ == "SAM" else {}
        wants_fused = spec.options.get("fused", None)
        fused = False
        if wants_fused and not spec.kind.fused_found_inf:
            raise ValueError(f"Choice '{spec.name}': rlopt does not run family '{spec.family}' fused (its fused "
                             "step is not known to skip on found_inf)")
        if wants_fused is not False and spec.kind.fused_found_inf and not spec.options.get("foreach"):
            try:
                inner = cls(groups, fused=True, **extra)
                fused = True
            except (RuntimeError, ValueError, TypeError):
                if wants_fused:
                    raise
                groups = [spec.inner_group(g, e, self.defaults) for g, e in zip(self.param_groups, self._explicit)]
        if not fused:
            inner = cls(groups, **spec.options, **extra)
            warnings.warn(
                f"Choice '{spec.name}' runs without fused kernels here: non-finite steps are detected "
                "with a host synchronisation at every step", RuntimeWarning, stacklevel=4)
        self._prepare_state(spec, inner)
        return inner, fused

    def _momentum_family(self) -> List[int]:
        """Indices of the choices whose update is an SGD step (``sgd``, and ``sam`` over SGD)."""
        return [i for i, o in enumerate(self._inner)
                if isinstance(getattr(o, "base_optimizer", o), torch.optim.SGD)]

    def _link_momentum(self) -> None:
        """With ``share_momentum``, the SGD-family choices use one state (one momentum buffer per
        parameter): a switch between SGD and SAM carries the velocity on, as a SAM-last schedule
        does, instead of resuming the other choice's stale buffer or a zero one."""
        family = self._momentum_family()
        if not self.share_momentum or len(family) < 2:
            return
        first = self._inner[family[0]]
        shared = getattr(first, "base_optimizer", first).state
        for i in family[1:]:
            inner = self._inner[i]
            getattr(inner, "base_optimizer", inner).state = shared

    @staticmethod
    def _prepare_state(spec: ChoiceSpec, inner: Optimizer) -> None:
        """Zero momentum buffers up front for SGD-like inner optimizers.

        torch's first momentum step sets ``buf = grad``; with zero buffers ``buf = 0.9 * 0 + grad``
        is the same number. A fused step skipped on the device (non-finite gradient) would
        otherwise leave an uninitialised buffer behind.
        """
        target = getattr(inner, "base_optimizer", inner)
        if not isinstance(target, torch.optim.SGD):
            return
        for group in target.param_groups:
            if group.get("dampening", 0) != 0:
                continue
            for p in group["params"]:
                if not p.requires_grad:  # frozen: never stepped, needs no buffer
                    continue
                state = target.state[p]
                if "momentum_buffer" not in state or state["momentum_buffer"] is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @property
    def inner_optimizers(self) -> Dict[str, Optimizer]:
        """The inner torch optimizers by choice name (read-only use: inspect their state)."""
        return {s.name: o for s, o in zip(self._specs, self._inner)}

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable[[], Any]] = None):
        """One optimisation step with the inner optimizer in use; returns the closure's loss.

        The closure clears the gradients, computes the loss, calls ``backward()`` and returns
        the loss (torch's convention). It is required when a choice needs one (SAM), from the
        first step on, whichever choice runs.
        """
        if closure is None and self._needs_closure:
            names = [s.name for s in self._specs if s.needs_closure]
            raise RuntimeError(
                f"{type(self).__name__}.step() needs a closure because choices {names} evaluate the "
                "gradient twice; call step(closure) where the closure clears the gradients, computes "
                "the loss, calls backward() and returns the loss"
            )
        i = self._active()
        spec, inner = self._specs[i], self._inner[i]
        for group, inner_group in zip(self.param_groups, inner.param_groups):
            self._sync_group(spec, group, inner_group)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._guarded_step(i, closure, loss, self.__dict__.get("grad_scale"), self.__dict__.get("found_inf"))
        self._after_step(spec.cost)
        return loss

    #: ``torch.amp.GradScaler.step`` calls :meth:`step` at every step, giving the scale of the
    #: gradients (``grad_scale``, None once unscaled) and its own overflow flag (``found_inf``)
    #: as attributes: the wrapper unscales on the device and skips an overflowed step as any
    #: non-finite one (counted, no host sync), instead of the scaler reading the flag on the host
    #: and not calling ``step()`` at all.
    _step_supports_amp_scaling = True

    def _grads(self) -> Tuple[List[torch.Tensor], torch.device]:
        grads = [p.grad for p in self._params if p.grad is not None]
        device = grads[0].device if grads else self._params[0].device
        return grads, device

    def _in_group(self) -> bool:
        """Whether this rank takes its decisions with others (resolved at the last decision)."""
        return self.__dict__.get("_group") is not None and torch.distributed.is_initialized()

    def _collective_device(self, group) -> torch.device:
        return distributed.collective_device(group, self._params[0].device if self._params else torch.device("cpu"))

    def _guarded_step(self, i: int, closure, loss, grad_scale=None, scaler_inf=None) -> None:
        spec, inner, fused = self._specs[i], self._inner[i], self._fused[i]
        grads, device = self._grads()
        tracker = self.tracker
        try:
            # device flag: 1 skips the step. Data-parallel ranks judge by the gradients alone, equal
            # on every rank, so that they skip the same steps (a rank's own loss still is not averaged)
            inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
            bad = tracker.begin(grads, loss, device, loss_skips=not self._in_group(), inv_scale=inv_scale,
                                found_inf=scaler_inf)
            tracker.probe(self._params, bad)
            target = inner
            if spec.needs_closure:  # SAM: ascend, evaluate again, come back
                inner.first_step(zero_grad=True, found_inf=bad)
                try:
                    with torch.enable_grad():
                        closure()
                finally:
                    inner.restore()
                tracker.check(self._grads()[0], bad)  # a non-finite second gradient skips the step too
                target = inner.base_optimizer
            if fused:
                target.found_inf = bad
                try:
                    _inner_step(target)
                finally:  # None, as torch reads it (getattr(opt, "found_inf", None)); a delattr
                    target.found_inf = None  # breaks torch.compile(opt.step)
            elif not bool(bad):  # host check: only where no fused kernel exists
                _inner_step(target)
        except BaseException:
            tracker.cancel()  # the step did not happen: it is not counted
            raise
        tracker.end()

    def _after_step(self, cost: float) -> None:
        ctl = self._ctl
        ctl["step"] += 1
        ctl["interval_steps"] += 1
        ctl["interval_cost"] += cost
        if self.max_nonfinite_steps is not None and not self._in_group():  # ranks: at decisions
            run = self.tracker.poll_skip_run()
            if run is not None and run >= self.max_nonfinite_steps:
                self._raise_nonfinite(run)
        if isinstance(self.interval, int):
            last = self._last_budget_step()
            if last and self.total_epochs is not None:
                return  # epoch_end follows: it makes the final decision, paid on the final validation
            if ctl["interval_steps"] >= self.interval:
                self._decide(final=self._progress() >= 1.0)
            elif last:
                self._decide(final=True)  # the budget ends between two decision points

    def _last_budget_step(self) -> bool:
        ctl = self._ctl
        if self.total_steps is not None:
            return ctl["step"] == self.total_steps
        return (self.total_epochs is not None and ctl["epoch"] == self.total_epochs - 1
                and self._progress() >= 1.0)

    def _warn_no_loss(self, steps: int) -> None:
        """Once per optimizer: steps were taken but none gave its loss (no closure)."""
        if self.__dict__.get("_warned_no_loss"):
            return
        self._warned_no_loss = True
        sam = [s.name for s in self._specs if s.needs_closure]
        warnings.warn(
            f"None of the last {steps} steps gave {type(self).__name__} its training loss (step() was called "
            "without a closure, or the closure returned no number or tensor): the policy's loss features "
            "are missing and rewards built on the training loss see no change. Pass the loss: "
            + ("a closure that computes it (choices " + str(sam) + " need one)" if sam else
               "opt.step(lambda: loss) after loss.backward(), or a closure that computes it"),
            UserWarning, stacklevel=_user_stacklevel())

    def _raise_nonfinite(self, run: int) -> None:
        raise RuntimeError(
            f"The loss or gradient was not finite for {run} consecutive steps (max_nonfinite_steps="
            f"{self.max_nonfinite_steps}); those steps were skipped and the parameters and optimizer "
            "state are as they were before them. Lower the learning rate, check the data, or raise "
            "max_nonfinite_steps."
        )

    # ------------------------------------------------------------- decisions
    def epoch_end(self, val_loss: Optional[float] = None, val_acc: Optional[float] = None) -> str:
        """Mark the end of an epoch and give the validation metrics (``val_acc`` as a fraction).

        With ``interval="epoch"`` this is the decision point. Returns the choice now in use.
        """
        val = {}
        for name, value in (("val_loss", val_loss), ("val_acc", val_acc)):
            if value is None:
                continue
            if isinstance(value, torch.Tensor):
                value = value.item()
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be a number, got {value!r}") from None
            val[name] = value
        if "val_acc" in val and not 0.0 <= val["val_acc"] <= 1.0:
            raise ValueError(f"val_acc must be a fraction in [0, 1], got {val['val_acc']}")
        if "val_loss" in val and math.isnan(val["val_loss"]):
            raise ValueError("val_loss is NaN")
        self._val.update(val)
        ctl = self._ctl
        ctl["val_fresh"] = ctl.get("val_fresh", False) or bool(val)
        ctl["val_fresh_keys"] = sorted(set(ctl.get("val_fresh_keys", ())) | set(val))
        ctl["epoch"] += 1
        if val:
            ctl["val_epoch"] = ctl["epoch"]
        ctl["steps_per_epoch"] = ctl["step"] - ctl["epoch_start_step"]
        ctl["epoch_start_step"] = ctl["step"]
        final = (self.total_epochs is not None and ctl["epoch"] == self.total_epochs) or self._progress() >= 1.0
        if self.interval == "epoch" or (final and ctl["last_decision_step"] != ctl["step"]):
            self._decide(final=final)
        return self.choice

    def _progress(self) -> float:
        ctl = self._ctl
        if self.total_steps is not None:
            return min(1.0, ctl["step"] / self.total_steps)
        if self.total_epochs is not None:
            if self.interval != "epoch" and ctl["steps_per_epoch"] > 0:
                done = ctl["epoch"] + (ctl["step"] - ctl["epoch_start_step"]) / ctl["steps_per_epoch"]
                return min(1.0, done / self.total_epochs)
            return min(1.0, ctl["epoch"] / self.total_epochs)
        return math.nan

    def _budget_share(self, steps: int) -> float:
        """The share of the whole budget that ``steps`` steps of this interval were (NaN: unknown)."""
        ctl = self._ctl
        if self.total_steps is not None:
            return steps / self.total_steps
        if self.total_epochs is not None:
            if self.interval == "epoch":
                return 1.0 / self.total_epochs if steps else 0.0
            if ctl["steps_per_epoch"] > 0:
                return steps / (ctl["steps_per_epoch"] * self.total_epochs)
        return math.nan

    def _decide(self, final: bool = False) -> None:
        ctl = self._ctl
        summary = self.tracker.summary()
        val_fresh, val_epoch = bool(ctl.get("val_fresh", False)), int(ctl.get("val_epoch", 0))
        group = self._group = distributed.resolve_group(self.__dict__.get("_process_group", distributed.AUTO))
        if group is not None:  # data-parallel ranks: one observation and one reward for all
            device = self._collective_device(group)
            fresh = ctl.get("val_fresh_keys", list(self._val) if val_fresh else [])  # (older checkpoints)
            given = {k: self._val.get(k, math.nan) if k in fresh else math.nan for k in ("val_loss", "val_acc")}
            means, top = distributed.reduce_signals(
                {k: summary[k] for k in ("loss", "grad_norm", "grad_cosine", "grad_sign_agreement")} | given,
                {"skipped": summary["skipped"], "longest_skip_run": summary["longest_skip_run"],
                 "val_fresh": val_fresh, "val_epoch": val_epoch}, group, device)
            summary = {**summary, **means, "skipped": int(top["skipped"]),
                       "longest_skip_run": int(top["longest_skip_run"])}
            # the metrics given since the last decision, over the ranks that gave them; else the
            # last ones (equal on every rank, as they were reduced too)
            self._val.update({k: means[k] for k in given if not math.isnan(means[k])})
            val_fresh, val_epoch = bool(top["val_fresh"]), int(top["val_epoch"])
            ctl["val_epoch"] = val_epoch
        if self.max_nonfinite_steps is not None and summary["longest_skip_run"] >= self.max_nonfinite_steps:
            self._raise_nonfinite(summary["longest_skip_run"])
        if math.isnan(summary["loss"]) and summary["skipped"] < ctl["interval_steps"]:
            self._warn_no_loss(ctl["interval_steps"])
        cheapest = min(s.cost for s in self._specs)
        signals = Signals(
            loss=summary["loss"], grad_norm=summary["grad_norm"], grad_cosine=summary["grad_cosine"],
            grad_sign_agreement=summary["grad_sign_agreement"],
            val_loss=self._val.get("val_loss", math.nan), val_acc=self._val.get("val_acc", math.nan),
            steps=ctl["interval_steps"], skipped=summary["skipped"],
            cost=ctl["interval_cost"] / ctl["interval_steps"] / cheapest if ctl["interval_steps"] else math.nan,
            progress=self._progress(), budget_share=self._budget_share(ctl["interval_steps"]),
            val_fresh=val_fresh, val_epoch=val_epoch,
        )
        ctl["val_fresh"], ctl["val_fresh_keys"] = False, []
        obs = self.observer.build(signals, ctl["action"], max(s.cost for s in self._specs) / cheapest,
                                  self._extra_features(signals))
        reward, info = None, {}
        if ctl["decisions"] > 0:
            ctx = RewardContext(now=signals, before=self._prev_signals,
                                action=self._action_names[ctl["action"]], final=final)
            reward = float(self.reward_fn(ctx))
            if not math.isfinite(reward):
                raise ValueError(f"The reward function returned {reward}")
            info = self.policy.observe(reward, obs, terminal=False, truncated=final)
        if group is not None and self.__dict__.get("_synced_group") is not group:
            distributed.broadcast_policy(self.policy, group, device)  # the ranks may have had different seeds
            self._synced_group = group
        action = self.policy.act(obs)
        if group is not None:
            action = distributed.agree(action, self.policy, group, device)
        if not (isinstance(action, int) and 0 <= action < len(self._action_names)):
            raise ValueError(f"The policy returned an invalid action: {action!r}")
        self._apply_action(action)
        self.history.append({
            "decision": ctl["decisions"], "step": ctl["step"], "epoch": ctl["epoch"],
            "choice": self._action_names[action], "action": action,
            "observation": obs.tolist(), "reward": reward, "final": final,
            "signals": signals.as_dict(), "policy": dict(info), **self._history_extra(),
        })
        ctl["action"] = action
        ctl["decisions"] += 1
        ctl["interval_steps"], ctl["interval_cost"] = 0, 0.0
        ctl["skipped_total"] += summary["skipped"]
        ctl["last_decision_step"] = ctl["step"]
        self._prev_signals = signals

    @property
    def choice(self) -> str:
        """Name of the action now in effect."""
        return self._action_names[self._ctl["action"]]

    @property
    def action_names(self) -> Tuple[str, ...]:
        return self._action_names

    @property
    def observation_layout(self) -> Dict[str, Any]:
        return self.observer.layout

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to resume bit for bit: the wrapper's groups, every inner optimizer's
        state, the policy (networks, optimizer, buffers, counters, RNG), the feature
        accumulators, the decision history. Loadable with ``torch.load(weights_only=True)``.
        State-dict hooks (``register_state_dict_pre_hook`` / ``_post_hook``) run around all of
        it, so a post-hook sees the ``"rlopt"`` entry too."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        with _hooks_off(self):
            sd = super().state_dict()
        sd["rlopt"] = {
            "format": STATE_FORMAT, "kind": self.kind, "actions": list(self._action_names),
            "choices": [s.name for s in self._specs], "families": [s.family for s in self._specs],
            "inner": [o.state_dict() for o in self._inner], "share_momentum": self.share_momentum,
            "policy": {**self.policy.describe(), "state": self.policy.state_dict()},
            "tracker": self.tracker.state_dict(), "observer": self.observer.state_dict(),
            "controller": dict(self._ctl), "val": dict(self._val),
            "prev_signals": None if self._prev_signals is None else self._prev_signals.as_dict(),
            "history": copy.deepcopy(self.history),
            **self._extra_state(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is checked before anything changes. Load hooks
        run around all of it: a pre-hook may transform the ``"rlopt"`` entry, and a post-hook
        sees the inner optimizers, the policy and the history loaded."""
        if isinstance(state_dict, dict) and self._optimizer_load_state_dict_pre_hooks:
            state_dict = state_dict.copy()
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
        with _hooks_off(self):
            self._load_checked(state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_checked(self, state_dict: Dict[str, Any]) -> None:
        rl = state_dict.get("rlopt") if isinstance(state_dict, dict) else None
        if not isinstance(rl, dict) or rl.get("format") != STATE_FORMAT:
            raise ValueError(f"Not an rlopt optimizer state dict ({STATE_FORMAT}); it has keys "
                             f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict)}")
        if rl["kind"] != self.kind or list(rl["actions"]) != list(self._action_names) or \
                list(rl["choices"]) != [s.name for s in self._specs]:
            raise ValueError(
                f"State dict is for a {rl['kind']} optimizer over actions {rl['actions']} and choices "
                f"{rl['choices']}; this one is {self.kind} over {list(self._action_names)} and "
                f"{[s.name for s in self._specs]}"
            )
        families = [s.family for s in self._specs]
        if "families" in rl and list(rl["families"]) != families:
            raise ValueError(f"State dict's choices {rl['choices']} are of families {rl['families']}; this "
                             f"optimizer's are of {families}")
        tracker_version = rl["tracker"].get("version")
        if tracker_version != SignalTracker.STATE_VERSION and tracker_version not in SignalTracker.MIGRATES:
            raise ValueError(f"The signal tracker state is of version {rl['tracker'].get('version', 1)}; this "
                             f"rlopt reads version {SignalTracker.STATE_VERSION} (the checkpoint was saved by an "
                             "older release)")
        desc = self.policy.describe()
        saved = rl["policy"]
        for key in ("kind", "obs_dim", "action_names", "config"):
            if saved.get(key) != desc.get(key):
                raise ValueError(f"The saved policy differs from this optimizer's policy in '{key}': "
                                 f"{saved.get(key)!r} != {desc.get(key)!r}")
        for inner, sd in zip(self._inner, rl["inner"]):
            if len(sd["param_groups"]) != len(inner.param_groups) or any(
                    len(a["params"]) != len(b["params"]) for a, b in zip(sd["param_groups"], inner.param_groups)):
                raise ValueError("An inner optimizer's state does not match this optimizer's parameter groups")
        if rl.get("share_momentum", False) != self.share_momentum and len(self._momentum_family()) > 1:
            warnings.warn(
                f"The checkpoint was saved with share_momentum={rl.get('share_momentum', False)} and this "
                f"optimizer has share_momentum={self.share_momentum}: "
                + ("the SGD-family choices now share the first one's momentum buffers" if self.share_momentum
                   else "each SGD-family choice starts from a copy of the shared buffers"), RuntimeWarning,
                stacklevel=2)
        self.__dict__.pop("_follow_cache", None)  # new group dicts
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        for inner, sd in zip(self._inner, rl["inner"]):
            inner.load_state_dict(_with_own_kernels(sd, inner))
        self._link_momentum()  # loading gave each inner optimizer its own state again
        if not self.share_momentum:  # loading keeps tensors that were one: give each its own copy
            for i in self._momentum_family()[1:]:
                target = getattr(self._inner[i], "base_optimizer", self._inner[i])
                for st in target.state.values():
                    for k, v in st.items():
                        if torch.is_tensor(v):
                            st[k] = v.clone()
        self.policy.load_state_dict(saved["state"])
        device = self._params[0].device if self._params else torch.device("cpu")
        self.tracker.load_state_dict(rl["tracker"], device)
        self.observer.load_state_dict(rl["observer"])
        self._ctl = dict(rl["controller"])
        self._val = dict(rl["val"])
        self._prev_signals = None if rl["prev_signals"] is None else Signals(**rl["prev_signals"])
        self.history = copy.deepcopy(list(rl["history"]))
        self._load_extra_state(rl)

    def __getstate__(self):
        return self._copy_state(warn=True)

    def _copy_state(self, warn: bool) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED + self._EXTRA_PICKLED if k in self.__dict__})
        group = self.__dict__.get("_process_group", distributed.AUTO)
        if not (group is None or isinstance(group, str)):  # a ProcessGroup does not pickle, and "auto"
            if warn and not distributed.outside(group):    # could widen a subgroup to every rank
                warnings.warn("A pickled rlopt optimizer does not keep its ProcessGroup: the copy decides "
                              "alone (process_group=None) until given one", RuntimeWarning, stacklevel=3)
            group = None
        state["_process_group"] = group
        return state

    def __deepcopy__(self, memo):
        """A deep copy decides with the same ranks: the ProcessGroup is shared, not copied."""
        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._copy_state(warn=False), memo))
        new._process_group = self.__dict__.get("_process_group", distributed.AUTO)  # the same ranks,
        new._group, new._synced_group = self.__dict__.get("_group"), self.__dict__.get("_synced_group")  # in step
        return new

    def __setstate__(self, state):
        super().__setstate__(state)
        # keys added in later releases, with the behaviour of the release that lacked them
        self.__dict__.setdefault("share_momentum", False)  # (session 4) each choice had its own buffers
        self._group = distributed.resolve_group(self.__dict__.get("_process_group", distributed.AUTO))
        self._synced_group = None  # made equal again at the next decision

    _EXTRA_PICKLED: Tuple[str, ...] = ()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(actions={list(self._action_names)}, choice={self.choice!r}, "
                f"interval={self.interval!r}, policy={self.policy!r})")
