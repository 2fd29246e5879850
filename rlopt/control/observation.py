"""What a policy sees: an interval's :class:`Signals` turned into a feature vector.

Each base feature is declared once, as a ``(name, formula)`` pair in :data:`BASE_FEATURES`, so a
name cannot drift from the formula that computes it. The layout (names and version) is saved with
every policy, so a checkpoint cannot be driven by features it was not trained on. Features are
scaled to about ``[-1, 1]``; a signal not measured gives 0.

Layout versions: 1, the sixteen features up to ``skipped``; 2 (:data:`LAYOUT_VERSION`, what new
policies get) adds four that say when SAM may pay: the sharpness SAM measures on its own steps,
the learning rate against its peak so far, the gradient norm's z-score against the earlier
decisions', and the gap between validation and training loss. An optimizer driven by a policy
of version 1 builds version-1 observations, so the policies trained on them keep working.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

import torch

__all__ = [
    "LAYOUT_VERSION",
    "LAYOUTS",
    "BASE_FEATURES",
    "SAM_FEATURES",
    "FEATURE_NAMES",
    "Signals",
    "ObservationBuilder",
    "observation_layout",
]

LAYOUT_VERSION = 2


@dataclass
class Signals:
    """What one interval between two decisions looked like (host floats; NaN = not measured)."""

    loss: float = math.nan
    grad_norm: float = math.nan
    grad_cosine: float = math.nan
    grad_sign_agreement: float = math.nan
    val_loss: float = math.nan
    val_acc: float = math.nan
    steps: int = 0
    skipped: int = 0
    cost: float = math.nan  # mean gradient evaluations per step, relative to the cheapest choice
    progress: float = math.nan
    budget_share: float = math.nan  # the interval's share of the whole budget, when the budget is known
    val_fresh: bool = False  # validation metrics were given during this interval
    val_epoch: int = 0  # epochs completed when the validation metrics in use were given (0: none yet)
    sharpness: float = math.nan  # mean (L(w + e) - L(w)) / (rho |g|) over the interval's SAM steps
    lr: float = math.nan  # the first param group's learning rate at the decision

    @property
    def skipped_frac(self) -> float:
        return self.skipped / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (every value a plain number, so a shallow copy is a full one;
        ``dataclasses.asdict`` would deep-copy them at ten times the cost, at every decision)."""
        return {name: getattr(self, name) for name in _SIGNAL_FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Signals:
        """Inverse of :meth:`as_dict`; ``ValueError`` for unknown or missing fields."""
        names = {f.name for f in fields(cls)}
        if not isinstance(values, Mapping) or set(values) != names:
            got = sorted(values) if isinstance(values, Mapping) else type(values).__name__
            raise ValueError(f"Invalid signals: expected the fields {sorted(names)}, got {got}")
        return cls(**values)


_SIGNAL_FIELDS = tuple(f.name for f in fields(Signals))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _log_ratio(a: float, b: float) -> float:
    if _finite(a) and _finite(b) and a > 0 and b > 0:
        return math.log(a / b)
    return 0.0


@dataclass(frozen=True)
class _View:
    """What a formula reads: this interval's signals, the first and previous measured values,
    and the cost of the most expensive choice relative to the cheapest."""

    s: Signals
    first: Mapping[str, float]
    prev: Mapping[str, float]
    max_cost: float
    running: Mapping[str, float] = field(default_factory=dict)  # lr peak, log grad-norm moments


def _acc(v: _View) -> float:
    return v.s.val_acc if _finite(v.s.val_acc) else math.nan


Formula = Callable[[_View], float]
t = math.tanh

#: The base features: name and formula, in layout order.
BASE_FEATURES: tuple[tuple[str, Formula], ...] = (
    # training loss against the first interval's, and against the previous one's
    ("loss_level", lambda v: t(_log_ratio(v.s.loss, v.first.get("loss", math.nan)))),
    ("loss_change", lambda v: t(5 * _log_ratio(v.s.loss, v.prev.get("loss", math.nan)))),
    ("grad_norm_level", lambda v: t(_log_ratio(v.s.grad_norm, v.first.get("grad_norm", math.nan)))),
    ("grad_norm_change", lambda v: t(2 * _log_ratio(v.s.grad_norm, v.prev.get("grad_norm", math.nan)))),
    # alignment of successive gradients: mean cosine, mean sign agreement over coordinates
    ("grad_cosine", lambda v: v.s.grad_cosine if _finite(v.s.grad_cosine) else 0.0),
    ("grad_sign_agreement", lambda v: v.s.grad_sign_agreement if _finite(v.s.grad_sign_agreement) else 0.0),
    ("val_loss_level", lambda v: t(_log_ratio(v.s.val_loss, v.first.get("val_loss", math.nan)))),
    ("val_loss_change", lambda v: t(5 * _log_ratio(v.s.val_loss, v.prev.get("val_loss", math.nan)))),
    ("val_acc", lambda v: 2 * _acc(v) - 1 if _finite(_acc(v)) else 0.0),
    (
        "val_acc_change",
        lambda v: (
            t(20 * (_acc(v) - v.prev["val_acc"]))
            if _finite(_acc(v)) and _finite(v.prev.get("val_acc", math.nan))
            else 0.0
        ),
    ),
    ("has_val", lambda v: 1.0 if _finite(v.s.val_acc) or _finite(v.s.val_loss) else 0.0),
    # progress through the budget in [-1, 1]; 0 and has_budget 0 when the budget is unknown
    ("progress", lambda v: 2 * v.s.progress - 1 if _finite(v.s.progress) else 0.0),
    ("has_budget", lambda v: 1.0 if _finite(v.s.progress) else 0.0),
    # gradient evaluations per step over the cheapest choice's, scaled to [0, 1]
    (
        "cost",
        lambda v: (
            min(1.0, max(0.0, (v.s.cost - 1) / (v.max_cost - 1))) if v.max_cost > 1 and _finite(v.s.cost) else 0.0
        ),
    ),
    ("skipped", lambda v: v.s.skipped_frac),
)


def _grad_norm_z(v: _View) -> float:
    """How unusual this interval's gradient norm is: the z-score of its log against the earlier
    decisions' (AE-SAM's signal, per decision), squashed; 0 until two earlier ones are known."""
    n, mean, m2 = v.running.get("gn_n", 0.0), v.running.get("gn_mean", 0.0), v.running.get("gn_m2", 0.0)
    if n < 2 or not (_finite(v.s.grad_norm) and v.s.grad_norm > 0):
        return 0.0
    std = math.sqrt(m2 / (n - 1))
    return t((math.log(v.s.grad_norm) - mean) / (2 * std)) if std > 0 else 0.0


#: The features version 2 adds, in layout order.
SAM_FEATURES: tuple[tuple[str, Formula], ...] = (
    # curvature along the gradient, from SAM's own second evaluation, against the first measured
    ("sharpness_level", lambda v: t(_log_ratio(v.s.sharpness, v.first.get("sharpness", math.nan)))),
    # the learning rate against its peak so far in [-1, 1]: late in a decaying schedule -> -1
    (
        "lr_to_peak",
        lambda v: (
            2 * min(1.0, v.s.lr / v.running["lr_peak"]) - 1
            if _finite(v.s.lr) and v.s.lr >= 0 and v.running.get("lr_peak", 0.0) > 0
            else 0.0
        ),
    ),
    ("grad_norm_z", _grad_norm_z),
    # generalisation gap: validation loss against this interval's training loss
    ("val_gap", lambda v: t(_log_ratio(v.s.val_loss, v.s.loss))),
)
LAYOUTS: dict[int, tuple[tuple[str, Formula], ...]] = {1: BASE_FEATURES, 2: BASE_FEATURES + SAM_FEATURES}
FEATURE_NAMES: tuple[str, ...] = tuple(name for name, _ in LAYOUTS[LAYOUT_VERSION])
_REFERENCES = ("loss", "grad_norm", "val_loss", "sharpness")  # first measured values kept
_REMEMBERED = ("loss", "grad_norm", "val_loss", "val_acc", "sharpness")  # previous measured values kept
_RUNNING = ("lr_peak", "gn_n", "gn_mean", "gn_m2")


def observation_layout(
    action_names: Sequence[str], extra: Sequence[str] = (), version: int = LAYOUT_VERSION
) -> dict[str, Any]:
    """The feature names of an optimizer: the features of layout ``version``, the optimizer's own
    ``extra`` ones, then the previous action one-hot."""
    if version not in LAYOUTS:
        raise ValueError(f"Unknown observation layout version {version!r}; this rlopt makes {sorted(LAYOUTS)}")
    names = [name for name, _ in LAYOUTS[version]] + list(extra) + [f"prev_action:{a}" for a in action_names]
    return {"version": version, "names": names}


@dataclass
class ObservationBuilder:
    """Turns :class:`Signals` into the vector of :func:`observation_layout`.

    Keeps the first and previous measured values as references (saved in checkpoints).
    :meth:`peek` computes a vector without changing them; :meth:`commit` then records the
    interval, so a decision that fails between the two leaves the builder as it was.
    """

    action_names: Sequence[str]
    extra: Sequence[str] = ()
    first: dict[str, float] = field(default_factory=dict)
    prev: dict[str, float] = field(default_factory=dict)
    version: int = LAYOUT_VERSION
    running: dict[str, float] = field(default_factory=dict)  # lr peak; count, mean, M2 of log grad norms

    @property
    def layout(self) -> dict[str, Any]:
        return observation_layout(self.action_names, self.extra, self.version)

    def peek(
        self, s: Signals, prev_action: Optional[int], max_cost: float, extra_values: Sequence[float] = ()
    ) -> torch.Tensor:
        first = dict(self.first)
        for key in _REFERENCES:
            value = getattr(s, key)
            if _finite(value) and value > 0:
                first.setdefault(key, value)
        running = dict(self.running)
        if _finite(s.lr) and s.lr > running.get("lr_peak", 0.0):
            running["lr_peak"] = s.lr
        view = _View(s, first, self.prev, max_cost, running)
        features = [formula(view) for _, formula in LAYOUTS[self.version]]
        features += [float(v) if _finite(v) else 0.0 for v in extra_values]
        one_hot = [0.0] * len(self.action_names)
        if prev_action is not None:
            one_hot[prev_action] = 1.0
        return torch.tensor(features + one_hot, dtype=torch.float32)

    def commit(self, s: Signals) -> None:
        for key in _REFERENCES:
            value = getattr(s, key)
            if _finite(value) and value > 0:
                self.first.setdefault(key, value)
        for key in _REMEMBERED:
            value = getattr(s, key)
            if _finite(value):
                self.prev[key] = value
        r = self.running
        if _finite(s.lr) and s.lr > r.get("lr_peak", 0.0):
            r["lr_peak"] = float(s.lr)
        if _finite(s.grad_norm) and s.grad_norm > 0:  # Welford's update of the log grad norm's moments
            x, n = math.log(s.grad_norm), r.get("gn_n", 0.0) + 1
            delta = x - r.get("gn_mean", 0.0)
            r["gn_n"], r["gn_mean"] = n, r.get("gn_mean", 0.0) + delta / n
            r["gn_m2"] = r.get("gn_m2", 0.0) + delta * (x - r["gn_mean"])

    def build(
        self, s: Signals, prev_action: Optional[int], max_cost: float, extra_values: Sequence[float] = ()
    ) -> torch.Tensor:
        """:meth:`peek`, then :meth:`commit`."""
        obs = self.peek(s, prev_action, max_cost, extra_values)
        self.commit(s)
        return obs

    def state_dict(self) -> dict[str, Any]:
        return {"first": dict(self.first), "prev": dict(self.prev), "running": dict(self.running)}

    @staticmethod
    def check_state(state: Any) -> None:
        if not (
            isinstance(state, Mapping)
            and isinstance(state.get("first"), Mapping)
            and isinstance(state.get("prev"), Mapping)
        ):
            raise ValueError("The observer state must be a dict with 'first' and 'prev' dicts")
        for part in ("first", "prev"):
            for key, value in state[part].items():
                if key not in _REMEMBERED or not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"Invalid observer state entry {part}[{key!r}] = {value!r}")
        running = state.get("running", {})  # (absent from checkpoints of layout version 1)
        if not isinstance(running, Mapping) or any(
            key not in _RUNNING
            or not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            for key, value in running.items()
        ):
            raise ValueError(f"Invalid observer state 'running': {running!r}")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.check_state(state)
        self.first, self.prev = dict(state["first"]), dict(state["prev"])
        self.running = dict(state.get("running", {}))
