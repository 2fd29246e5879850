"""Data-parallel runs: every rank takes the same decision.

Under ``DistributedDataParallel`` each rank holds a copy of the model and the optimizer, and the
gradients are averaged before ``step()``. The copies stay equal only if every rank runs the same
inner optimizer: a SAM step on one rank and an SGD step on another would also call ``backward``
a different number of times, and DDP would wait forever for the missing all-reduce. Yet each
rank sees its own training loss and, often, its own validation metrics.

So at each decision point (never inside an ordinary step) the ranks:

1. average their signals (:func:`reduce_signals`): the interval's training signals, and the
   validation metrics given since the last decision, over the ranks that gave them. Every
   policy then sees one observation and one reward, those of the whole global batch;
2. check that they chose the same action (:func:`agree`). They do when their policies are equal,
   which :func:`broadcast_policy` makes so at the first decision (the ranks may have been given
   different seeds). Should they ever differ, every rank takes rank 0's action and rank 0's policy.

That is three small all-reduces per decision (two in step 1, one in step 2), and one object
broadcast at the first. The policies stay on the CPU; the collectives run where the process group's backend
needs them (the model's device for NCCL).

Whether a step is skipped must not differ between ranks either. With a group the non-finite
check looks at the gradients only, which DDP has made equal on every rank, not at each rank's
own loss; and a long run of skipped steps raises at the next decision, on every rank at once.
"""

from __future__ import annotations

import math
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from ..policies.base import Policy

__all__ = [
    "outside",
    "check_group_arg",
    "resolve_group",
    "collective_device",
    "reduce_signals",
    "broadcast_policy",
    "agree",
]

AUTO = "auto"


def _dist() -> ModuleType:
    import torch.distributed as dist

    return dist


def outside(group: Any) -> bool:
    """True for what ``new_group`` returns on a rank that is not a member."""
    dist = _dist()
    return dist.is_available() and group is dist.GroupMember.NON_GROUP_MEMBER


def check_group_arg(group: Any) -> None:
    """Raise a clear error for a ``process_group`` argument that is none of the accepted kinds."""
    if group is None or (isinstance(group, str) and group == AUTO) or outside(group):
        return
    if isinstance(group, str):
        raise ValueError(f"Invalid process_group: {group!r} (expected 'auto', None or a ProcessGroup)")
    dist = _dist()
    if not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(f"Invalid process_group: {group!r} (expected 'auto', None or a ProcessGroup)")


def resolve_group(group: Any) -> Optional[ProcessGroup]:
    """The group whose ranks must agree, or None when there is nothing to keep in step.

    ``"auto"``: torch.distributed's default group, when it is initialised with more than one
    rank. ``None``: no synchronisation (each rank decides alone, e.g. independent runs). A
    ``ProcessGroup``: that group, when it has more than one rank; on a rank outside it (what
    ``new_group`` returns there), None.
    """
    if group is None or outside(group):
        return None
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(group, str):  # "auto"
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def collective_device(group: Optional[ProcessGroup], device: torch.device) -> torch.device:
    """Where the group's collectives take their tensors: the CPU for gloo (and MPI), else the
    model's ``device`` (NCCL and other device backends), falling back to the current CUDA device."""
    backend = str(_dist().get_backend(group))
    if "gloo" in backend or backend == "mpi":
        return torch.device("cpu")
    if device.type != "cpu":
        return device
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _source(group: Optional[ProcessGroup]) -> int:
    """Global rank of the group's first rank."""
    dist = _dist()
    if group is None or group is dist.group.WORLD:
        return 0
    return dist.get_global_rank(group, 0)


def reduce_signals(
    means: dict[str, float], maxima: dict[str, float], group: Optional[ProcessGroup], device: torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """Average ``means`` over the ranks that have a value (NaN: none; infinities count) and take
    the maximum of ``maxima``: one all-reduce each, on ``device``."""
    dist = _dist()
    keys = list(means)
    values = torch.tensor([means[k] for k in keys], dtype=torch.float64)
    given = ~torch.isnan(values)
    packed = torch.stack([torch.where(given, values, torch.zeros_like(values)), given.double()]).to(device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total, count = packed.cpu().tolist()
    averaged = {k: (s / n if n > 0 else math.nan) for k, s, n in zip(keys, total, count)}
    mkeys = list(maxima)
    top = torch.tensor([float(maxima[k]) for k in mkeys], dtype=torch.float64, device=device)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    return averaged, dict(zip(mkeys, top.cpu().tolist()))


def broadcast_policy(policy: Policy, group: Optional[ProcessGroup], device: torch.device) -> None:
    """Give every rank the first rank's policy state (networks, optimizer, buffers, RNG)."""
    dist = _dist()
    holder: list[Any] = [policy.state_dict() if dist.get_rank(group) == 0 else None]
    dist.broadcast_object_list(holder, src=_source(group), group=group, device=device if device.type != "cpu" else None)
    if dist.get_rank(group) != 0:
        policy.load_state_dict(holder[0])


def agree(action: int, policy: Policy, group: Optional[ProcessGroup], device: torch.device) -> int:
    """The action every rank takes: this rank's when all chose alike (the usual case); else the
    first rank's, whose policy state every rank then adopts."""
    dist = _dist()
    first = dist.get_rank(group) == 0
    t = torch.tensor([action, -action, action if first else -1], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    high, low, chosen = t.cpu().tolist()
    if high != -low:
        warnings.warn(
            "The ranks' policies chose different actions at this decision; every rank now takes the "
            "first rank's action and policy state",
            RuntimeWarning,
            stacklevel=3,
        )
        broadcast_policy(policy, group, device)
    return int(chosen)
