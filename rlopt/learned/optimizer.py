"""LearnedOptimizer: a torch optimizer whose per-coordinate update is a meta-trained MLP."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.optim import Optimizer

from .rule import LearnedRule, load_rule

if TYPE_CHECKING:
    from torch.optim.optimizer import ParamsT

__all__ = ["LearnedOptimizer", "DEFAULT_POLICY"]

DEFAULT_POLICY = "learned-es"


class LearnedOptimizer(Optimizer):
    r"""An optimizer whose update rule is a small MLP shared by every coordinate.

    .. code-block:: text

        for every parameter tensor p with gradient g (t = its step count):
            m_k <- beta_k m_k + (1 - beta_k) g,   v <- beta2 v + (1 - beta2) g^2
            f   = [g, m_1/(1-beta_1^t), ..., m_K/(1-beta_K^t)] / sqrt((v + eps^2)/(1-beta2^t))  ++ [p / rms(p)]
            s   = [tanh(t / tau) for tau in time_scales]
            o   = clip(W2 relu(W1 f + U s + b1) + b2 + S f, -1, 1)  # the rule: rlopt.learned.rule
            p  <- p - lr * o_0 * exp(kappa * o_1)

    The rule (the weights, the decays, the hidden width) comes from ``policy``: a shipped rule's
    name (see :func:`rlopt.registry.list_policies`), a checkpoint path written by
    ``python -m rlopt.learned.train``, or a :class:`~rlopt.learned.rule.LearnedRule`.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        policy: the rule (default: the shipped ``"learned-es"``).
        lr: multiplies the bounded direction (default: the learning rate the rule was meta-trained
            at). Lives in ``param_groups``, so LR schedulers scale the update.
        chunk_size: coordinates processed per batch of kernels (keeps the hidden layer in cache);
            a speed knob only, the result does not depend on it beyond float rounding.

    Properties that the implementation guarantees:

    * **Bounded**: every coordinate moves by at most ``lr * exp(kappa)`` per step.
    * **Linear cost, no per-coordinate Python**: per parameter tensor and chunk a fixed number of
      tensor kernels (two small matrix products); the state is ``len(betas) + 1`` buffers the size
      of the parameter plus a step counter (Adam keeps 2).
    * **No host sync** in :meth:`step`: a gradient with a non-finite entry anywhere sets a flag
      on the device, and the whole step is then skipped (parameters, moments and step counts
      unchanged) with ``torch.where`` and zero weights, never ``.item()``.
    * ``state_dict()`` holds the moments and step counts (exact resume) plus the rule's weights,
      so that loading it into an optimizer with a different rule raises ``ValueError``.
      Pickle and deepcopy keep the rule.

    Example:
        >>> opt = LearnedOptimizer(model.parameters(), policy="learned-es")
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     loss_fn(model(x), y).backward()
        ...     opt.step()
        ...     sched.step()

    Note:
        Like Andrychowicz et al. (2016) and ``learned_optimization``'s ``mlp_lopt`` (Metz et al.),
        one tiny network applied to every coordinate; unlike Li & Malik's first design it never
        sees the whole gradient vector. The update is clipped (bounded) and the time features
        saturate, so nothing depends on the run's total length.
    """

    rule: LearnedRule
    chunk_size: int

    def __init__(
        self, params: ParamsT, policy: Any = DEFAULT_POLICY, lr: Optional[float] = None, chunk_size: int = 1 << 16
    ) -> None:
        rule = load_rule(policy)
        if lr is None:
            lr = rule.lr
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0.0 <= lr < math.inf:
            raise ValueError(f"Invalid learning rate: {lr}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size}")
        super().__init__(params, dict(lr=float(lr)))
        for group in self.param_groups:
            glr = group["lr"]
            if isinstance(glr, bool) or not isinstance(glr, numbers.Real) or not 0.0 <= glr < math.inf:
                raise ValueError(f"Invalid learning rate: {glr}")
        self.rule = rule
        self.chunk_size = chunk_size
        self._consts: dict[Any, dict[str, torch.Tensor]] = {}
        self._buffers: dict[Any, Any] = {}

    # ------------------------------------------------------------------ pickling / checkpoints
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["rule"] = self.rule
        state["chunk_size"] = self.chunk_size
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("chunk_size", 1 << 16)
        self._consts = {}
        self._buffers = {}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["learned_rule"] = self.rule.fingerprint()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fp = state_dict.get("learned_rule")
        if fp is not None:
            mine = self.rule.fingerprint()
            theta = fp.get("theta") if isinstance(fp, dict) else None
            if (
                not isinstance(fp, dict)
                or fp.get("spec") != mine["spec"]
                or not isinstance(theta, torch.Tensor)
                or theta.shape != mine["theta"].shape
                or not torch.equal(theta.cpu(), mine["theta"])
            ):
                raise ValueError(
                    "This state_dict was saved by a LearnedOptimizer with a different rule "
                    "(policy); load it into one built with the same policy"
                )
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "learned_rule"})

    # ------------------------------------------------------------------ the step
    def _constants(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        c = self._consts.get(key)
        if c is None:
            spec = self.rule.spec
            w = {k: v.to(device, dtype).contiguous() for k, v in spec.unpack(self.rule.theta).items()}
            w["b2"] = w["b2"][:, None].contiguous()
            w["out_scale"] = torch.tensor([[1.0], [spec.kappa]], device=device, dtype=dtype)
            w["betas"] = torch.tensor(spec.betas, device=device, dtype=torch.float32)
            w["one_minus_betas"] = (1.0 - w["betas"]).to(dtype)[:, None]
            w["taus"] = torch.tensor(spec.time_scales, device=device, dtype=torch.float32)
            c = self._consts[key] = w
        return c

    def _scratch(
        self, device: torch.device, dtype: torch.dtype, rows: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Work buffers reused from step to step (not state): ``rows x width`` and ``2 x width``,
        one pair per device and dtype, grown to the widest chunk seen (at most ``chunk_size``)."""
        key = (device, dtype, rows)
        buf = self.__dict__.setdefault("_buffers", {}).get(key)
        if buf is None or buf[1].numel() < 2 * width:
            buf = self._buffers[key] = (
                torch.empty(rows * width, device=device, dtype=dtype),
                torch.empty(2 * width, device=device, dtype=dtype),
            )
        return buf

    @staticmethod
    def _found_inf(grads: list[torch.Tensor]) -> torch.Tensor:
        norms = torch._foreach_norm(grads)
        device = norms[0].device
        total = torch.stack([n.to(device, torch.float32) for n in norms]).sum()
        return ~torch.isfinite(total)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One update of every parameter with a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                if not p.is_floating_point() or p.is_complex():
                    raise RuntimeError(f"LearnedOptimizer supports real floating-point parameters, got {p.dtype}")
                grads.append(p.grad)
        if not grads:
            return loss
        found = self._found_inf(grads)
        spec = self.rule.spec
        K = len(spec.betas)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["momenta"] = torch.zeros((K, *p.shape), dtype=p.dtype, device=p.device)
                    state["v"] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                self._update(p, p.grad, state, group["lr"], found.to(p.device))
        return loss

    def _update(
        self, p: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], lr: float, found: torch.Tensor
    ) -> None:
        """The step of one tensor. Same numbers as :func:`rlopt.learned.features.reference_step`,
        rearranged for speed: the per-step scalars (bias corrections, ``1/rms(p)``, ``kappa``) are
        folded into the first layer's and the output layer's weights, so the per-coordinate work is
        a few elementwise kernels and two small matrix products per chunk, in place."""
        spec = self.rule.spec
        c = self._constants(p.device, p.dtype)
        K, H = len(spec.betas), spec.hidden
        keep = (~found).to(torch.float32)
        step = state["step"]
        step.add_(keep)
        t = step.clamp(min=1.0)  # a skipped first step leaves t = 0: the corrections must stay finite
        bc2 = 1.0 - spec.beta2**t  # r = rsqrt((v + eps^2) / bc2)
        contiguous = p.is_contiguous()
        pf = p.view(-1) if contiguous else p.detach().reshape(-1).clone()
        prms = torch.rsqrt(torch.linalg.vector_norm(pf).square() / max(pf.numel(), 1) + 1e-16)
        # stored features x = [g r', m_k r', p] with r' = rsqrt(v + eps^2) = r / sqrt(bc2); the
        # corrections and 1/rms(p) go into the weights' columns, the first layer's bias into a
        # column that meets a constant row of ones
        scale = torch.cat([bc2.sqrt().reshape(1), bc2.sqrt() / (1.0 - c["betas"] ** t), prms.reshape(1)])
        scale = scale.to(p.dtype)
        bias = torch.addmv(c["b1"], c["u"], torch.tanh(t / c["taus"]).to(p.dtype))
        w1 = torch.cat([bias[:, None], c["w1"] * scale], dim=1)  # (H, 1 + F)
        w2 = torch.cat([c["b2"], c["skip"] * scale, c["w2"]], dim=1) * c["out_scale"]  # (2, 1 + F + H)
        w_mom = c["one_minus_betas"] * keep.to(p.dtype)  # (K, 1): 0 on a skipped step
        decay_v = (1.0 - (1.0 - spec.beta2) * keep).to(p.dtype)  # 1 on a skipped step
        log_keep = torch.log(keep).to(p.dtype)  # -inf on a skipped step: exp -> 0
        eps2 = spec.eps**2

        gf = grad.reshape(-1)
        mom = state["momenta"].view(K, -1)
        vf = state["v"].view(-1)
        n_total = pf.numel()
        F = K + 2
        width = min(self.chunk_size, n_total)
        zbuf, obuf = self._scratch(p.device, p.dtype, F + H + 1, width)
        for a in range(0, n_total, self.chunk_size):
            b = min(a + self.chunk_size, n_total)
            n = b - a
            g_c = torch.where(found, 0.0, gf[a:b])  # finite; 0 on a skipped step
            m_c, v_c, p_c = mom[:, a:b], vf[a:b], pf[a:b]
            m_c.lerp_(g_c.expand(K, -1), w_mom)
            v_c.mul_(decay_v).addcmul_(g_c, g_c, value=1.0 - spec.beta2)
            z = zbuf[: (F + H + 1) * n].view(F + H + 1, n)  # rows [1; x; h]
            z[0].fill_(1.0)  # (a narrower view, the last chunk, moves the rows about in the buffer)
            x = z[1 : F + 1]
            r = torch.add(v_c, eps2, out=x[K + 1]).rsqrt_()  # x's last row is scratch here
            torch.mul(g_c, r, out=x[0])
            torch.mul(m_c, r, out=x[1 : K + 1])
            x[K + 1].copy_(p_c)
            torch.mm(w1, z[: F + 1], out=z[F + 1 :]).relu_()
            o = torch.mm(w2, z, out=obuf[: 2 * n].view(2, n))  # b2 + S f + W2 h in one product
            o[0].clamp_(-1.0, 1.0)  # direction in [-1, 1]
            o[1].clamp_(-spec.kappa, spec.kappa).add_(log_keep).exp_()  # magnitude in [e^-k, e^k]
            p_c.addcmul_(o[0], o[1], value=-lr)
        if not contiguous:
            p.copy_(pf.view(p.shape))
