"""The inner optimizers a meta-optimizer can run, and how their hyper-parameters are derived.

Each *choice* is a named instance of a *family* (``sgd``, ``sam``, ``adam``, ``adamw``). Rules
that hold for every choice, documented once here:

* **Learning rate.** An inner optimizer runs at ``group["lr"] * lr_scale`` where ``group`` is the
  wrapper's parameter group. Families have a default ``lr_scale`` (1 for ``sgd``/``sam``, 0.01 for
  ``adam``/``adamw``, so ``lr=0.1`` gives Adam 1e-3). A choice may set ``lr_scale`` or an absolute
  ``lr`` (meant at the base learning rate; stored as ``lr / base_lr``). An LR scheduler on the
  wrapper therefore moves every inner optimizer by the same factor.
* **Momentum.** ``sgd`` and ``sam`` use the wrapper group's ``momentum`` (so OneCycleLR's
  momentum cycling reaches them) unless the choice pins its own ``momentum``, which then obeys
  the wrapper's range ``[0, 1)``. Adam's ``betas`` are the choice's own.
* **Weight decay and the rest.** Precedence, highest first: a value set explicitly in a user's
  parameter group, the choice's own keyword, the wrapper's ``weight_decay`` argument, the family
  default (torch's defaults, e.g. AdamW 1e-2).
* **Cost.** Gradient evaluations per step (``sam`` 2, others 1); a user may pass measured
  relative costs with ``cost=``. Costs are counted, never timed, so runs replay bit for bit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..optim.sam import SAM
from .validation import check_weight_decay, is_real

__all__ = ["Family", "ChoiceSpec", "FAMILIES", "register_family", "resolve_choices"]


@dataclass(frozen=True)
class Family:
    """A kind of inner optimizer."""

    optimizer: type
    defaults: dict[str, Any]  # its hyper-parameters other than lr, with rlopt's defaults
    lr_scale: float = 1.0  # default inner lr / base lr
    cost: float = 1.0  # gradient evaluations per step
    follows_momentum: bool = False  # takes the wrapper group's momentum unless pinned
    needs_closure: bool = False
    fused_found_inf: bool = True  # its fused=True step skips on found_inf (torch's own optimizers)


_SGD_DEFAULTS = dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False)
_ADAM_DEFAULTS = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)

FAMILIES: dict[str, Family] = {
    "sgd": Family(torch.optim.SGD, _SGD_DEFAULTS, follows_momentum=True),
    "sam": Family(
        SAM, dict(rho=0.05, adaptive=False, **_SGD_DEFAULTS), cost=2.0, follows_momentum=True, needs_closure=True
    ),
    "adam": Family(torch.optim.Adam, _ADAM_DEFAULTS, lr_scale=0.01),
    "adamw": Family(torch.optim.AdamW, dict(_ADAM_DEFAULTS, weight_decay=1e-2), lr_scale=0.01),
}

# Constructor arguments of torch optimizers that are implementation options, not hyper-parameters.
_NOT_HPARAMS = ("lr", "foreach", "fused", "capturable", "differentiable")


def register_family(
    name: str,
    optimizer: type,
    defaults: Optional[Mapping[str, Any]] = None,
    *,
    lr_scale: float = 1.0,
    cost: float = 1.0,
    follows_momentum: bool = False,
) -> Family:
    """Make any ``torch.optim.Optimizer`` subclass a choice family, by ``name``.

    ``choices=["sgd", name]`` then runs it, with the rules of this module: it steps at the
    wrapper's ``lr * lr_scale``, costs ``cost`` gradient evaluations per step, and a choice may
    set any key of ``defaults``. ``defaults`` are its hyper-parameters other than ``lr`` (None:
    read from an instance, leaving out options such as ``foreach``). ``follows_momentum``: the
    wrapper's ``momentum`` reaches it (it must have a ``momentum`` hyper-parameter). Families that
    evaluate the gradient twice (as SAM) or need a closure (as LBFGS) cannot be registered.
    Register before building an optimizer or loading a checkpoint that names the family.

    Non-finite steps: rlopt checks on the host at every step (a warning says so when the
    optimizer is built), since it cannot know whether the class's own fused step honours
    ``found_inf``. A subclass of ``torch.optim.SGD`` counts as an SGD-family choice: with
    ``share_momentum`` it shares the ``sgd`` choice's momentum buffers.

    Example: a learned update rule written as a torch optimizer,
    ``register_family("learned", LearnedRule, lr_scale=0.01)``.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"A family name must be a non-empty string, got {name!r}")
    if name in FAMILIES:
        raise ValueError(f"A choice family named '{name}' exists already")
    if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer subclass, got {optimizer!r}")
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"{optimizer.__name__}.step needs a closure (as LBFGS); rlopt's choices step without one")
    if defaults is None:
        probe = torch.nn.Parameter(torch.zeros(1))
        try:
            defaults = optimizer([probe], lr=1.0).defaults  # type: ignore[call-arg]  # subclasses take lr
        except (TypeError, ValueError) as err:
            raise TypeError(f"Could not read {optimizer.__name__}'s defaults ({err}); pass defaults=") from None
    defaults = {k: v for k, v in dict(defaults).items() if k not in _NOT_HPARAMS}
    lr_scale = _check_float("lr_scale", lr_scale, name)
    cost = _check_float("cost", cost, name, positive=True)
    if follows_momentum and "momentum" not in defaults:
        raise ValueError(f"follows_momentum needs a 'momentum' hyper-parameter; {name} has {sorted(defaults)}")
    family = Family(
        optimizer,
        defaults,
        lr_scale=lr_scale,
        cost=cost,
        follows_momentum=bool(follows_momentum),
        fused_found_inf=False,
    )
    FAMILIES[name] = family
    return family


# Keys a choice may carry besides its family's hyper-parameters.
_META_KEYS = ("family", "lr", "lr_scale", "cost")
# Constructor options passed to the torch optimizer rather than to its groups. rlopt uses
# fused kernels where torch has them (they skip non-finite steps on the device).
_OPTION_KEYS = ("fused", "foreach", "capturable", "differentiable")


@dataclass(frozen=True)
class ChoiceSpec:
    """One resolved choice: everything needed to build its inner optimizer."""

    name: str
    family: str
    hparams: dict[str, Any] = field(default_factory=dict)  # set by the user for this choice
    options: dict[str, Any] = field(default_factory=dict)  # constructor options (fused, foreach)
    lr_scale: float = 1.0
    cost: float = 1.0

    @property
    def kind(self) -> Family:
        return FAMILIES[self.family]

    @property
    def needs_closure(self) -> bool:
        return self.kind.needs_closure

    @property
    def pins_momentum(self) -> bool:
        return "momentum" in self.hparams

    def inner_group(
        self, group: Mapping[str, Any], explicit: Mapping[str, Any], wrapper_defaults: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The inner optimizer's param group built from a wrapper group (see module doc)."""
        kind = self.kind
        hp = dict(kind.defaults)
        wd = wrapper_defaults.get("weight_decay")
        if wd is not None:
            hp["weight_decay"] = wd
        if kind.follows_momentum:
            hp["momentum"] = group["momentum"]
        if "maximize" in kind.defaults and "maximize" in group:
            hp["maximize"] = group["maximize"]
        hp.update(self.hparams)
        hp.update({k: v for k, v in explicit.items() if k in kind.defaults})
        hp["lr"] = group["lr"] * self.lr_scale
        hp["params"] = group["params"]
        return hp


_is_real = is_real


def _check_float(name: str, value: Any, choice: str, positive: bool = False) -> float:
    if not _is_real(value):
        raise TypeError(f"Invalid {name} for choice '{choice}': {value!r}")
    value = float(value)
    if not (0.0 < value if positive else 0.0 <= value) or math.isinf(value):
        raise ValueError(f"Invalid {name} for choice '{choice}': {value}")
    return value


def _accepted_options(optimizer: type) -> tuple[str, ...]:
    """The constructor options of ``optimizer`` among :data:`_OPTION_KEYS`."""
    try:
        names = inspect.signature(optimizer.__init__).parameters  # type: ignore[misc]  # the class's own __init__
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return ()
    if "kwargs" in names:  # SAM: its options go to its base (SGD)
        names = inspect.signature(torch.optim.SGD.__init__).parameters
    return tuple(k for k in _OPTION_KEYS if k in names)


def _one(
    name: Any, kwargs: Optional[Mapping[str, Any]], base_lr: float, shared: Optional[Mapping[str, Any]] = None
) -> ChoiceSpec:
    if not isinstance(name, str) or not name:
        raise TypeError(f"A choice name must be a non-empty string, got {name!r}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"The options of choice '{name}' must be a dict, got {kwargs!r}")
    kwargs = dict(kwargs or {})
    family = kwargs.pop("family", name)
    if family not in FAMILIES:
        raise ValueError(
            f"Unknown choice '{family}'; expected one of {sorted(FAMILIES)} (or give a custom name with a 'family' key)"
        )
    kind = FAMILIES[family]
    unknown = sorted(set(kwargs) - set(kind.defaults) - set(_META_KEYS) - set(_OPTION_KEYS))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for choice '{name}' (family '{family}'); "
            f"expected some of {sorted(set(kind.defaults) | set(_META_KEYS) - {'family'})}"
        )
    if "lr" in kwargs and "lr_scale" in kwargs:
        raise ValueError(f"Give either lr or lr_scale for choice '{name}', not both")
    if "lr" in kwargs:
        lr = _check_float("learning rate", kwargs.pop("lr"), name)
        if base_lr == 0.0:
            raise ValueError(f"Choice '{name}' sets lr={lr} but the base lr is 0: use lr_scale")
        lr_scale = lr / base_lr
    else:
        lr_scale = _check_float("lr_scale", kwargs.pop("lr_scale", kind.lr_scale), name)
    cost = _check_float("cost", kwargs.pop("cost", kind.cost), name, positive=True)
    if "momentum" in kwargs:
        # A pinned momentum stands in for the wrapper's, so it obeys the wrapper's range, [0, 1).
        momentum = kwargs["momentum"]
        if not _is_real(momentum):
            raise TypeError(f"Invalid momentum value: {momentum!r} (choice '{name}')")
        if not 0.0 <= float(momentum) < (1.0 if kind.follows_momentum else math.inf):
            raise ValueError(f"Invalid momentum value: {float(momentum)} (choice '{name}')")
    if "weight_decay" in kwargs:
        try:
            check_weight_decay(kwargs["weight_decay"])
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (choice '{name}')") from None
    for key in ("rho", "eps", "dampening"):
        if key in kwargs:
            _check_float(key, kwargs[key], name)
    for key, default in kind.defaults.items():  # flags (nesterov, amsgrad, adaptive): no truthy strings
        if isinstance(default, bool) and key in kwargs and not isinstance(kwargs[key], bool):
            raise TypeError(f"{key} for choice '{name}' must be a bool, got {kwargs[key]!r}")
    own = {k: kwargs.pop(k) for k in _OPTION_KEYS if k in kwargs}
    accepted = _accepted_options(kind.optimizer)
    options = {**{k: v for k, v in (shared or {}).items() if k in accepted}, **own}
    if options.get("differentiable"):
        raise RuntimeError(f"Choice '{name}': rlopt's optimizers do not support differentiable=True")
    # Let torch validate the hyper-parameters with its own messages (betas, nesterov, eps, ...).
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        kind.optimizer(
            [probe],
            lr=1.0,
            **{**kind.defaults, **kwargs},
            **{k: v for k, v in options.items() if k in ("foreach", "capturable")},
        )
    except (ValueError, TypeError) as err:
        raise type(err)(f"Invalid options for choice '{name}': {err}") from None
    return ChoiceSpec(name=name, family=family, hparams=kwargs, options=options, lr_scale=lr_scale, cost=cost)


ChoicesArg = Union[Sequence[Union[str, tuple[str, Mapping[str, Any]]]], Mapping[str, Any]]


def resolve_choices(
    choices: ChoicesArg, base_lr: float, options: Optional[Mapping[str, Any]] = None
) -> tuple[ChoiceSpec, ...]:
    """Turn the user's ``choices`` argument into specs; raise torch-style errors on bad input.

    Accepts ``["sgd", "adam"]``, ``[("sgd", {"nesterov": True}), "adam"]`` or
    ``{"sgd": {}, "sam-0.1": {"family": "sam", "rho": 0.1}}``.
    """
    if isinstance(choices, str):
        raise TypeError("choices must be a list of names (e.g. ['sgd', 'sam']), not a string")
    if isinstance(choices, Mapping):
        items = list(choices.items())
    else:
        try:
            entries = list(choices)
        except TypeError:
            raise TypeError(f"choices must be a list or dict, got {type(choices).__name__}") from None
        items = []
        for c in entries:
            if isinstance(c, str):
                items.append((c, None))
            elif isinstance(c, (tuple, list)) and len(c) == 2:
                items.append((c[0], c[1]))
            else:
                raise TypeError(f"A choice must be a name or a (name, kwargs) pair, got {c!r}")
    if not items:
        raise ValueError("choices must not be empty")
    specs = tuple(_one(name, kwargs, base_lr, options) for name, kwargs in items)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate choice names: {names}")
    return specs
