"""Every use of a private torch API, in one place, each with a public fallback.

rlopt leans on four torch internals to keep an ordinary step cheap and free of host syncs.
Each is wrapped here so that a torch release that drops or changes one costs a fallback (slower,
never wrong), and ``tests/test_torch_compat.py`` runs both paths:

* ``Optimizer.step``'s ``__wrapped__`` (the undecorated step): running the inner optimizers
  through it keeps one profiler range and one call of the global step hooks per user step.
  Fallback: ``opt.step()``.
* the optimizer's state-dict hook dicts (``_optimizer_state_dict_pre_hooks`` ...): silenced
  while the wrapper saves or loads its own base state, so the user's hooks run once, around
  the whole state. Fallback: the hooks run as torch runs them.
* ``torch._amp_foreach_non_finite_check_and_unscale_``, GradScaler's fused check: one kernel
  sets a flag when any tensor holds inf or NaN. Fallback: foreach norms, summed.
* ``torch._utils._flatten_dense_tensors``: one call to flatten gradients. Fallback: ``torch.cat``.
"""
from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

__all__ = ["fused_devices", "raw_step", "hooks_silenced", "non_finite_check_", "flatten", "user_stacklevel"]

_HOOK_DICTS = ("_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
               "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks")


def fused_devices() -> Tuple[str, ...]:
    """Device types with fused optimizer kernels in this torch."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # the public fallback: the devices every torch >= 2.4 has them on
        return ("cpu", "cuda")
    return tuple(_get_fused_kernels_supported_devices())


def raw_step(opt: Optimizer) -> None:
    """``opt.step()`` without torch's per-call wrapper (a profiler range and the step hooks); the
    full call where ``step`` is not wrapped, is patched on the instance or has hooks of its own."""
    step = type(opt).step
    raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if raw is None or "step" in opt.__dict__ or getattr(opt, "_optimizer_step_pre_hooks", None) or \
            getattr(opt, "_optimizer_step_post_hooks", None):
        opt.step()
    else:
        raw(opt)


class hooks_silenced:
    """Inside: ``Optimizer.state_dict`` / ``load_state_dict`` of ``opt`` run none of its
    state-dict hooks (the caller runs them around its own, larger state)."""

    def __init__(self, opt: Optimizer):
        self.opt = opt
        self.saved: Dict[str, object] = {}

    def __enter__(self) -> "hooks_silenced":
        for name in _HOOK_DICTS:
            hooks = self.opt.__dict__.get(name)
            if hooks is not None:
                self.saved[name] = hooks
                setattr(self.opt, name, type(hooks)())
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        for name, hooks in self.saved.items():
            setattr(self.opt, name, hooks)
        return False


_AMP_CHECK = getattr(torch, "_amp_foreach_non_finite_check_and_unscale_", None)


def non_finite_check_(tensors: List[torch.Tensor], flag: torch.Tensor, scale: torch.Tensor,
                      fused: bool = True, unscale: bool = False) -> None:
    """Set ``flag`` (a float32 0-dim tensor on the tensors' device) to 1 when any tensor holds a
    non-finite value; with ``unscale``, also multiply the tensors by ``scale`` in place (``scale``
    is then GradScaler's inverse scale; otherwise a tensor holding 1).

    ``fused``: GradScaler's kernel (one launch for every tensor), which raises
    ``NotImplementedError``/``RuntimeError`` where it has no kernel for a device or dtype.
    Otherwise, or without that kernel in this torch: foreach norms (a NaN or inf makes their sum
    non-finite), after the multiplication."""
    if fused and _AMP_CHECK is not None:
        _AMP_CHECK(tensors, flag, scale)
        return
    if unscale:
        torch._foreach_mul_(tensors, scale.to(tensors[0].device))
    norms = torch._foreach_norm(tensors)
    bad = (~torch.isfinite(torch.stack([n.float() for n in norms]).sum())).float()
    torch.maximum(flag, bad.to(flag.device), out=flag)


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one 1-D tensor (one device, one dtype)."""
    try:
        from torch._utils import _flatten_dense_tensors
    except ImportError:  # pragma: no cover - the public path
        return torch.cat([t.reshape(-1) for t in tensors])
    return _flatten_dense_tensors(list(tensors))


def user_stacklevel(skip: Optional[Sequence[str]] = None) -> int:
    """``stacklevel`` for a warning raised inside rlopt that points at the caller's own line
    (past rlopt's and torch's frames). Only called when a warning is raised."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the rlopt package
    inside = tuple(skip or ()) + (here, os.path.dirname(torch.__file__))
    frame: Optional[FrameType]
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
