"""Every use of a private torch API, in one place, each with a public fallback.

rlopt leans on a few torch internals to keep an ordinary step cheap and free of host syncs.
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
* ``torch._foreach_copy_``: one call to copy gradients into a kept buffer. Fallback: ``copy_``
  tensor by tensor.
* ``torch._fused_sgd_``, the kernel behind ``SGD(fused=True)``: :func:`fused_sgd_step` calls it
  as ``SGD.step`` would, without the Python that gathers the lists (about two thirds of a small
  model's fused SGD step on the host). It runs only where the result is the same by
  construction; otherwise, or without that kernel: ``SGD.step`` itself.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any, Literal, Optional

import torch
from torch.optim import Optimizer

__all__ = [
    "fused_devices",
    "raw_step",
    "fused_sgd_step",
    "hooks_silenced",
    "non_finite_check_",
    "copy_into",
    "flatten",
    "user_stacklevel",
]

_HOOK_DICTS = (
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def fused_devices() -> tuple[str, ...]:
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
    if (
        raw is None
        or "step" in opt.__dict__
        or getattr(opt, "_optimizer_step_pre_hooks", None)
        or getattr(opt, "_optimizer_step_post_hooks", None)
    ):
        opt.step()
    else:
        raw(opt)


_FUSED_SGD = getattr(torch, "_fused_sgd_", None)
_SGD_STEP_CODE = inspect.unwrap(torch.optim.SGD.__dict__["step"]).__code__  # torch's own SGD.step
_sgd_step_seen = None  # the class attribute last found to be torch's own step (however wrapped)
# torch >= 2.5 checks the parameters' devices and dtypes at the first fused step (torch 2.4 at
# construction): until that step has run, the step is torch's
_CHECKS_AT_FIRST_STEP = hasattr(importlib.import_module("torch.optim.sgd"), "_device_dtype_check_for_fused")


def _is_torch_sgd_step(step: Any) -> bool:
    global _sgd_step_seen
    if step is _sgd_step_seen:
        return True
    if getattr(inspect.unwrap(step), "__code__", None) is _SGD_STEP_CODE:
        _sgd_step_seen = step
        return True
    return False


def fused_sgd_step(opt: Optimizer, found_inf: torch.Tensor, grads: Optional[list[torch.Tensor]] = None) -> bool:
    """Run ``opt``'s step with ``found_inf`` as ``SGD(fused=True).step`` does, with the same
    kernel and the same arguments, so the result is bit-identical; returns False, having done
    nothing, where that is not certain: not a plain fused ``torch.optim.SGD``, a step patched (on
    the instance or the class) or hooked, a first step (torch checks devices and allocates the momentum buffers), a
    parameter without a gradient or a buffer, a tensor learning rate, a group whose parameters
    are on several devices or dtypes or another device than ``found_inf``, a differentiable
    group, or under ``torch.compile``. Sparse gradients are the caller's to refuse (the
    non-finite check before every update does). ``grads``: the caller's list of every gradient
    that is not None over the optimizer's parameters in group order, if it has one; used as the
    single group's gradients when it holds one for each parameter.

    What the lists need from ``opt.state`` (each parameter's entry) is kept between calls and
    made again whenever ``opt.state`` is another dict or holds another number of entries, or the
    groups or their parameters change; the buffers themselves are read from the entries at
    every call."""
    if (
        _FUSED_SGD is None
        or type(opt) is not torch.optim.SGD
        or not _is_torch_sgd_step(type(opt).step)
        or (_CHECKS_AT_FIRST_STEP and opt.__dict__.get("_need_device_dtype_check_for_fused", True))
        or "step" in opt.__dict__
        or opt._optimizer_step_pre_hooks
        or opt._optimizer_step_post_hooks
        or _compiling()
    ):
        return False
    state, groups = opt.state, opt.param_groups
    plan = opt.__dict__.get("_rlopt_sgd_plan")
    if (
        plan is None
        or plan[0] is not state
        or plan[1] != len(state)
        or len(plan[2]) != len(groups)
        or any(
            params is not g["params"] or n != len(params) or (n and params[0].dtype is not dtype)
            for (params, n, dtype, _), g in zip(plan[2], groups)
        )
    ):
        plan = _sgd_plan(opt, found_inf)
        if plan is None:
            return False
    calls = []
    for group, (params, n, _, entries) in zip(groups, plan[2]):
        if not group["fused"] or group.get("differentiable") or isinstance(group["lr"], torch.Tensor):
            return False
        if not n:
            continue
        if grads is None or len(groups) != 1 or len(grads) != n:
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                return False
        if group["momentum"] != 0:
            if entries is None:
                return False
            bufs = [e.get("momentum_buffer") for e in entries]
            if any(b is None for b in bufs):
                return False
        else:
            bufs = []
        calls.append((params, grads, bufs, group))
    for params, grads, bufs, group in calls:
        _FUSED_SGD(
            params,
            grads,
            bufs,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            is_first_step=False,
            grad_scale=None,
            found_inf=found_inf,
        )
    return True


def _sgd_plan(opt: Optimizer, found_inf: torch.Tensor) -> Optional[tuple]:
    """``(state, len(state), [(params, len(params), dtype, state entries)] per group)`` for
    :func:`fused_sgd_step`, or None where a group's parameters are on several devices or dtypes,
    or another device than ``found_inf``. A group's entries are None while a parameter has none."""
    state, where, per_group = opt.state, found_inf.get_device(), []
    for group in opt.param_groups:
        params = group["params"]
        if params and (len({(p.dtype, p.get_device()) for p in params}) != 1 or params[0].get_device() != where):
            return None
        entries = [state[p] for p in params] if all(p in state for p in params) else None  # (none at momentum 0)
        per_group.append((params, len(params), params[0].dtype if params else None, entries))
    opt.__dict__["_rlopt_sgd_plan"] = plan = (state, len(state), per_group)
    return plan


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", None) and compiler.is_compiling())


class hooks_silenced:
    """Inside: ``Optimizer.state_dict`` / ``load_state_dict`` of ``opt`` run none of its
    state-dict hooks (the caller runs them around its own, larger state)."""

    def __init__(self, opt: Optimizer):
        self.opt = opt
        self.saved: dict[str, object] = {}

    def __enter__(self) -> hooks_silenced:
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


def non_finite_check_(
    tensors: list[torch.Tensor], flag: torch.Tensor, scale: torch.Tensor, fused: bool = True, unscale: bool = False
) -> None:
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


_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)


def copy_into(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
    """``dst.copy_(src)`` for each pair (any dtypes and devices), in one foreach call where this
    torch has one."""
    if _FOREACH_COPY is not None:
        try:
            _FOREACH_COPY(dsts, srcs)
            return
        except (RuntimeError, NotImplementedError):  # pairs it does not take (devices...): one by one
            pass
    for dst, src in zip(dsts, srcs):
        dst.copy_(src)


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
