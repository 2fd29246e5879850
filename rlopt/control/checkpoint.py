"""Checkpoints of a controlled optimizer: what :meth:`ControlledOptimizer.state_dict` holds under
``"rlopt"``, the checks :meth:`~ControlledOptimizer.load_state_dict` runs before it changes
anything, and the all-or-nothing load.

The ``"rlopt"`` entry holds a format name and version, the action and choice names and families,
each inner optimizer's state, the policy (its description and state), the signal tracker, the
controller (counters, validation metrics, history, observer) and the subclass's own ``extra``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from .torch_compat import user_stacklevel
from .validation import check_group_hparams

if TYPE_CHECKING:  # pragma: no cover
    from .base import ControlledOptimizer

__all__ = ["FORMAT", "VERSION", "check", "load"]

FORMAT = "rlopt.optimizer"
VERSION = 1


def check(opt: ControlledOptimizer, sd: Any) -> Mapping[str, Any]:
    """Raise ``ValueError`` (naming the entry) unless ``sd`` loads completely into ``opt``; return its
    ``"rlopt"`` entry. Changes nothing. An entry of a type no check foresaw gives a ``ValueError``
    too, never a raw ``TypeError`` or ``KeyError``."""
    try:
        return _check(opt, sd)
    except ValueError:
        raise
    except Exception as err:  # malformed beyond what the checks name: still the user's checkpoint
        raise ValueError(f"Not a loadable rlopt optimizer state dict: {type(err).__name__}: {err}") from None


def _check(opt: ControlledOptimizer, sd: Any) -> Mapping[str, Any]:
    if not isinstance(sd, Mapping) or not isinstance(sd.get("rlopt"), Mapping):
        keys = sorted(sd) if isinstance(sd, Mapping) else type(sd).__name__
        raise ValueError(f"Not an rlopt optimizer state dict (no 'rlopt' entry); it has keys {keys}")
    rl = sd["rlopt"]
    if rl.get("format") != FORMAT or rl.get("version") != VERSION:
        raise ValueError(
            f"rlopt.format/version is {rl.get('format')!r}/{rl.get('version')!r}; this rlopt reads "
            f"{FORMAT!r}/{VERSION} (a checkpoint of another rlopt release)"
        )
    required = (
        "kind",
        "actions",
        "choices",
        "families",
        "share_momentum",
        "inner",
        "policy",
        "tracker",
        "controller",
        "extra",
    )
    missing = [k for k in required if k not in rl]
    if missing:
        raise ValueError(f"The rlopt entry lacks {missing}")
    names = [s.name for s in opt.inner.specs]
    if rl["kind"] != opt.kind or list(rl["actions"]) != list(opt.action_names) or list(rl["choices"]) != names:
        raise ValueError(
            f"State dict is for a {rl['kind']} optimizer over actions {rl['actions']} and choices "
            f"{rl['choices']}; this one is {opt.kind} over {list(opt.action_names)} and {names}"
        )
    families = [s.family for s in opt.inner.specs]
    if list(rl["families"]) != families:
        raise ValueError(
            f"rlopt.families: the checkpoint's choices {rl['choices']} are of families "
            f"{rl['families']}; this optimizer's are of {families}"
        )
    if not isinstance(rl["share_momentum"], bool):
        raise ValueError(f"Invalid rlopt.share_momentum: {rl['share_momentum']!r}")
    groups, state = sd.get("param_groups"), sd.get("state")
    if (
        not isinstance(groups, (list, tuple))
        or len(groups) != len(opt.param_groups)
        or any(
            not isinstance(a, Mapping) or len(a.get("params", ())) != len(b["params"])
            for a, b in zip(groups, opt.param_groups)
        )
        or not isinstance(state, Mapping)
    ):
        raise ValueError(
            "param_groups: the checkpoint's groups do not match this optimizer's (another model, or other param groups)"
        )
    ids = [i for g in groups for i in g["params"]]
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise ValueError("param_groups: the parameter ids must be distinct ints")
    for group in groups:
        try:
            check_group_hparams({k: v for k, v in group.items() if k != "params"})
        except (TypeError, ValueError) as err:
            raise ValueError(f"param_groups: {err}") from None
    opt.inner.check_state(rl["inner"])
    saved, desc = rl["policy"], opt.controller.policy.describe()
    if not isinstance(saved, Mapping) or "state" not in saved:
        raise ValueError("rlopt.policy must be a dict with the policy's description and 'state'")
    for key in ("kind", "obs_dim", "action_names", "config"):
        if saved.get(key) != desc.get(key):
            raise ValueError(
                f"rlopt.policy.{key}: the saved policy's {saved.get(key)!r} differs from this "
                f"optimizer's {desc.get(key)!r}"
            )
    try:
        opt.controller.policy._check_state(saved["state"])
    except (TypeError, KeyError) as err:
        raise ValueError(f"rlopt.policy.state: {err}") from None
    try:
        opt.tracker.check_state(rl["tracker"])
    except ValueError as err:
        raise ValueError(f"rlopt.tracker: {err}") from None
    _check_tracker_shapes(opt, rl["tracker"])
    opt.controller.check_state(rl["controller"])
    if not isinstance(rl["extra"], Mapping):
        raise ValueError("rlopt.extra must be a dict")
    opt._check_extra_state(rl["extra"])
    return rl


def _check_tracker_shapes(opt: ControlledOptimizer, state: Mapping[str, Any]) -> None:
    snap = state.get("snapshot")
    if snap is None:
        return
    ids = state["snapshot_ids"]
    if any(not isinstance(i, int) or not 0 <= i < len(opt._params) for i in ids) or snap.numel() != sum(
        opt._params[i].numel() for i in ids
    ):
        raise ValueError("rlopt.tracker.snapshot does not fit this optimizer's parameters")


def load(opt: ControlledOptimizer, sd: Mapping[str, Any], rl: Mapping[str, Any]) -> None:
    """Load a state :func:`check` accepted. All or nothing: what is loaded before a failure is put
    back."""
    ctl = opt.controller
    if rl["share_momentum"] != opt.inner.share_momentum and len(opt.inner.momentum_family()) > 1:
        warnings.warn(
            f"The checkpoint was saved with share_momentum={rl['share_momentum']} and this optimizer has "
            f"share_momentum={opt.inner.share_momentum}: "
            + (
                "the SGD-family choices now share the first one's momentum buffers"
                if opt.inner.share_momentum
                else "each SGD-family choice starts from a copy of the shared buffers"
            ),
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )
    saved = {"state": opt.state, "param_groups": opt.param_groups}
    inner_snap = opt.inner.snapshot()
    tracker_snap, ctl_snap = opt.tracker.snapshot(), ctl.snapshot()
    extra_snap = opt._extra_state()
    try:
        Optimizer.load_state_dict(opt, {"state": sd["state"], "param_groups": sd["param_groups"]})
        opt.inner.groups = opt.param_groups
        opt.inner.forget_groups()
        opt.inner.load_state_dict(rl["inner"], rl["share_momentum"])
        device = opt._params[0].device if opt._params else torch.device("cpu")
        opt.tracker.load_state_dict(rl["tracker"], device)
        ctl.load_state_dict(rl["controller"])
        opt._load_extra_state(rl["extra"])
        ctl.policy.load_state_dict(rl["policy"]["state"])
        opt._epoch_end_check_at = 0
    except BaseException:
        opt.__dict__.update(saved)
        opt.inner.groups = opt.param_groups
        opt.inner.forget_groups()
        opt.inner.restore(inner_snap)
        opt.tracker.restore(tracker_snap)
        ctl.restore(ctl_snap)
        opt._load_extra_state(extra_snap)
        raise
