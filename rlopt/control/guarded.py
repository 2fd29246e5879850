"""The guarded step: a step whose loss or gradient is not finite never reaches the parameters.

:func:`prepare` accounts the step's loss, checks its gradients (and, for SAM, runs the ascent and
the second pass, whose loss gives the sharpness signal with the first group's rho) and returns a
0/1 flag on the device; :func:`apply` then runs the inner optimizer. Fused torch kernels read the
flag as ``found_inf`` (the mechanism GradScaler uses) and skip the update on the device; where a
choice runs unfused the flag is read on the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, cast

import torch

from . import torch_compat as _tc
from .inner import InnerSet
from .signals import SignalTracker
from .torch_compat import raw_step

if TYPE_CHECKING:
    from ..optim.sam import SAM

__all__ = ["prepare", "apply"]


def prepare(
    inner: InnerSet,
    i: int,
    params: list[torch.Tensor],
    tracker: SignalTracker,
    closure: Optional[Callable[[], Any]],
    loss: Any,
    *,
    loss_skips: bool,
    grad_scale: Optional[torch.Tensor] = None,
    scaler_inf: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
    """Check choice ``i``'s step before its update; returns the skip flag and the gradients the
    update will use, in ``params`` order (None where a second pass made new ones). ``grad_scale`` and
    ``scaler_inf``: a GradScaler's scale (the gradients are unscaled in place, in the check's
    kernel) and overflow flag. On an exception the step is forgotten by the tracker."""
    grads = [p.grad for p in params if p.grad is not None]
    device = grads[0].device if grads else (params[0].device if params else torch.device("cpu"))
    try:
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        flag = tracker.begin(grads, loss, device, loss_skips=loss_skips, inv_scale=inv_scale, found_inf=scaler_inf)
        tracker.probe(params, flag)
        if inner.specs[i].needs_closure:  # SAM: ascend, evaluate again, come back
            sam = cast("SAM", inner.optimizers[i])
            assert closure is not None  # a choice that needs one is only taken with a closure
            norm = sam.grad_norm()
            sam.first_step(zero_grad=True, grad_norm=norm, found_inf=flag)
            try:
                with torch.enable_grad():
                    perturbed = closure()
            finally:
                sam.restore()
            if norm is not None:  # L(w + e) against L(w): the sharpness signal, for free
                perturbed = perturbed[0] if isinstance(perturbed, (tuple, list)) and perturbed else perturbed
                tracker.add_sharpness(perturbed, norm * sam.param_groups[0]["rho"])
            tracker.check([p.grad for p in params if p.grad is not None], flag)  # the second gradient too
            return flag, None  # (the update reads the second pass's gradients)
    except BaseException:
        tracker.cancel()
        raise
    return flag, grads


def apply(inner: InnerSet, i: int, flag: torch.Tensor, grads: Optional[list[torch.Tensor]] = None) -> None:
    """Run choice ``i``'s update, skipped where ``flag`` is 1. ``grads``: what :func:`prepare`
    returned (saves gathering them again)."""
    opt = inner.optimizers[i]
    # Any: found_inf (set below) is read by torch's fused kernels but not declared by Optimizer
    target: Any = cast("SAM", opt).base_optimizer if inner.specs[i].needs_closure else opt
    if inner.fused[i]:
        if _tc.fused_sgd_step(target, flag, grads):
            return
        target.found_inf = flag
        try:
            raw_step(target)
        finally:  # None, as torch reads it (getattr(opt, "found_inf", None)); a delattr breaks torch.compile
            target.found_inf = None
    elif not bool(flag):  # host check: only where no fused kernel runs
        raw_step(target)
