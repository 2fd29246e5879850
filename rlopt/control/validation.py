"""One home for argument checks: one rule per quantity, torch's wording and exception types.

Numbers are accepted as torch accepts them: Python and NumPy scalars, and (where torch takes
one, as for the learning rate) a one-element tensor. Booleans are never numbers here, and a
string that ``float()`` would parse is not one either.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Optional, overload

import torch

__all__ = [
    "is_real",
    "check_lr",
    "check_momentum",
    "check_weight_decay",
    "check_betas",
    "check_nonneg",
    "check_count",
    "check_seed",
    "check_bool",
    "check_group_hparams",
]


def is_real(value: Any) -> bool:
    """A real number (Python or NumPy scalar) or a one-element real tensor; not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Real) and not _is_numpy_bool(value)


def _is_numpy_bool(value: Any) -> bool:
    return type(value).__name__ == "bool_" and type(value).__module__ == "numpy"


def _as_float(value: Any, what: str) -> float:
    if not is_real(value):
        raise TypeError(f"Invalid {what}: {value!r} (expected a float)")
    return float(value)


def check_lr(lr: Any, *, positive: bool = False) -> None:
    """``0 <= lr < inf`` (``positive``: ``0 < lr``). A one-element tensor is accepted, as torch's
    optimizers accept one; it is read on the host once, here."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    value = _as_float(lr, "learning rate")
    if not (0.0 < value if positive else 0.0 <= value) or math.isinf(value) or math.isnan(value):
        raise ValueError(f"Invalid learning rate: {value}")


def check_momentum(momentum: Any, *, below_one: bool = True) -> float:
    """``0 <= momentum < 1`` (``below_one=False``: any finite non-negative value, as torch's SGD)."""
    value = _as_float(momentum, "momentum value")
    if not (0.0 <= value and (value < 1.0 if below_one else math.isfinite(value))):
        raise ValueError(f"Invalid momentum value: {value}")
    return value


def check_weight_decay(weight_decay: Any) -> float:
    value = _as_float(weight_decay, "weight_decay value")
    if not 0.0 <= value < math.inf:
        raise ValueError(f"Invalid weight_decay value: {value}")
    return value


def check_nonneg(value: Any, what: str) -> float:
    """A finite value ``>= 0`` (rho, eps, dampening, ...)."""
    number = _as_float(value, what)
    if not 0.0 <= number < math.inf:
        raise ValueError(f"Invalid {what}: {number}")
    return number


def check_betas(betas: Any) -> None:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise TypeError(f"Invalid betas: {betas!r} (expected a pair of floats)") from None
    for index, beta in enumerate((b1, b2)):
        value = _as_float(beta, f"beta parameter at index {index}")
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {value}")


@overload
def check_count(value: Any, what: str, *, minimum: int = 1, allow_none: Literal[False] = False) -> int: ...
@overload
def check_count(value: Any, what: str, *, minimum: int = 1, allow_none: bool) -> Optional[int]: ...
def check_count(value: Any, what: str, *, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    """An integer (Python or NumPy) ``>= minimum``; returned as a Python int."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"Invalid {what}: {value!r} (expected an int)")
    if int(value) < minimum:
        raise ValueError(f"Invalid {what}: {int(value)}")
    return int(value)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise ValueError(f"Invalid seed: {seed} (torch seeds are 64-bit)")
    return seed


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be a bool, got {value!r}")
    return value


def check_group_hparams(group: Any) -> None:
    """The hyper-parameters a param-group dict sets, by the rules above (a key absent is fine).
    Used at construction and by ``add_param_group``, for every rlopt optimizer."""
    if "lr" in group:
        check_lr(group["lr"])
    if "momentum" in group:
        check_momentum(group["momentum"])
    if group.get("weight_decay") is not None:
        check_weight_decay(group["weight_decay"])
    if "betas" in group:
        check_betas(group["betas"])
    for key in ("rho", "eps", "dampening"):
        if key in group:
            check_nonneg(group[key], key)
    for key in ("nesterov", "amsgrad", "adaptive", "maximize"):
        if key in group and not isinstance(group[key], bool):
            raise TypeError(f"{key} must be a bool, got {group[key]!r}")
