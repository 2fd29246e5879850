"""A sharpness signal from what SAM computes anyway.

SAM evaluates the loss at ``w`` and at ``w + e`` with ``e = rho g / |g|``. The first-order part of
the difference is ``rho |g|``, so

.. code-block:: text

    sharpness = (L(w + e) - L(w)) / (rho |g|)

is 1 on a linear loss and grows with the curvature along the gradient: on a quadratic
``L = w'Aw / 2`` it is exactly ``1 + rho g'Ag / (2 |g|^3)``. Both functions here return a 0-dim
tensor on the loss's device and never read it on the host, so they add no host sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import torch

__all__ = ["sharpness_estimate", "measure_sharpness"]


def sharpness_estimate(
    loss: torch.Tensor, perturbed_loss: torch.Tensor, rho: float, grad_norm: torch.Tensor
) -> torch.Tensor:
    """``(L(w + e) - L(w)) / (rho |g|)`` for SAM's step ``e = rho g / |g|``, on the device (NaN
    where ``rho |g|`` is 0)."""
    if not rho > 0:
        raise ValueError(f"Invalid rho: {rho} (the estimate needs rho > 0)")
    loss = torch.as_tensor(loss).detach()
    dtype = torch.promote_types(loss.dtype, torch.float32)  # half-precision losses cancel too much
    loss = loss.to(dtype)
    denom = rho * torch.as_tensor(grad_norm, device=loss.device).detach().to(dtype)
    diff = torch.as_tensor(perturbed_loss, device=loss.device).detach().to(dtype) - loss
    return torch.where(denom > 0, diff / denom, torch.full_like(diff, float("nan")))


def measure_sharpness(
    params: Iterable[torch.nn.Parameter], closure: Callable[[], Any], rho: float = 0.05
) -> torch.Tensor:
    """Probe the sharpness at the current weights with two closure calls (the cost of a SAM step
    without its update): the loss and gradient at ``w``, the loss at ``w + rho g / |g|``. The
    weights are restored by copy (bit-exact) and the gradients are those of ``w``, as after one
    plain closure call. ``closure`` follows torch's convention (clears the gradients, computes the
    loss, calls ``backward()``, returns the loss). Returns a 0-dim tensor on the loss's device."""
    params = [p for p in params if p.requires_grad]
    with torch.enable_grad():
        loss = closure()
    loss = loss[0] if isinstance(loss, (tuple, list)) else loss
    live = [p for p in params if p.grad is not None]
    if not live:
        raise RuntimeError("measure_sharpness: the closure left no gradient on the parameters")
    with torch.no_grad():
        grads = [g.detach().clone() for g in (p.grad for p in live) if g is not None]
        dtype = torch.promote_types(grads[0].dtype, torch.float32)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.to(dtype)) for g in grads]))
        scale = rho / norm.clamp_min(torch.finfo(torch.float32).tiny)
        saved = [p.detach().clone() for p in live]
        try:
            for p, g in zip(live, grads):
                p.add_(g * scale.to(g.dtype))
            with torch.enable_grad():
                perturbed = closure()
        finally:
            for p, w, g in zip(live, saved, grads):
                p.copy_(w)
                p.grad = g
    perturbed = perturbed[0] if isinstance(perturbed, (tuple, list)) else perturbed
    return sharpness_estimate(loss, perturbed, rho, norm)
