"""RLSwitchingOptimizer: a policy chooses which inner optimizer (SGD, SAM, Adam, ...) runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch

from ..control.base import ControlledOptimizer
from ..control.budget import BUDGET_FEATURES, ComputeBudget, check_budget
from ..control.choices import ChoicesArg, resolve_choices
from ..control.validation import check_count, check_lr, check_momentum, check_weight_decay
from ..rewards import RewardContext, SwitchingReward

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

    from ..control.choices import ChoiceSpec
    from ..control.observation import Signals

__all__ = ["RLSwitchingOptimizer"]


class RLSwitchingOptimizer(ControlledOptimizer):
    r"""A ``torch.optim.Optimizer`` that runs one of several inner optimizers, chosen by a small
    reinforcement-learning policy from cheap training signals.

    .. code-block:: text

        a_0 = policy.act(o_0)
        for each step:             inner[a].step()            # SGD, SAM, Adam, ... (fused, guarded)
        at each decision k:        o_k = features(loss, grad norm, gradient alignment, val metrics,
                                                  progress, previous action, compute cost)
                                   policy.observe(r_k = reward(interval k), o_k)
                                   a_k = policy.act(o_k)

    Decisions happen at every :meth:`epoch_end` (``interval="epoch"``) or every ``interval``
    steps. Inner optimizers keep their state across switches: Adam's moments survive an SGD
    stretch, and SGD and SAM share one momentum buffer (``share_momentum``), so switching between
    them never resumes a stale one.

    Args:
        params: parameters or param-group dicts, as any torch optimizer takes. A group may set
            ``lr``, ``momentum``, ``weight_decay`` or any inner hyper-parameter; it wins over the
            choice's own value for that group.
        choices: ``["sgd", "sam", "adam"]``; ``[(name, kwargs), ...]``; or ``{name: kwargs}``. Names
            are ``sgd``, ``sam``, ``adam``, ``adamw``, families added with
            :func:`rlopt.choices.register_family` (any torch optimizer), or any name with a
            ``family`` key. Per-choice
            keys: the family's hyper-parameters, ``lr`` or ``lr_scale``, ``cost``.
            See :mod:`rlopt.choices` for how they combine with the base ``lr``.
        policy: ``"ppo"``, ``"dqn"``, ``"random"``, ``"constant:<choice>"``, a rule
            (``"sam-late"``, ``"sam-every:<k>"``, ``"ss-sam"``, ``"ae-sam"``: see
            :mod:`rlopt.policies.rules`), a pretrained policy's name, a checkpoint path, a
            :class:`~rlopt.policies.Policy`, or a config (``DQNConfig(...)``, ``PPOConfig(...)``,
            ``SamLateConfig(...)``, ...).
        interval: ``"epoch"`` (decide at each :meth:`epoch_end`) or N (decide every N steps).
        lr: base learning rate; what LR schedulers change. SGD and SAM run at it, Adam and
            AdamW at ``lr * 0.01`` unless their choice sets ``lr``/``lr_scale``.
        momentum: SGD/SAM momentum (schedulers that cycle momentum reach them through it).
        weight_decay: for every choice that does not set its own (None: each family's default:
            0, AdamW 1e-2).
        seed: seeds the policy (network initialisation and exploration). The global RNG is not touched.
        total_steps, total_epochs: the budget, when known: it gives the progress feature and
            ends the episode (a truncation, bootstrapped) at the last decision. With ``interval=N``
            and ``total_epochs`` given, the last decision waits for the last ``epoch_end()``, so
            that its reward sees the final validation metrics; the epoch's length is then known
            only after the first ``epoch_end()``, so the compute charge of the first epoch's
            intervals is the reward's flat per-decision one (give ``total_steps`` to avoid that).
        reward: callable ``reward(RewardContext) -> float`` (default :class:`~rlopt.rewards.SwitchingReward`).
        train_policy: learn online (True) or freeze (False); None keeps the policy's own mode
            (new policies learn, loaded ones are frozen).
        max_nonfinite_steps: raise after this many consecutive steps with a non-finite loss or
            gradient (each is skipped and penalised); None never raises. On a GPU the count is
            read without waiting for the device, so the error may come up to about 130 steps late
            (the count is folded every 128 steps; the steps meanwhile are skipped all the same);
            on the CPU it comes at the step that completes the run; on other devices (MPS) at the
            next decision.
        signal_every: sample the gradient norm and alignment every this many steps (None: 100, or
            ``interval`` when deciding every ``interval`` < 100 steps, so that every interval holds a
            sample). A sample and the step after it cost a copy of the gradient and about ten small
            operations: on a small model on the CPU about 4x an ordinary step together, which is
            why they are spaced out (``benchmarks/scripts/step_host_cost.py``).
        share_momentum: the SGD-family choices (``sgd``, and ``sam`` over SGD) share one momentum
            buffer per parameter, so a switch between them carries the velocity on, as a schedule
            that runs SAM's ascent on some steps of one SGD does (default). False gives each its own
            buffer; a switch then resumes the buffer the other choice left behind, however old.
            Other choices (Adam, AdamW) always keep their own state.
        process_group: which data-parallel ranks take every decision together (DDP): ``"auto"``
            (default) is torch.distributed's default group when it is initialised with more than
            one rank; a ``ProcessGroup`` is that group; ``None`` lets each rank decide alone
            (independent runs). Synchronised ranks average their signals and validation metrics
            (ranks that give none are left out of the mean) and take the same action, with equal
            policies even when their seeds differ: three small all-reduces per decision, never one
            inside an ordinary step. See :mod:`rlopt.distributed`.

    Example:
        >>> opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam", "adam"], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        >>> for epoch in range(epochs):
        ...     for x, y in loader:
        ...         def closure():
        ...             opt.zero_grad()
        ...             loss = F.cross_entropy(model(x), y)
        ...             loss.backward()
        ...             return loss
        ...         opt.step(closure)
        ...     sched.step()
        ...     opt.epoch_end(val_loss=vl, val_acc=va)
        >>> opt.choice, opt.history[-1]["reward"]

    Torch's own optimizer options are accepted as torch accepts them: ``maximize`` (every choice
    maximizes), ``foreach`` and ``fused`` (the kernel of every choice; by default each runs fused
    where torch has a fused kernel for the parameters, since fused kernels skip non-finite steps on
    the device, and otherwise as torch would run it, with a host check), ``capturable`` and
    ``differentiable`` (``False`` only: rlopt's steps are not differentiable).
    history_size: decisions kept in :attr:`history` and in checkpoints (None: all).

    compute_budget: the extra compute, in gradient evaluations beyond the cheapest choice's, as a
        share of the run's steps, that costlier choices may use (None: no limit). With SGD (cost 1)
        and SAM (cost 2), ``compute_budget=0.3`` lets SAM run on at most 30% of the run's steps, so
        the run costs at most 1.3x SGD's, whatever the policy chooses: a step whose choice would
        cross the budget runs the cheapest choice instead (counted on the host from the choices'
        costs: no device read, no host sync). Needs ``total_steps`` (exact) or ``total_epochs``
        (the run's length is then ``total_epochs`` times the first epoch's length, and the first
        epoch runs the cheapest choice, since nothing can be spent before the length is known).
        In ``[0, max cost - min cost]``. The policy sees three more features, ``budget_left``,
        ``steps_left`` and ``budget_affordable`` (see :mod:`rlopt.control.budget`), so policies
        made without a budget do not fit an optimizer with one, and the other way round. History
        entries record ``budget_used`` (share of the run's steps, comparable to
        ``compute_budget``), ``budget_spent`` (extra gradient evaluations) and
        ``budget_overridden`` (steps on which the policy's choice was replaced). Checkpoints carry
        the count (a resumed run spends exactly as the uninterrupted one); under DDP every rank
        takes the same actions and counts the same steps, so every rank's count is the same.
    """

    kind = "switching"

    def __init__(
        self,
        params: ParamsT,
        choices: ChoicesArg = ("sgd", "sam", "adam"),
        policy: Any = "ppo",
        interval: Union[str, int] = "epoch",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: Optional[float] = None,
        seed: int = 0,
        *,
        total_steps: Optional[int] = None,
        total_epochs: Optional[int] = None,
        reward: Optional[Callable[[RewardContext], float]] = None,
        train_policy: Optional[bool] = None,
        max_nonfinite_steps: Optional[int] = 20,
        signal_every: Optional[int] = None,
        share_momentum: bool = True,
        process_group: Any = "auto",
        history_size: Optional[int] = 1000,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        compute_budget: Optional[float] = None,
    ):
        check_lr(lr)
        check_momentum(momentum)
        if weight_decay is not None:
            check_weight_decay(weight_decay)
        options = _torch_options(maximize, foreach, fused, capturable, differentiable)
        if isinstance(lr, torch.Tensor) and foreach and not capturable:  # as torch's optimizers refuse it
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        specs = resolve_choices(choices, float(lr), options)
        costs = [s.cost for s in specs]
        budget = None
        if compute_budget is not None:
            run = (
                check_count(total_steps, "total_steps", allow_none=True),
                check_count(total_epochs, "total_epochs", allow_none=True),
            )
            check_budget(compute_budget, costs, *run)
            budget = ComputeBudget(compute_budget, costs, total_steps=run[0], total_epochs=run[1])
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
        super().__init__(
            params,
            defaults,
            specs,
            action_names=[s.name for s in specs],
            costs=costs,
            policy=policy,
            interval=interval,
            seed=seed,
            total_steps=total_steps,
            total_epochs=total_epochs,
            reward=reward,
            max_nonfinite_steps=max_nonfinite_steps,
            signal_every=signal_every,
            train_policy=train_policy,
            share_momentum=share_momentum,
            process_group=process_group,
            history_size=history_size,
            extra_features=BUDGET_FEATURES if budget is not None else (),
        )
        self.budget: Optional[ComputeBudget] = budget

    def _default_reward(self) -> Callable[[RewardContext], float]:
        return SwitchingReward()

    def _active(self) -> int:
        assert self.controller.action is not None  # taken at the first step
        if self.budget is None:
            return self.controller.action
        return self.budget.choose(self.controller.action, self.controller.counts)

    def _extra_features(self, signals: Signals) -> Sequence[float]:
        return () if self.budget is None else self.budget.features(self.controller.counts)

    def _history_extra(self) -> dict[str, Any]:
        return {} if self.budget is None else self.budget.history(self.controller.counts)

    def _extra_state(self) -> dict[str, Any]:
        return {} if self.budget is None else self.budget.state_dict(self.controller.counts)

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        if self.budget is not None:
            self.budget.check_state(state)
        elif state:
            raise ValueError(
                f"rlopt.extra: the checkpoint was saved with compute_budget="
                f"{state.get('compute_budget')!r}, this optimizer has none"
            )

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        if self.budget is not None and state:
            self.budget.load_state_dict(state)

    def _apply_action(self, action: int) -> None:
        pass  # the next step() runs inner optimizer `action`; nothing else changes

    @property
    def choices(self) -> tuple[ChoiceSpec, ...]:
        """The resolved choices (name, family, hyper-parameters, lr scale, cost)."""
        return self.inner.specs


def _torch_options(maximize: Any, foreach: Any, fused: Any, capturable: Any, differentiable: Any) -> dict:
    """torch's optimizer options, checked as torch checks them; the ones given reach every choice."""
    for name, value in (("maximize", maximize), ("capturable", capturable), ("differentiable", differentiable)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    for name, value in (("foreach", foreach), ("fused", fused)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool or None, got {value!r}")
    if differentiable:
        raise RuntimeError(
            "rlopt's optimizers do not support differentiable=True (their steps run under "
            "torch.no_grad and skip non-finite steps on the device)"
        )
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    options = {}
    if foreach is not None:
        options["foreach"] = foreach
    if fused is not None:
        options["fused"] = fused
    if capturable:
        options["capturable"] = True
    return options
