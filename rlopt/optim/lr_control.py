"""QLearningRateOptimizer: a Q-learning agent adjusts the learning rate (and weight decay) of one
inner optimizer during training (Hansen, 2016; Xu et al., 2017)."""

from __future__ import annotations

import bisect
import itertools
import math
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ..control.base import ControlledOptimizer
from ..control.choices import FAMILIES, ChoiceSpec, resolve_choices
from ..control.observation import Signals
from ..control.validation import check_count, check_lr, check_momentum, check_weight_decay
from ..policies import DQNConfig
from ..rewards import InverseDistanceReward, LogImprovementReward, RewardContext

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

__all__ = ["QLearningRateOptimizer", "LR_ACTIONS", "WD_ACTIONS", "DEFAULT_DQN_CONFIG"]

#: learning-rate actions: factor <- op(factor)
LR_ACTIONS = ("keep", "halve", "reset")
#: weight-decay actions
WD_ACTIONS = ("keep", "halve", "x1.25", "reset")
_CONTROLS = {"lr": ("lr", LR_ACTIONS), "weight_decay": ("wd", WD_ACTIONS)}

#: The DQN behind ``policy="dqn"``: a run makes tens of decisions, not thousands, so exploration
#: ends within about 40 decisions and the horizon is short.
DEFAULT_DQN_CONFIG = DQNConfig(
    gamma=0.9,
    epsilon_decay=0.93,
    learning_starts=8,
    target_update=10,
    lr=1e-3,
    batch_size=32,
    buffer_size=5000,
    train_frequency=1,
    double_dqn=False,
)

#: Default reward (chosen on benchmarks/lr_control.py; see benchmarks/results/lr_control/lr_control.md).
DEFAULT_REWARD = "log_improvement"

#: Largest ``max_lr_halvings`` / ``max_wd_halvings``: 2**-1022 is the smallest normal float64.
MAX_HALVINGS = 1 - sys.float_info.min_exp  # 1022
#: Largest ``max_wd_growths``: 1.25**3180 ~ 1.5e308 is finite, 1.25**3181 overflows.
MAX_GROWTHS = int(math.log(sys.float_info.max) / math.log(1.25))  # 3180


class QLearningRateOptimizer(ControlledOptimizer):
    r"""A ``torch.optim.Optimizer`` whose learning rate (and optionally weight decay) is set by a
    small Q-learning agent from cheap training signals, on top of one inner optimizer.

    .. code-block:: text

        u_lr = u_wd = 1                                  # the agent's factors
        for each step:
            inner.lr = group.lr * u_lr * lr_scale         # group.lr: what an LR scheduler sets
            inner.weight_decay = group.weight_decay * u_wd
            inner.step()                                  # SGD / Adam / AdamW / SAM (fused, guarded)
        at each decision k (every `interval` steps, or at epoch_end):
            o_k = features(loss, gradient alignment, grad norm, val metrics, progress,
                           relative objective, log lr and wd levels, previous action)
            policy.observe(r_k = reward(interval k), o_k);  a_k = policy.act(o_k)
            u_lr <- {keep: u_lr, halve: u_lr / 2, reset: 1}[a_k.lr]             clipped to [2^-K, 1]
            u_wd <- {keep: u_wd, halve: u_wd / 2, x1.25: 1.25 u_wd, reset: 1}[a_k.wd]
                                                                    clipped to [2^-Kd, 1.25^Kg]

    **Actions.** With ``control=("lr",)`` the actions are ``lr:keep``, ``lr:halve``,
    ``lr:reset``; with ``("weight_decay",)`` ``wd:keep``, ``wd:halve``, ``wd:x1.25``,
    ``wd:reset``; with both, their product, named ``"lr:halve|wd:keep"`` (12 actions).

    **Bounds.** The learning-rate factor stays in ``[2**-max_lr_halvings, 1]`` (default
    ``[2**-10, 1]``: the lr never leaves ``[lr * 2**-10, lr]``) and the weight-decay factor in
    ``[2**-max_wd_halvings, 1.25**max_wd_growths]`` (default ``[2**-8, 1.25**8 ~ 5.96]``); an
    action that would cross a bound stops at it. Both values stay finite and positive.

    **LR schedulers.** The agent's factor multiplies the wrapper group's ``lr``, which is what
    an LR scheduler on this optimizer changes, so the two compose::

        inner lr = scheduled group lr * agent factor * base lr_scale     (lr_scale is 1 unless set)

    ``reset`` returns the factor to 1, i.e. to the *scheduled* learning rate. :attr:`lr`
    reports the inner learning rate of group 0 (the product above). Weight decay works the same way on each group's
    ``weight_decay`` (a group with ``weight_decay=0`` stays at 0).

    **Observation.** The base features of :mod:`rlopt.features` (loss level and trend,
    gradient norm, mean cosine and sign agreement of successive gradients, validation metrics,
    progress, skipped steps) and the previous action, plus:

    * ``objective_position``: the interval's mean training loss ``f`` against the ``M``
      (``objective_memory``) lowest interval losses of earlier decisions: ``+1`` if ``f`` is
      below all of them (a new best; also at the first measured interval), ``-1`` if ``M``
      values are stored and ``f`` is above all of them (it would not enter the ``M`` lowest),
      ``0`` otherwise (it ranks among them; ties count as among). ``0`` when no loss was measured.
    * ``lr_level`` (and ``wd_level`` when weight decay is controlled): the log of the current
      value over its initial value, mapped linearly from the bounds ``[log lo, log hi]`` of the
      factor to ``[-1, 1]`` and clipped (the lr counts the scheduler too). At the initial lr it is 1.

    Everything is accumulated on the device; the only host synchronisation is at decisions.

    Args:
        params: parameters or param-group dicts. A group may set ``lr``, ``weight_decay``,
            ``momentum`` or any hyper-parameter of the base.
        base: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"sam"`` (SAM around SGD), or a
            ``(name, kwargs)`` pair with the family's hyper-parameters
            (``("sgd", {"nesterov": True})``, ``("sam", {"rho": 0.1})``). The ``lr`` you pass is the
            inner optimizer's own (``lr_scale`` 1, unlike the switching optimizer's Adam).
        lr: initial learning rate, the value ``reset`` returns to (positive).
        weight_decay: initial weight decay (None: the family's default, 0 or AdamW's 1e-2).
            Must be positive when controlled.
        control: ``("lr",)``, ``("weight_decay",)`` or ``("lr", "weight_decay")``.
        policy: ``"dqn"`` (:data:`DEFAULT_DQN_CONFIG`), ``"ppo"``, ``"random"``,
            ``"constant:<action>"`` (e.g. ``"constant:lr:keep"``), a checkpoint path, a
            :class:`~rlopt.policies.Policy` or a config.
        interval: N (decide every N steps) or ``"epoch"`` (decide at each :meth:`epoch_end`).
        momentum: SGD/SAM momentum (ignored for Adam/AdamW).
        seed: seeds the policy; the global RNG is not touched.
        total_steps, total_epochs: the budget, when known (progress feature, episode end).
        reward: ``reward(RewardContext) -> float``; default :class:`~rlopt.rewards.LogImprovementReward`
            (see the module constant ``DEFAULT_REWARD`` and ``benchmarks/results/lr_control/lr_control.md``),
            with its weight-decay term off when weight decay is not controlled.
        objective_memory: ``M`` of ``objective_position``.
        max_lr_halvings, max_wd_halvings, max_wd_growths: the bounds above; positive, the
            halvings at most :data:`MAX_HALVINGS` (1022) and the growths at most
            :data:`MAX_GROWTHS` (3180), so that both bounds are normal positive float64 values.
        train_policy, max_nonfinite_steps, signal_every, process_group: as in
            :class:`~rlopt.switching.RLSwitchingOptimizer`.

    Example:
        >>> opt = QLearningRateOptimizer(model.parameters(), base="sgd", lr=0.1, weight_decay=5e-4,
        ...                              control=("lr", "weight_decay"), interval=10)
        >>> for epoch in range(epochs):
        ...     for x, y in loader:
        ...         def closure():
        ...             opt.zero_grad()
        ...             loss = F.cross_entropy(model(x), y)
        ...             loss.backward()
        ...             return loss
        ...         opt.step(closure)
        ...     opt.epoch_end(val_loss=vl, val_acc=va)
        >>> opt.lr, opt.weight_decay, opt.history[-1]["choice"]

    Note:
        Hansen (2016) observes the full objective and its own feature set; here the objective is
        the mean mini-batch loss of the interval (no extra passes) and the features are rlopt's
        shared ones plus the two above, so one DQN implementation serves every rlopt optimizer.
    """

    kind = "lr_control"

    def __init__(
        self,
        params: ParamsT,
        base: Union[str, tuple[str, Mapping[str, Any]]] = "sgd",
        lr: float = 0.1,
        weight_decay: Optional[float] = None,
        control: Sequence[str] = ("lr",),
        policy: Any = "dqn",
        interval: Union[str, int] = 10,
        momentum: float = 0.9,
        seed: int = 0,
        *,
        total_steps: Optional[int] = None,
        total_epochs: Optional[int] = None,
        reward: Optional[Callable[[RewardContext], float]] = None,
        objective_memory: int = 5,
        max_lr_halvings: int = 10,
        max_wd_halvings: int = 8,
        max_wd_growths: int = 8,
        train_policy: Optional[bool] = None,
        max_nonfinite_steps: Optional[int] = 20,
        signal_every: Optional[int] = None,
        process_group: Any = "auto",
        history_size: Optional[int] = 1000,
    ):
        check_lr(lr, positive=True)  # positive: the agent scales it
        check_momentum(momentum)
        if weight_decay is not None:
            check_weight_decay(weight_decay)
        control = self._check_control(control)
        for name, value, most, bound in (
            ("objective_memory", objective_memory, None, ""),
            ("max_lr_halvings", max_lr_halvings, MAX_HALVINGS, "2**-n"),
            ("max_wd_halvings", max_wd_halvings, MAX_HALVINGS, "2**-n"),
            ("max_wd_growths", max_wd_growths, MAX_GROWTHS, "1.25**n"),
        ):
            value = check_count(value, name)
            if most is not None and value > most:
                raise ValueError(
                    f"Invalid {name}: {value} (at most {most}: the bound {bound} must be a normal positive float64)"
                )
        spec = self._resolve_base(base, lr)
        if weight_decay is not None and "weight_decay" in spec.hparams:
            raise ValueError("Give weight_decay either as the argument or in the base's options, not both")
        wd0 = float(
            spec.hparams.get("weight_decay", spec.kind.defaults["weight_decay"])
            if weight_decay is None
            else weight_decay
        )
        if "weight_decay" in control and not wd0 > 0:
            raise ValueError(
                f"Invalid weight_decay value: {wd0} (controlling weight decay needs a positive initial value)"
            )
        defaults: dict[str, Any] = dict(lr=lr, weight_decay=wd0)
        if spec.kind.follows_momentum:
            defaults["momentum"] = momentum
        elif "betas" in spec.kind.defaults:  # as torch's Adam: OneCycleLR cycles beta1 here
            defaults["betas"] = tuple(spec.hparams.get("betas", spec.kind.defaults["betas"]))
            spec = ChoiceSpec(
                spec.name,
                spec.family,
                {k: v for k, v in spec.hparams.items() if k != "betas"},
                spec.options,
                spec.lr_scale,
                spec.cost,
            )
        # The agent's state exists before the base class makes the first decision.
        self._control = control
        self._lr_wd = {"lr": 1.0, "weight_decay": 1.0}
        self._bounds = {
            "lr": (2.0**-max_lr_halvings, 1.0),
            "weight_decay": (2.0**-max_wd_halvings, 1.25**max_wd_growths),
        }
        self._initial: dict[str, float] = {}  # group 0's values at construction (set at the first decision)
        self._memory = objective_memory
        self._lowest: list[float] = []
        parts = [[f"{_CONTROLS[c][0]}:{a}" for a in _CONTROLS[c][1]] for c in control]
        action_names = ["|".join(combo) for combo in itertools.product(*parts)]
        extra = ["objective_position", "lr_level"] + (["wd_level"] if "weight_decay" in control else [])
        if isinstance(policy, str) and policy == "dqn":
            policy = DQNConfig(**vars(DEFAULT_DQN_CONFIG))
        super().__init__(
            params,
            defaults,
            [spec],
            action_names=action_names,
            costs=[spec.cost] * len(action_names),
            policy=policy,
            interval=interval,
            seed=seed,
            total_steps=total_steps,
            total_epochs=total_epochs,
            reward=reward,
            max_nonfinite_steps=max_nonfinite_steps,
            signal_every=signal_every,
            process_group=process_group,
            train_policy=train_policy,
            extra_features=extra,
            history_size=history_size,
        )

    # ------------------------------------------------------------------ arguments
    @staticmethod
    def _check_control(control: Any) -> tuple[str, ...]:
        if isinstance(control, str):
            control = (control,)
        try:
            control = tuple(control)
        except TypeError:
            raise TypeError(f"control must be a sequence of names, got {control!r}") from None
        if not control:
            raise ValueError("control must name at least one of ('lr', 'weight_decay')")
        unknown = [c for c in control if c not in _CONTROLS]
        if unknown:
            raise ValueError(f"Unknown control {unknown}; expected some of ('lr', 'weight_decay')")
        if len(set(control)) != len(control):
            raise ValueError(f"Duplicate control names: {list(control)}")
        return tuple(c for c in _CONTROLS if c in control)  # canonical order: lr first

    @staticmethod
    def _resolve_base(base: Any, lr: float) -> ChoiceSpec:
        if isinstance(base, str):
            name, kwargs = base, {}
        elif isinstance(base, (tuple, list)) and len(base) == 2 and isinstance(base[0], str):
            if base[1] is not None and not isinstance(base[1], Mapping):
                raise TypeError(f"The options of base '{base[0]}' must be a dict, got {base[1]!r}")
            name, kwargs = base[0], dict(base[1] or {})
        else:
            raise TypeError(f"base must be a name or a (name, kwargs) pair, got {base!r}")
        family = kwargs.get("family", name)
        if family not in FAMILIES:
            raise ValueError(f"Unknown base '{family}'; expected one of {sorted(FAMILIES)}")
        if "lr" in kwargs or "cost" in kwargs:
            raise ValueError("Set the learning rate with lr=..., not in the base's options")
        kwargs.setdefault("lr_scale", 1.0)
        return resolve_choices([(name, kwargs)], lr)[0]

    # ---------------------------------------------------------------------- hooks
    def _default_reward(self) -> Callable[[RewardContext], float]:
        cls = LogImprovementReward if DEFAULT_REWARD == "log_improvement" else InverseDistanceReward
        reward = cls()
        if "lr" not in self._control:
            reward.lr = 0.0
        if "weight_decay" not in self._control:
            reward.wd = 0.0
        return reward

    def _factors(self) -> tuple[float, Optional[float]]:
        return self._lr_wd["lr"], self._lr_wd["weight_decay"]

    def _apply_action(self, action: int) -> None:
        for part in self.action_names[action].split("|"):
            short, op = part.split(":")
            name = "lr" if short == "lr" else "weight_decay"
            lo, hi = self._bounds[name]
            u = self._lr_wd[name]
            u = {"keep": u, "halve": u * 0.5, "x1.25": u * 1.25, "reset": 1.0}[op]
            self._lr_wd[name] = min(hi, max(lo, u))

    def _extra_features(self, signals: Signals) -> Sequence[float]:
        if not self._initial:
            self._initial = {
                "lr": self.param_groups[0]["lr"] * self.inner.specs[0].lr_scale,
                "weight_decay": self.param_groups[0]["weight_decay"],
            }
        feats = [self._objective_position(signals.loss), self._level("lr", self.lr)]
        if "weight_decay" in self._control:
            feats.append(self._level("weight_decay", self.weight_decay))
        return feats

    def _objective_position(self, f: float) -> float:
        """+1 new best, -1 outside the M lowest earlier values, 0 among them (see class doc);
        then remember ``f``."""
        if not (isinstance(f, float) and math.isfinite(f)):
            return 0.0
        lowest = self._lowest
        if not lowest or f < lowest[0]:
            pos = 1.0
        elif len(lowest) >= self._memory and f > lowest[-1]:
            pos = -1.0
        else:
            pos = 0.0
        bisect.insort(lowest, f)
        del lowest[self._memory :]
        return pos

    def _level(self, name: str, value: float) -> float:
        lo, hi = self._bounds[name]
        ratio = value / self._initial[name] if self._initial[name] > 0 else math.nan
        if not (ratio > 0 and math.isfinite(ratio)):
            return -1.0
        x = 2.0 * (math.log(ratio) - math.log(lo)) / (math.log(hi) - math.log(lo)) - 1.0
        return min(1.0, max(-1.0, x))

    def _history_extra(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "lr_factor": self._lr_wd["lr"],
            "wd_factor": self._lr_wd["weight_decay"],
        }

    def _extra_state(self) -> dict[str, Any]:
        return {
            "lr_control": {
                "control": list(self._control),
                "factors": dict(self._lr_wd),
                "lowest": list(self._lowest),
                "initial": dict(self._initial),
            }
        }

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get("lr_control")
        if not isinstance(saved, Mapping) or list(saved.get("control", [])) != list(self._control):
            got = saved.get("control") if isinstance(saved, Mapping) else None
            raise ValueError(
                f"rlopt.extra.lr_control: the checkpoint controls {got}, this optimizer controls {list(self._control)}"
            )
        factors = saved.get("factors")
        if (
            not isinstance(factors, Mapping)
            or set(factors) != {"lr", "weight_decay"}
            or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in factors.values())
        ):
            raise ValueError(f"Invalid rlopt.extra.lr_control.factors: {factors!r}")
        if not isinstance(saved.get("lowest"), (list, tuple)) or not isinstance(saved.get("initial"), Mapping):
            raise ValueError("rlopt.extra.lr_control needs 'lowest' (a list) and 'initial' (a dict)")

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        saved = state["lr_control"]
        self._lr_wd = {k: float(v) for k, v in saved["factors"].items()}
        self._lowest = [float(v) for v in saved["lowest"]]
        self._initial = {k: float(v) for k, v in saved["initial"].items()}

    # ---------------------------------------------------------------- properties
    @property
    def lr(self) -> float:
        """Learning rate group 0's inner optimizer runs at now: ``param_groups[0]["lr"] * factor``
        times the base's ``lr_scale`` (1 unless set)."""
        return self.param_groups[0]["lr"] * self.inner.specs[0].lr_scale * self._lr_wd["lr"]

    @property
    def weight_decay(self) -> float:
        """Current effective weight decay of group 0."""
        return self.param_groups[0]["weight_decay"] * self._lr_wd["weight_decay"]

    @property
    def factors(self) -> dict[str, float]:
        """The agent's multipliers (``{"lr": u_lr, "weight_decay": u_wd}``)."""
        return dict(self._lr_wd)

    @property
    def control(self) -> tuple[str, ...]:
        return self._control

    @property
    def base(self) -> ChoiceSpec:
        return self.inner.specs[0]
