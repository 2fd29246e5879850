"""The inner optimizers of a controlled optimizer, kept in step with the wrapper's param groups.

:class:`InnerSet` builds one torch optimizer per choice over the wrapper's parameters, picks the
kernel each runs (fused where it skips non-finite steps on the device, else torch's own choice
with a host check), carries the wrapper groups' values to the inner group that steps next
(:meth:`InnerSet.sync`), lets the SGD-family choices share one momentum buffer per parameter,
and owns their checkpoint: :meth:`InnerSet.check_state` refuses a state that does not fit
before :meth:`InnerSet.load_state_dict` changes anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch.optim import Optimizer

from .choices import ChoiceSpec
from .torch_compat import fused_devices, user_stacklevel

__all__ = ["InnerSet"]

#: group keys that say how an optimizer runs on this machine, not what it has learnt
_KERNEL_KEYS = ("fused", "foreach", "capturable", "differentiable")


def _dense(p: torch.Tensor) -> bool:
    return p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))


def fused_refusal(params: Sequence[torch.Tensor]) -> Optional[str]:
    """Why torch's fused kernels cannot step ``params`` (None: they can). Checked as torch checks
    at ``step()``: floating point (not complex), strided and dense, on a device with fused
    kernels. Non-contiguous views are refused too: the fused CPU kernels mis-step them."""
    devices = fused_devices()
    for p in params:
        if not p.requires_grad:
            continue
        if not p.is_floating_point():
            return f"a parameter of dtype {p.dtype}"
        if p.layout != torch.strided:
            return f"a parameter of layout {p.layout}"
        if p.device.type not in devices:
            return f"a parameter on {p.device.type}"
        if not _dense(p):
            return "a non-contiguous parameter"
    return None


class InnerSet:
    """One torch optimizer per choice, over the wrapper's parameters (see module doc).

    Args:
        specs: the resolved choices.
        groups: the wrapper's param groups (the dicts themselves: LR schedulers edit them).
        explicit: per wrapper group, the keys its user dict set (they win over the choice's).
        defaults: the wrapper's defaults (its ``weight_decay`` applies to every choice).
        share_momentum: the SGD-family choices share one momentum buffer per parameter.
    """

    def __init__(
        self,
        specs: Sequence[ChoiceSpec],
        groups: list[dict[str, Any]],
        explicit: list[dict[str, Any]],
        defaults: Mapping[str, Any],
        share_momentum: bool,
    ):
        self.specs: tuple[ChoiceSpec, ...] = tuple(specs)
        self.groups, self.explicit, self.defaults = groups, explicit, defaults
        self.share_momentum = share_momentum
        self.optimizers: list[Optimizer] = []
        self.fused: list[bool] = []
        for spec in self.specs:
            inner, fused = self._build(spec)
            self.optimizers.append(inner)
            self.fused.append(fused)
        self.link_momentum()
        self.needs_closure = any(s.needs_closure for s in self.specs)
        self._follow: dict[tuple[int, int], tuple[str, ...]] = {}

    # ---------------------------------------------------------------- building
    def _inner_groups(self, spec: ChoiceSpec) -> list[dict[str, Any]]:
        return [spec.inner_group(g, e, self.defaults) for g, e in zip(self.groups, self.explicit)]

    def _build(self, spec: ChoiceSpec) -> tuple[Optimizer, bool]:
        cls = spec.kind.optimizer
        extra = {"base_optimizer": torch.optim.SGD} if spec.needs_closure else {}
        options = dict(spec.options)
        wants = options.get("fused")
        params = [p for g in self.groups for p in g["params"]]
        refusal = fused_refusal(params)
        if wants and not spec.kind.fused_found_inf:
            raise ValueError(
                f"Choice '{spec.name}': rlopt does not run family '{spec.family}' fused (its fused "
                "step is not known to skip on found_inf)"
            )
        if wants and refusal:
            raise RuntimeError(f"Choice '{spec.name}': `fused=True` cannot step {refusal}")
        fused = (
            wants is not False
            and spec.kind.fused_found_inf
            and not options.get("foreach")
            and options.get("foreach") is not False
            and not options.get("differentiable")
            and refusal is None
        )
        if fused:
            try:
                inner = cls(self._inner_groups(spec), **{**options, "fused": True}, **extra)
            except (RuntimeError, ValueError, TypeError):
                if wants:
                    raise
                fused = False
        if not fused:
            inner = cls(self._inner_groups(spec), **options, **extra)
            why = refusal or "its options" if spec.kind.fused_found_inf else "its family has no known fused step"
            warnings.warn(
                f"Choice '{spec.name}' runs without fused kernels here ({why}): non-finite steps are "
                "detected with a host synchronisation at every step",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        self._prepare_state(inner)
        return inner, fused

    def add_group(self, index: int) -> None:
        """Wrapper group ``index`` was added: it reaches every inner optimizer. A group that fused
        kernels cannot step makes every choice fall back (with the usual warning)."""
        group, explicit = self.groups[index], self.explicit[index]
        refusal = fused_refusal(group["params"])
        for i, (spec, inner) in enumerate(zip(self.specs, self.optimizers)):
            inner_group = spec.inner_group(group, explicit, self.defaults)
            if refusal is not None and self.fused[i]:
                if spec.options.get("fused"):
                    raise RuntimeError(f"Choice '{spec.name}': `fused=True` cannot step {refusal}")
                inner.add_param_group(inner_group)
                for g in getattr(inner, "base_optimizer", inner).param_groups:
                    g["fused"] = False
                self.fused[i] = False
                warnings.warn(
                    f"Choice '{spec.name}' runs without fused kernels from now on ({refusal}): "
                    "non-finite steps are detected with a host synchronisation at every step",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            else:
                inner.add_param_group(inner_group)
            self._prepare_state(inner)
        self._follow.clear()

    def momentum_family(self) -> list[int]:
        """Indices of the choices whose update is an SGD step (``sgd``, and ``sam`` over SGD)."""
        return [
            i for i, o in enumerate(self.optimizers) if isinstance(getattr(o, "base_optimizer", o), torch.optim.SGD)
        ]

    def link_momentum(self) -> None:
        """With ``share_momentum``, the SGD-family choices use one state dict: a switch between
        SGD and SAM carries the velocity on instead of resuming a stale or zero buffer."""
        family = self.momentum_family()
        if not self.share_momentum or len(family) < 2:
            return
        first = self.optimizers[family[0]]
        shared = getattr(first, "base_optimizer", first).state
        for i in family[1:]:
            getattr(self.optimizers[i], "base_optimizer", self.optimizers[i]).state = shared

    @staticmethod
    def _prepare_state(inner: Optimizer) -> None:
        """Zero momentum buffers up front for SGD-like inner optimizers: torch's first momentum
        step sets ``buf = grad``, the same number as ``0.9 * 0 + grad``, and a first step skipped
        on the device would otherwise leave an uninitialised buffer behind."""
        target = getattr(inner, "base_optimizer", inner)
        if not isinstance(target, torch.optim.SGD):
            return
        for group in target.param_groups:
            if group.get("dampening", 0) != 0 or not group.get("momentum", 0):
                continue
            for p in group["params"]:
                if p.requires_grad and target.state[p].get("momentum_buffer") is None:
                    target.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    # ----------------------------------------------------------------- stepping
    def sync(self, i: int, lr_factor: float = 1.0, wd_factor: Optional[float] = None) -> None:
        """Carry the wrapper groups' values to choice ``i``'s inner groups: ``lr`` (times the
        choice's scale and ``lr_factor``) and every hyper-parameter it takes from the wrapper
        group (see :mod:`rlopt.control.choices`); ``wd_factor`` scales the weight decay."""
        spec, inner = self.specs[i], self.optimizers[i]
        scale = spec.lr_scale * lr_factor
        for k, (group, inner_group) in enumerate(zip(self.groups, inner.param_groups)):
            lr = group["lr"]
            inner_group["lr"] = lr if scale == 1.0 else lr * scale
            keys = self._follow.get((i, k))
            if keys is None:
                keys = self._follow[(i, k)] = self._followed(spec, group, k)
            for key in keys:
                value = group[key]
                if value is not None:  # weight_decay=None: the family's own default stays
                    inner_group[key] = value
            if wd_factor is not None:
                inner_group["weight_decay"] = group["weight_decay"] * wd_factor

    def _followed(self, spec: ChoiceSpec, group: Mapping[str, Any], index: int) -> tuple[str, ...]:
        explicit = self.explicit[index] if index < len(self.explicit) else {}
        hp = spec.kind.defaults
        wanted = {k for k in explicit if k in hp and k != "lr"}
        if spec.kind.follows_momentum and not spec.pins_momentum:
            wanted.add("momentum")
        if "betas" in hp and "betas" not in spec.hparams and "betas" in self.defaults:
            wanted.add("betas")  # a wrapper with betas (OneCycleLR cycles beta1 there)
        if "weight_decay" in hp and "weight_decay" not in spec.hparams:
            wanted.add("weight_decay")
        if "maximize" in hp and "maximize" not in spec.hparams:
            wanted.add("maximize")
        return tuple(sorted(k for k in wanted if k in group))

    def forget_groups(self) -> None:
        """The wrapper's group dicts were replaced (a checkpoint was loaded)."""
        self._follow.clear()

    # -------------------------------------------------------------- checkpoints
    def state_dict(self) -> list[dict[str, Any]]:
        return [o.state_dict() for o in self.optimizers]

    def check_state(self, saved: Any) -> None:
        """Raise ``ValueError`` (naming the entry) unless ``saved`` fits these optimizers: one
        entry per choice, the same groups and parameter counts, per-parameter tensors shaped as
        their parameters. Changes nothing."""
        if not isinstance(saved, (list, tuple)) or len(saved) != len(self.optimizers):
            raise ValueError(
                f"rlopt.inner must hold one state per choice ({len(self.optimizers)}), got "
                f"{len(saved) if isinstance(saved, (list, tuple)) else type(saved).__name__}"
            )
        for spec, inner, sd in zip(self.specs, self.optimizers, saved):
            where = f"rlopt.inner[{spec.name!r}]"
            if (
                not isinstance(sd, Mapping)
                or not isinstance(sd.get("state"), Mapping)
                or not isinstance(sd.get("param_groups"), (list, tuple))
            ):
                raise ValueError(f"{where} must be an optimizer state dict with 'state' and 'param_groups'")
            groups = inner.param_groups
            if len(sd["param_groups"]) != len(groups) or any(
                not isinstance(a, Mapping)
                or not isinstance(a.get("params"), (list, tuple))
                or len(a["params"]) != len(b["params"])
                for a, b in zip(sd["param_groups"], groups)
            ):
                raise ValueError(f"{where}'s parameter groups do not match this optimizer's")
            ids = [i for g in sd["param_groups"] for i in g["params"]]
            if any(isinstance(i, bool) or not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
                raise ValueError(f"{where}'s parameter ids must be distinct ints")
            for g in sd["param_groups"]:
                for key, value in g.items():
                    if key in ("momentum", "dampening", "lr", "weight_decay", "eps", "rho") and not (
                        isinstance(value, (int, float, torch.Tensor)) and not isinstance(value, bool)
                    ):
                        raise ValueError(f"{where}.param_groups[{key!r}] is {value!r}, not a number")
            params = dict(zip(ids, (p for g in groups for p in g["params"])))
            fresh = type(inner).__name__ in ("Adam", "AdamW")
            for index, entry in sd["state"].items():
                if index not in params or not isinstance(entry, Mapping):
                    raise ValueError(f"{where} has state for an unknown parameter {index!r}")
                if fresh and entry and "step" not in entry:
                    raise ValueError(f"{where}.state[{index}] lacks 'step'")
                for name, value in entry.items():
                    if not (
                        isinstance(value, torch.Tensor)
                        or value is None
                        or (isinstance(value, (int, float)) and not isinstance(value, bool))
                    ):
                        raise ValueError(f"{where}.state[{index}][{name!r}] is {value!r}, not a tensor or number")
                    if name == "step" and value is None:
                        raise ValueError(f"{where}.state[{index}]['step'] is None")
                    if name == "momentum_buffer" and not (value is None or isinstance(value, torch.Tensor)):
                        raise ValueError(f"{where}.state[{index}]['momentum_buffer'] must be a tensor or None")
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[index].shape:
                        raise ValueError(
                            f"{where}.state[{index}][{name!r}] has shape {tuple(value.shape)}, the "
                            f"parameter {tuple(params[index].shape)}"
                        )

    def load_state_dict(self, saved: Sequence[Mapping[str, Any]], share_momentum_saved: bool) -> None:
        """Load a state :meth:`check_state` accepted."""
        for inner, sd in zip(self.optimizers, saved):
            inner.load_state_dict(self._with_own_kernels(sd, inner))
        self.link_momentum()  # loading gave each inner optimizer its own state again
        if not self.share_momentum and share_momentum_saved:  # tensors that were one: one copy each
            for i in self.momentum_family()[1:]:
                target = getattr(self.optimizers[i], "base_optimizer", self.optimizers[i])
                for st in target.state.values():
                    for k, v in st.items():
                        if torch.is_tensor(v):
                            st[k] = v.clone()

    @staticmethod
    def _with_own_kernels(sd: Mapping[str, Any], inner: Optimizer) -> dict[str, Any]:
        """``sd`` with ``inner``'s own kernel flags in every group: a checkpoint saved where a
        choice ran unfused must not switch the kernel this optimizer chose (torch places loaded
        state by these flags, so they are set before the load)."""
        groups = [
            {**saved, **{k: own[k] for k in _KERNEL_KEYS if k in own}}
            for saved, own in zip(sd["param_groups"], inner.param_groups)
        ]
        return {**sd, "param_groups": groups}

    def snapshot(self) -> list[tuple[Any, dict[str, Any]]]:
        """What :meth:`restore` needs to undo a load: torch's ``load_state_dict`` replaces each
        optimizer's ``state`` and ``param_groups`` with new objects, so keeping the old ones is
        enough."""
        out = []
        for inner in self.optimizers:
            for opt in (inner, getattr(inner, "base_optimizer", None)):
                if opt is not None:
                    out.append((opt, {"state": opt.state, "param_groups": opt.param_groups}))
        return out

    @staticmethod
    def restore(snapshot: list[tuple[Any, dict[str, Any]]]) -> None:
        for opt, saved in snapshot:
            opt.__dict__.update(saved)
