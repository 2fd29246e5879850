"""The learned update rule: a tiny MLP shared by every coordinate, and its checkpoint format.

For one coordinate with features ``f`` (see :mod:`rlopt.learned.features`) and per-tensor scalar
inputs ``s`` (time features), the rule computes::

    h = relu(W1 f + U s + b1)                 # hidden width H (8 by default)
    o = clip(W2 h + b2 + S f, -1, 1)          # two outputs in [-1, 1]; S: a linear skip from the features
    d = o_0 * exp(kappa * o_1)                # direction in [-1, 1] times a magnitude in [e^-k, e^k]
    p <- p - lr * d                           # so |step| <= lr * exp(kappa): bounded by construction

The skip ``S`` starts as the identity on the 0.9-momentum feature, so an untrained rule is
``p -= lr * clip(m / sqrt(v), -1, 1)``, a clipped Adam. All weights live in one flat vector ``theta``
(what evolution strategies perturbs); :class:`RuleSpec` gives its layout.

Checkpoint (``torch.save`` of a dict of plain types and tensors, loadable with
``weights_only=True``)::

    {"format": "rlopt.learned_rule", "version": 1, "spec": {...RuleSpec fields...},
     "theta": Tensor[n], "lr": float, "meta": {...how it was trained...}}
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

__all__ = ["RuleSpec", "LearnedRule", "load_rule", "FORMAT"]

FORMAT = "rlopt.learned_rule"
VERSION = 1


@dataclass(frozen=True)
class RuleSpec:
    """Shape and fixed constants of a rule (everything but the learned weights)."""

    hidden: int = 8
    betas: tuple[float, ...] = (0.5, 0.9, 0.99)
    """Decay rates of the momenta (one feature each)."""
    beta2: float = 0.999
    """Decay rate of the second-moment normaliser."""
    eps: float = 1e-8
    time_scales: tuple[float, ...] = (3.0, 10.0, 30.0)
    """Time features ``tanh(t / tau)``: they saturate, so nothing needs the run's total length."""
    kappa: float = 2.0
    """Log-range of the magnitude output: ``|step| <= lr * exp(kappa)``."""

    def __post_init__(self) -> None:
        if not (isinstance(self.hidden, int) and self.hidden >= 1):
            raise ValueError(f"Invalid hidden width: {self.hidden}")
        if not self.betas or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"Invalid betas: {self.betas}")
        if not 0.0 <= self.beta2 < 1.0:
            raise ValueError(f"Invalid beta2: {self.beta2}")
        if not 0.0 < self.eps:
            raise ValueError(f"Invalid epsilon value: {self.eps}")
        if not all(t > 0 for t in self.time_scales):
            raise ValueError(f"Invalid time_scales: {self.time_scales}")
        if not 0.0 <= self.kappa < 20.0:
            raise ValueError(f"Invalid kappa: {self.kappa}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "time_scales", tuple(float(t) for t in self.time_scales))

    @property
    def n_features(self) -> int:
        """Per-coordinate features: gradient, one per momentum, parameter."""
        return 2 + len(self.betas)

    @property
    def n_scalars(self) -> int:
        """Per-tensor inputs (time features), added into the first layer's bias."""
        return len(self.time_scales)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        F, S, H = self.n_features, self.n_scalars, self.hidden
        return {"w1": (H, F), "u": (H, S), "b1": (H,), "w2": (2, H), "b2": (2,), "skip": (2, F)}

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def unpack(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of ``theta[..., n]`` as the named weights (works on a batch of thetas too)."""
        out, i = {}, 0
        for name, shape in self.shapes().items():
            n = math.prod(shape)
            out[name] = theta[..., i : i + n].reshape(*theta.shape[:-1], *shape)
            i += n
        return out

    def init_theta(self, generator: Optional[torch.Generator] = None, scale: float = 0.1) -> torch.Tensor:
        """Small random MLP weights; the skip is the identity on the 0.9-momentum feature
        (or the middle momentum), so the untrained rule is a clipped Adam."""
        theta = torch.randn(self.size, generator=generator) * scale
        w = self.unpack(theta)
        w["w2"].mul_(0.1)
        w["b2"].zero_()
        w["skip"].zero_()
        k = min(range(len(self.betas)), key=lambda i: abs(self.betas[i] - 0.9))
        w["skip"][0, 1 + k] = 1.0
        return theta

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"], d["time_scales"] = list(self.betas), list(self.time_scales)
        return d


@dataclass
class LearnedRule:
    """A rule's spec, its flat weights and the learning rate it was meta-trained at."""

    spec: RuleSpec
    theta: torch.Tensor
    lr: float = 0.01
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<untrained>"

    def __post_init__(self) -> None:
        if not isinstance(self.theta, torch.Tensor) or self.theta.dim() != 1:
            raise ValueError("theta must be a 1-D tensor")
        if self.theta.numel() != self.spec.size:
            raise ValueError(f"Rule weights have {self.theta.numel()} entries; the spec needs {self.spec.size}")
        if not torch.isfinite(self.theta).all():
            raise ValueError("Rule weights are not finite")
        self.theta = self.theta.detach().to(torch.float32).clone()

    @classmethod
    def untrained(cls, spec: Optional[RuleSpec] = None, seed: int = 0, lr: float = 0.01) -> LearnedRule:
        spec = spec or RuleSpec()
        return cls(spec, spec.init_theta(torch.Generator().manual_seed(seed)), lr=lr)

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec.to_dict(),
            "theta": self.theta.clone(),
            "lr": float(self.lr),
            "meta": dict(self.meta),
        }

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save(self.checkpoint(), path)

    @classmethod
    def from_checkpoint(cls, ckpt: Any, source: str = "<dict>") -> LearnedRule:
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(
                f"{source} is not a learned-rule checkpoint (expected format '{FORMAT}'); "
                "RL controller policies (lr-dqn, switch-*) are loaded with rlopt.load_policy"
            )
        if ckpt.get("version") != VERSION:
            raise ValueError(
                f"{source}: unsupported learned-rule version {ckpt.get('version')} (this rlopt reads {VERSION})"
            )
        try:
            spec = RuleSpec(**ckpt["spec"])
            return cls(
                spec, ckpt["theta"], lr=float(ckpt.get("lr", 0.01)), meta=dict(ckpt.get("meta", {})), source=source
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{source}: malformed learned-rule checkpoint ({e})") from None

    def fingerprint(self) -> dict[str, Any]:
        """What a state_dict records to refuse a resume under a different rule."""
        return {"spec": self.spec.to_dict(), "theta": self.theta.clone()}


def load_rule(policy: Any) -> LearnedRule:
    """A :class:`LearnedRule` from a registry name, a checkpoint path, a checkpoint dict or a rule."""
    if isinstance(policy, LearnedRule):
        return policy
    if isinstance(policy, dict):
        return LearnedRule.from_checkpoint(policy)
    if not isinstance(policy, (str, os.PathLike)):
        raise ValueError(f"Invalid policy: {policy!r} (expected a registry name, a path or a LearnedRule)")
    path = os.fspath(policy)
    if not os.path.isfile(path):
        from ..registry import _index, pretrained_path

        index = _index()
        if path not in index:
            learned = sorted(n for n, e in index.items() if e.get("optimizer") == "learned")
            raise ValueError(
                f"No learned-rule checkpoint at '{path}' and no shipped rule of that name; shipped rules: {learned}"
            )
        path = pretrained_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a bad argument here
        raise ValueError(f"Cannot read a learned-rule checkpoint from '{path}': {e}") from None
    return LearnedRule.from_checkpoint(ckpt, source=f"'{policy}'")
