"""Sharpness-Aware Minimization (SAM) around any torch optimizer."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch.optim import Optimizer

from ..control.torch_compat import hooks_silenced, raw_step
from ..control.validation import check_group_hparams

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

_TensorList = Union[list[torch.Tensor], tuple[torch.Tensor, ...]]  # what torch's foreach kernels take

__all__ = ["SAM"]


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization (Foret et al., ICLR 2021), wrapping a base optimizer.

    .. code-block:: text

        g   = grad L(w)                          # first pass (closure)
        e   = rho * g / ||g||                    # adaptive: e = rho * w^2 g / ||w g||
        g'  = grad L(w + e)                      # second pass (closure again)
        w   = base_step(w, g')                   # e.g. SGD with momentum, at the original w

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        base_optimizer: the optimizer *class* that makes the update (``torch.optim.SGD`` by default).
        rho: neighbourhood radius (default 0.05). ``rho=0`` is the base optimizer with twice the cost.
        adaptive: ASAM (Kwon et al., 2021): the perturbation is scaled elementwise by ``w^2``
            and normalised by ``||w g||`` (``|w|``-scaled gradient), ``e = rho * w^2 g / ||w g||``
            as above, so that ``|| e / |w| || = rho`` (a radius in scale-invariant units).
        **kwargs: hyper-parameters of the base optimizer (``lr``, ``momentum``, ...).

    ``step(closure)`` follows the torch closure convention (as ``LBFGS``): the closure clears
    the gradients, computes the loss, calls ``backward()`` and returns the loss. SAM calls it
    twice, at ``w`` and at ``w + e``, and returns the first loss. The phases are also public,
    named as in the paper, for loops that compute the first gradient themselves::

        loss_fn(model(x), y).backward()
        sam.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        sam.second_step(zero_grad=True)

    Example:
        >>> sam = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> def closure():
        ...     sam.zero_grad()
        ...     loss = loss_fn(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = sam.step(closure)

    Note:
        Departs from the widely copied reference implementation (``davda54/sam``) where that one
        loses information: ``step`` returns the loss, ``state_dict`` holds the base optimizer's
        state (momentum buffers, Adam moments), deepcopy and pickle keep the base optimizer, the
        weights are restored by copy (bit-exact, not ``w + e - e``) and are restored even when
        the second pass raises.
    """

    base_optimizer: Optimizer
    _moved: Optional[list[tuple[list[torch.Tensor], list[torch.Tensor]]]]

    def __init__(
        self,
        params: ParamsT,
        base_optimizer: type = torch.optim.SGD,
        rho: float = 0.05,
        adaptive: bool = False,
        **kwargs: Any,
    ) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (numbers.Real, torch.Tensor)):
            raise TypeError(f"Invalid rho: {rho} (expected a float)")
        if isinstance(rho, torch.Tensor) and rho.numel() != 1:
            raise ValueError(f"Invalid rho: a tensor rho must have one element, got shape {tuple(rho.shape)}")
        if not 0.0 <= rho < math.inf:
            raise ValueError(f"Invalid rho: {float(rho)}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        check_group_hparams(kwargs)  # torch's own check (lr < 0) lets NaN through
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer subclass, got {base_optimizer!r}")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        # The base optimizer works on the very same group dicts: an LR scheduler on SAM reaches it.
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    # ------------------------------------------------------------------ phases
    def _params_with_grad(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def grad_norm(self) -> Optional[torch.Tensor]:
        """Global L2 norm of the gradients (of ``|w| * g`` in adaptive groups), on device."""
        norms: list[torch.Tensor] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError(
                    "SAM does not support sparse gradients (from nn.Embedding(sparse=True) or "
                    "nn.EmbeddingBag(sparse=True)); build those layers with sparse=False"
                )
            grads: _TensorList = [p.grad for p in params]
            if group["adaptive"]:
                grads = torch._foreach_mul(torch._foreach_abs(params), grads)
            norms.extend(torch._foreach_norm(grads))
        if not norms:
            return None
        device = norms[0].device
        if not all(n.device == device and n.dtype == torch.float32 for n in norms):
            norms = [n.to(device, torch.float32) for n in norms]
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def first_step(
        self,
        zero_grad: bool = False,
        grad_norm: Optional[torch.Tensor] = None,
        found_inf: Optional[torch.Tensor] = None,
    ) -> None:
        """Move to ``w + e``; keep a copy of ``w``. ``grad_norm`` may be passed if already known.

        ``found_inf``: a 0-dim flag on the device, 1 when this step will be skipped (a non-finite
        gradient), as a GradScaler or :class:`RLSwitchingOptimizer` computes it. Then the weights
        stay at ``w``, so the second pass of a skipped step sees finite weights (and leaves
        batch-norm statistics finite), and any non-finite entry of ``e`` is 0. Decided on the
        device, without a host sync; it costs one buffer the size of the parameters, kept
        between steps, and a few more kernels per step.
        """
        self.restore()  # a first step not followed by restore() (an interrupted step) is undone first
        if grad_norm is None:
            grad_norm = self.grad_norm()
        moved = []
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            backups = []
            for p in params:  # the copies of w stay allocated from step to step
                state = self.state[p]
                old = state.get("old_p")
                if old is None or old.shape != p.shape or old.dtype != p.dtype or old.device != p.device:
                    old = state["old_p"] = torch.empty_like(p, memory_format=torch.preserve_format)
                backups.append(old)
            torch._foreach_copy_(backups, params)
            assert grad_norm is not None  # a parameter has a gradient
            scale = group["rho"] / (grad_norm.to(params[0].device) + 1e-12)
            grads = [p.grad for p in params]
            if found_inf is not None:
                self._perturb_finite(gi, params, grads, scale, found_inf, group["adaptive"])
                moved.append((params, backups))
                continue
            # e = (w^2 * g) * scale, in the order the reference SAM multiplies (floating-point
            # products are not associative: another order differs in the last bit on some inputs)
            e_w: _TensorList
            if group["adaptive"]:
                e_w = torch._foreach_mul(params, params)  # w^2 as torch.pow(w, 2) computes it
                torch._foreach_mul_(e_w, grads)
                torch._foreach_mul_(e_w, scale)
            elif zero_grad:  # the gradients are dropped next: scale them in place, no new buffers
                e_w = grads
                torch._foreach_mul_(e_w, scale)
            else:
                e_w = torch._foreach_mul(grads, scale)
            torch._foreach_add_(params, e_w)
            moved.append((params, backups))
        self._moved = moved
        if zero_grad:
            self.zero_grad()

    def _perturb_finite(
        self,
        gi: int,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        scale: torch.Tensor,
        found_inf: torch.Tensor,
        adaptive: bool,
    ) -> None:
        """``w += e`` with ``e`` computed in flat buffers (one per device and dtype) so that one
        kernel can zero its non-finite entries; ``e = 0`` where ``found_inf`` is 1. For finite
        gradients the result is bit-identical to the plain path."""
        for flat, views, idx in self._flat_views(gi, params):
            sub = [params[i] for i in idx]
            if adaptive:  # (w^2 * g) * scale, the reference's order, as in first_step
                w2 = torch._foreach_mul(sub, sub)
                torch._foreach_mul_(w2, [grads[i] for i in idx])
                torch._foreach_copy_(views, w2)
            else:
                torch._foreach_copy_(views, [grads[i] for i in idx])
            keep = scale.to(flat.device) * (1 - found_inf.to(flat.device, scale.dtype))
            flat.mul_(keep)
            flat.nan_to_num_(0.0, 0.0, 0.0)
            torch._foreach_add_(sub, views)

    def _flat_views(
        self, gi: int, params: Sequence[torch.Tensor]
    ) -> list[tuple[torch.Tensor, list[torch.Tensor], list[int]]]:
        """Per device and dtype: a flat buffer and one view of it per parameter, with the
        parameter's own strides where it is dense (so foreach kernels keep their fast path);
        kept between steps and rebuilt when the parameters with a gradient change."""
        key = tuple((id(p), p.shape, p.stride(), p.dtype, p.device) for p in params)
        cache = self.__dict__.setdefault("_flat_cache", {})
        hit = cache.get(gi)
        if hit is not None and hit[0] == key:
            return hit[1]
        parts: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            parts.setdefault((p.device, p.dtype), []).append(i)
        out = []
        for (device, dtype), idx in parts.items():
            flat = torch.empty(sum(params[i].numel() for i in idx), dtype=dtype, device=device)
            views, offset = [], 0
            for i in idx:
                p = params[i]
                chunk = flat.narrow(0, offset, p.numel())
                dense = (
                    p.is_contiguous()
                    or p.is_contiguous(memory_format=torch.channels_last)
                    or (p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d))
                )
                views.append(chunk.as_strided(p.shape, p.stride()) if dense else chunk.view(p.shape))
                offset += p.numel()
            out.append((flat, views, idx))
        cache[gi] = (key, out)
        return out

    @torch.no_grad()
    def restore(self) -> None:
        """Return the weights to ``w`` (bit-exact) after :meth:`first_step`; a no-op otherwise."""
        moved, self._moved = self.__dict__.get("_moved"), None
        for params, backups in moved or ():
            torch._foreach_copy_(params, backups)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and let the base optimizer step with the gradient taken at ``w + e``."""
        self.restore()
        raw_step(self.base_optimizer)  # SAM's own step already ran the step hooks and profiler range
        if zero_grad:
            self.zero_grad()

    # the closure returns the loss tensor (torch's annotation says float)
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise RuntimeError(
                "SAM needs a closure: step(closure) where the closure clears the gradients, "
                "computes the loss, calls backward() and returns the loss"
            )
        closure = torch.enable_grad()(closure)
        loss = closure()
        self.first_step(zero_grad=True)
        try:
            closure()
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry ``rho`` and ``adaptive``); SAM's own
        state-dict hooks run around it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        with hooks_silenced(self.base_optimizer):
            sd = self.base_optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        with hooks_silenced(self.base_optimizer):
            self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def add_param_group(self, param_group: dict) -> None:
        if isinstance(param_group, dict):
            check_group_hparams(param_group)
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["base_optimizer"] = self.base_optimizer
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "base_optimizer" in state:
            self.param_groups = self.base_optimizer.param_groups
