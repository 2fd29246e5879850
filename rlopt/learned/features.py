"""Per-coordinate features of the learned rule, written as pure functions (the reference).

For a parameter tensor ``p`` with gradient ``g`` at step ``t`` (1-based, counted after the
update of the moments)::

    m_k <- beta_k m_k + (1 - beta_k) g          # K momenta (betas of the RuleSpec)
    v   <- beta2 v + (1 - beta2) g^2            # second-moment normaliser
    r    = 1 / sqrt((v + eps^2) / (1 - beta2^t))
    f    = [ g r,  m_1 r / (1 - beta_1^t), ..., m_K r / (1 - beta_K^t),  p / rms(p) ]
    s    = [ tanh(t / tau) for tau in time_scales ]     # per tensor; no total run length

``rms(p)`` is over the whole tensor (``sqrt(mean(p^2) + 1e-16)``). Every feature is invariant to a
rescaling of the loss; the momentum features are Adam's ``m_hat / sqrt(v_hat)`` at several decays.

:func:`reference_step` is the whole update as one pure function of tensors (no in-place
changes, no host sync), which is what meta-training vmaps over a population; the
:class:`~rlopt.learned.LearnedOptimizer` computes the same numbers in place and in chunks,
and the tests check the two against each other.
"""

from __future__ import annotations

from typing import Union

import torch

from .rule import RuleSpec

__all__ = ["time_features", "coordinate_features", "direction", "reference_step"]


def time_features(step: torch.Tensor, spec: RuleSpec) -> torch.Tensor:
    """``[tanh(t / tau) for tau in spec.time_scales]`` as a float tensor of shape ``(S,)``."""
    taus = torch.tensor(spec.time_scales, dtype=torch.float32, device=step.device)
    return torch.tanh(step.to(torch.float32) / taus)


def coordinate_features(
    p: torch.Tensor, g: torch.Tensor, mom: torch.Tensor, v: torch.Tensor, step: torch.Tensor, spec: RuleSpec
) -> torch.Tensor:
    """Features ``(F, n)`` of the ``n = p.numel()`` coordinates, from the *updated* moments
    ``mom`` (shape ``(K, *p.shape)``) and ``v``."""
    t = step.to(torch.float32)
    betas = torch.tensor(spec.betas, dtype=torch.float32, device=p.device)
    corr = 1.0 / (1.0 - betas**t)  # (K,)
    r = torch.rsqrt((v.reshape(-1).float() + spec.eps**2) / (1.0 - spec.beta2**t))
    pf = p.reshape(-1).float()
    prms = torch.rsqrt(pf.square().mean() + 1e-16)
    gf = g.reshape(-1).float()
    m = mom.reshape(len(spec.betas), -1).float() * corr[:, None]
    return torch.cat([(gf * r)[None], m * r, (pf * prms)[None]], dim=0)


def direction(
    weights: dict[str, torch.Tensor], feats: torch.Tensor, scalars: torch.Tensor, spec: RuleSpec
) -> torch.Tensor:
    """The bounded per-coordinate step ``o_0 * exp(kappa * o_1)`` with ``o = clip(..., -1, 1)``, shape ``(n,)``."""
    bias = weights["u"] @ scalars + weights["b1"]
    h = torch.relu(weights["w1"] @ feats + bias[:, None])
    o = weights["w2"] @ h + weights["b2"][:, None] + weights["skip"] @ feats
    o = o.clamp(-1.0, 1.0)  # a clip: as bounded as tanh, several times cheaper on a CPU
    return o[0] * torch.exp(spec.kappa * o[1])


def reference_step(
    theta: torch.Tensor,
    spec: RuleSpec,
    p: torch.Tensor,
    g: torch.Tensor,
    mom: torch.Tensor,
    v: torch.Tensor,
    step: torch.Tensor,
    lr: Union[float, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the rule on one tensor, purely: returns ``(p, mom, v, step)`` after it.

    ``step`` is the number of steps taken before this one (a 0-dim tensor). Non-finite
    gradients are not handled here (the optimizer skips them; meta-training scores them).
    """
    step = step + 1
    betas = torch.tensor(spec.betas, dtype=mom.dtype, device=mom.device).reshape(-1, *([1] * g.dim()))
    mom = mom + (1.0 - betas) * (g.unsqueeze(0) - mom)
    v = v + (1.0 - spec.beta2) * (g * g - v)
    feats = coordinate_features(p, g, mom, v, step, spec)
    d = direction(spec.unpack(theta), feats, time_features(step, spec), spec)
    return p - lr * d.reshape(p.shape).to(p.dtype), mom, v, step
