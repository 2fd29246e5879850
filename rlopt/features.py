"""Observation features: cheap training signals gathered on the device, turned into a small
vector at decision points.

Two halves:

* :class:`SignalTracker` accumulates, on the parameters' device and without any host
  synchronisation, the training loss, the global gradient norm, how many steps were skipped
  for non-finite values, and every ``signal_every`` steps the alignment of two successive
  gradients (cosine and mean sign agreement). :meth:`SignalTracker.summary` reads everything
  back in one transfer; optimizers call it only at decisions.
* :class:`ObservationBuilder` turns an interval's :class:`Signals` (plus validation metrics,
  progress and the previous action) into features scaled to about [-1, 1]. The layout is
  versioned (:data:`LAYOUT_VERSION`) and saved with every policy, so a checkpoint cannot be
  driven by features it was not trained on.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["LAYOUT_VERSION", "BASE_FEATURES", "Signals", "SignalTracker", "ObservationBuilder",
           "observation_layout", "global_grad_norm"]

LAYOUT_VERSION = 1

BASE_FEATURES = (
    "loss_level",           # tanh(log(L / L_first)): training loss against the first interval's
    "loss_change",          # tanh(5 log(L / L_prev))
    "grad_norm_level",      # tanh(log(G / G_first))
    "grad_norm_change",     # tanh(2 log(G / G_prev))
    "grad_cosine",          # mean cosine of successive gradients
    "grad_sign_agreement",  # mean of sign(g_t) * sign(g_t-1) over coordinates
    "val_loss_level",       # tanh(log(V / V_first)), 0 without validation
    "val_loss_change",      # tanh(5 log(V / V_prev))
    "val_acc",              # 2 a - 1
    "val_acc_change",       # tanh(20 (a - a_prev))
    "has_val",              # 1 when validation metrics were given
    "progress",             # 2 p - 1 through the budget, 0 when unknown
    "has_budget",           # 1 when the budget is known
    "cost",                 # gradient evaluations per step over the cheapest choice's, scaled to [0, 1]
    "skipped",              # share of steps skipped for non-finite loss or gradient
)


def observation_layout(action_names: Sequence[str], extra: Sequence[str] = ()) -> Dict[str, Any]:
    names = list(BASE_FEATURES) + list(extra) + [f"prev_action:{a}" for a in action_names]
    return {"version": LAYOUT_VERSION, "names": names}


@dataclass
class Signals:
    """What one interval between two decisions looked like (host floats; NaN = not measured)."""

    loss: float = math.nan
    grad_norm: float = math.nan
    grad_cosine: float = math.nan
    grad_sign_agreement: float = math.nan
    val_loss: float = math.nan
    val_acc: float = math.nan
    steps: int = 0
    skipped: int = 0
    cost: float = math.nan  # mean gradient evaluations per step, relative to the cheapest choice
    progress: float = math.nan
    val_fresh: bool = False  # validation metrics were given during this interval

    @property
    def skipped_frac(self) -> float:
        return self.skipped / self.steps if self.steps else 0.0

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _log_ratio(a: float, b: float) -> float:
    if _finite(a) and _finite(b) and a > 0 and b > 0:
        return math.log(a / b)
    return 0.0


@torch.no_grad()
def global_grad_norm(grads: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """L2 norm over all gradients, as a float32 scalar on ``device``; inf/NaN if any entry is."""
    if not grads:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(grads)
    if all(n.device == device and n.dtype == torch.float32 for n in norms):  # the usual case: no casts
        return torch.linalg.vector_norm(torch.stack(norms))
    return torch.linalg.vector_norm(torch.stack([n.to(device, torch.float32) for n in norms]))


class SignalTracker:
    """Device-side accumulators of one interval's training signals (see module doc).

    Args:
        signal_every: gradient alignment is sampled every this many steps, each sample
            comparing two successive gradients (it costs a flat copy of the gradient).
    """

    # slots of the accumulator vector
    _LOSS, _LOSS_N, _GNORM, _GNORM_N, _SKIPPED, _COS, _SIGN, _ALIGN_N = range(8)

    def __init__(self, signal_every: int = 10):
        if not isinstance(signal_every, int) or signal_every < 1:
            raise ValueError(f"Invalid signal_every: {signal_every}")
        self.signal_every = signal_every
        self.acc: Optional[torch.Tensor] = None  # 8 float64 sums
        self.run: Optional[torch.Tensor] = None  # [current run, longest run] of skipped steps
        self.steps = 0
        self._snap: Optional[torch.Tensor] = None
        self._snap_ids: Optional[tuple] = None
        self._snap_ok: Optional[torch.Tensor] = None
        self._snap_step = -2
        self._poll = None  # (pinned host tensor, event) for lagged reads on CUDA

    def _allocate(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.acc = torch.zeros(8, dtype=dtype, device=device)
        self.run = torch.zeros(2, dtype=dtype, device=device)

    @torch.no_grad()
    def record(self, params: Sequence[torch.Tensor], loss: Any, grad_norm: torch.Tensor,
               finite: torch.Tensor, keep_run: bool = True) -> None:
        """Account one step. ``finite`` (device bool) is False when the step was skipped.
        ``keep_run``: remember the skip run before this step, for :meth:`amend` (SAM); callers
        that never amend pass False and save a device op.

        An ordinary step costs a handful of small device ops and no host synchronisation."""
        if self.acc is None:
            self._allocate(grad_norm.device)
        dev, dtype = self.acc.device, self.acc.dtype
        if isinstance(loss, torch.Tensor):
            loss_v = loss.detach().reshape(()).to(dev, grad_norm.dtype)
        elif loss is not None and math.isfinite(float(loss)):
            loss_v = torch.full((), float(loss), dtype=grad_norm.dtype, device=dev)
        else:
            loss_v = None
        ok = finite.to(dtype)
        if loss_v is None:
            self.acc[self._GNORM:self._SKIPPED + 1] += torch.stack(
                [torch.where(finite, grad_norm.to(dtype), 0.0), ok, 1.0 - ok])
        else:  # loss, loss count, grad norm, grad-norm count, skipped
            vals = torch.where(finite, torch.stack([loss_v, grad_norm]).to(dtype), 0.0)
            self.acc[:self._SKIPPED + 1] += torch.cat([vals[:1], ok[None], vals[1:], ok[None], 1.0 - ok[None]])
        if keep_run:
            self._run_before = self.run[0].clone()
        cur = self.run[:1]
        cur.add_(1.0).mul_(1.0 - ok)  # consecutive skipped steps
        torch.maximum(self.run[1:], cur, out=self.run[1:])

        probe_now = self.steps % self.signal_every == 0
        if probe_now or self._snap_step == self.steps - 1:
            ids = tuple(i for i, p in enumerate(params) if p.grad is not None)
            if self._snap_step == self.steps - 1 and ids == self._snap_ids and ids:
                self._compare(params, ids, finite)
            if probe_now and ids:
                self._snapshot(params, ids, finite)
        self.steps += 1

    @torch.no_grad()
    def amend(self, finite: torch.Tensor) -> None:
        """Count the step recorded last (with ``keep_run=True``) as skipped when ``finite``
        (device bool) is False after all: SAM knows only after its second gradient whether the
        step is taken. The step's first-pass loss and gradient statistics stay in the means."""
        dtype = self.acc.dtype
        bad = (~finite).to(self.acc.device, dtype) * (self.run[0] == 0).to(dtype)  # not counted yet
        self.acc[self._SKIPPED] += bad
        self.run[0] = self.run[0] + bad * (self._run_before + 1.0)
        self.run[1] = torch.maximum(self.run[1], self.run[0])

    def _flat(self, params, ids, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        dev = self.acc.device
        grads = [params[i].grad.reshape(-1) for i in ids]
        if not all(g.device == dev and g.dtype == torch.float32 for g in grads):
            grads = [g.to(dev, torch.float32) for g in grads]
        if out is not None and out.numel() == sum(g.numel() for g in grads):
            return torch.cat(grads, out=out)
        return torch.cat(grads)

    def _snapshot(self, params, ids, finite) -> None:
        self._snap = self._flat(params, ids, out=self._snap)
        self._snap_ids, self._snap_ok, self._snap_step = ids, finite.clone(), self.steps

    def _compare(self, params, ids, finite) -> None:
        cur, prev = self._flat(params, ids), self._snap
        dot = torch.dot(cur, prev)
        n1, n2 = torch.linalg.vector_norm(cur), torch.linalg.vector_norm(prev)
        valid = finite & self._snap_ok & (n1 > 0) & (n2 > 0)
        cos = torch.where(valid, dot / (n1 * n2).clamp_min(1e-30), 0.0)
        sign = torch.where(valid, (torch.sign(cur) * torch.sign(prev)).mean(), 0.0)
        self.acc[self._COS:] += torch.stack([cos, sign, valid.float()]).to(self.acc.dtype)

    def summary(self) -> Dict[str, float]:
        """Read the interval's sums back (one host transfer) and start a new interval."""
        if self.acc is None:
            return {"loss": math.nan, "grad_norm": math.nan, "grad_cosine": math.nan,
                    "grad_sign_agreement": math.nan, "skipped": 0, "longest_skip_run": 0}
        v = torch.cat([self.acc, self.run]).tolist()
        self.acc.zero_()
        self.run[1] = self.run[0]

        def mean(total, n):
            return total / n if n > 0 else math.nan

        return {
            "loss": mean(v[self._LOSS], v[self._LOSS_N]),
            "grad_norm": mean(v[self._GNORM], v[self._GNORM_N]),
            "grad_cosine": mean(v[self._COS], v[self._ALIGN_N]),
            "grad_sign_agreement": mean(v[self._SIGN], v[self._ALIGN_N]),
            "skipped": int(v[self._SKIPPED]),
            "longest_skip_run": int(v[9]),
        }

    def poll_skip_run(self) -> Optional[int]:
        """Longest run of skipped steps so far in this interval, if known without waiting.

        On the CPU the value is simply read. On CUDA a copy is started into pinned memory and
        read at a later call once it has landed, so an ordinary step never waits for the GPU.
        """
        if self.run is None:
            return None
        if self.run.device.type == "cpu":
            return int(self.run[1])
        if self.run.device.type != "cuda":
            return None
        value = None
        if self._poll is not None and self._poll[1].query():
            value = int(self._poll[0][0])
            self._poll = None
        if self._poll is None:
            host = torch.empty(1, dtype=torch.float64, pin_memory=True)
            host.copy_(self.run[1:2], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._poll = (host, event)
        return value

    # -------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        pending = self._snap is not None and self._snap_step == self.steps - 1
        return {
            "signal_every": self.signal_every, "steps": self.steps,
            "acc": None if self.acc is None else self.acc.clone(),
            "run": None if self.run is None else self.run.clone(),
            "snapshot": self._snap.clone() if pending else None,
            "snapshot_ids": list(self._snap_ids) if pending else None,
            "snapshot_ok": self._snap_ok.clone() if pending else None,
        }

    def load_state_dict(self, state: Dict[str, Any], device: torch.device) -> None:
        self.steps = int(state["steps"])
        self.signal_every = int(state["signal_every"])
        self.acc = None if state["acc"] is None else state["acc"].to(device).clone()
        self.run = None if state["run"] is None else state["run"].to(device).clone()
        self._poll = None
        if state["snapshot"] is not None:
            self._snap = state["snapshot"].to(device).clone()
            self._snap_ids = tuple(state["snapshot_ids"])
            self._snap_ok = state["snapshot_ok"].to(device).clone()
            self._snap_step = self.steps - 1
        else:
            self._snap, self._snap_ids, self._snap_ok, self._snap_step = None, None, None, -2

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_poll"] = None  # CUDA events do not pickle; the next poll starts a new copy
        return state


@dataclass
class ObservationBuilder:
    """Turns :class:`Signals` into the feature vector of :func:`observation_layout`.

    Keeps the first and previous measured values as references (saved in checkpoints).
    """

    action_names: Sequence[str]
    extra: Sequence[str] = ()
    first: Dict[str, float] = field(default_factory=dict)
    prev: Dict[str, float] = field(default_factory=dict)

    @property
    def layout(self) -> Dict[str, Any]:
        return observation_layout(self.action_names, self.extra)

    def build(self, s: Signals, prev_action: Optional[int], max_cost: float,
              extra_values: Sequence[float] = ()) -> torch.Tensor:
        for key in ("loss", "grad_norm", "val_loss"):
            value = getattr(s, key)
            if _finite(value) and value > 0 and key not in self.first:
                self.first[key] = value
        first, prev = self.first, self.prev
        has_val = _finite(s.val_acc) or _finite(s.val_loss)
        acc = s.val_acc if _finite(s.val_acc) else math.nan
        t = math.tanh
        features = [
            t(_log_ratio(s.loss, first.get("loss", math.nan))),
            t(5 * _log_ratio(s.loss, prev.get("loss", math.nan))),
            t(_log_ratio(s.grad_norm, first.get("grad_norm", math.nan))),
            t(2 * _log_ratio(s.grad_norm, prev.get("grad_norm", math.nan))),
            s.grad_cosine if _finite(s.grad_cosine) else 0.0,
            s.grad_sign_agreement if _finite(s.grad_sign_agreement) else 0.0,
            t(_log_ratio(s.val_loss, first.get("val_loss", math.nan))),
            t(5 * _log_ratio(s.val_loss, prev.get("val_loss", math.nan))),
            2 * acc - 1 if _finite(acc) else 0.0,
            t(20 * (acc - prev["val_acc"])) if _finite(acc) and _finite(prev.get("val_acc", math.nan)) else 0.0,
            1.0 if has_val else 0.0,
            2 * s.progress - 1 if _finite(s.progress) else 0.0,
            1.0 if _finite(s.progress) else 0.0,
            min(1.0, max(0.0, (s.cost - 1) / (max_cost - 1))) if max_cost > 1 and _finite(s.cost) else 0.0,
            s.skipped_frac,
        ]
        features += [float(v) if _finite(v) else 0.0 for v in extra_values]
        one_hot = [0.0] * len(self.action_names)
        if prev_action is not None:
            one_hot[prev_action] = 1.0
        for key in ("loss", "grad_norm", "val_loss", "val_acc"):
            value = getattr(s, key)
            if _finite(value):
                prev[key] = value
        return torch.tensor(features + one_hot, dtype=torch.float32)

    def state_dict(self) -> Dict[str, Any]:
        return {"first": dict(self.first), "prev": dict(self.prev)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.first, self.prev = dict(state["first"]), dict(state["prev"])
