"""Observation features: cheap training signals gathered on the device, turned into a small
vector at decision points.

Two halves:

* :class:`SignalTracker` accumulates, on the parameters' device and without any host
  synchronisation, the training loss and how many steps were skipped for non-finite values
  (every step), and every ``signal_every`` steps the global gradient norm and the alignment of
  two successive gradients (cosine and mean sign agreement). :meth:`SignalTracker.summary`
  reads everything back in one transfer; optimizers call it only at decisions.
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
           "observation_layout"]

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


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class SignalTracker:
    """Device-side accumulators of one interval's training signals (see module doc).

    An ordinary step costs three small device operations and no host synchronisation:
    :meth:`begin` writes the loss into a window of recent steps and checks the gradients and
    the loss for non-finite values with one fused kernel (GradScaler's), into a flag that fused
    optimizers read as ``found_inf``; :meth:`end` folds the window into the interval's sums
    every ``fold_every`` steps. Every ``signal_every`` steps :meth:`probe` takes a flat copy of
    the gradient, whose norm is the gradient-norm sample and which the next step's gradient is
    compared with (cosine and mean sign agreement).

    Args:
        signal_every: gradient norm and alignment are sampled every this many steps.
        fold_every: steps per fold of the window (default: 1 on the CPU, where a fold is cheap
            and the run of skipped steps is then exact at every step; 8 elsewhere, so a long run
            of non-finite steps is noticed up to about 2 x 8 steps late on an accelerator).
    """

    # slots of the accumulator vector
    _LOSS, _LOSS_N, _SKIPPED, _GNORM, _GNORM_N, _COS, _SIGN, _ALIGN_N = range(8)
    STATE_VERSION = 2

    def __init__(self, signal_every: int = 10, fold_every: Optional[int] = None):
        if isinstance(signal_every, bool) or not isinstance(signal_every, int) or signal_every < 1:
            raise ValueError(f"Invalid signal_every: {signal_every}")
        if fold_every is not None and (isinstance(fold_every, bool) or not isinstance(fold_every, int)
                                       or fold_every < 1):
            raise ValueError(f"Invalid fold_every: {fold_every}")
        self.signal_every = signal_every
        self._fold_arg = fold_every
        self.fold_every = fold_every
        self.acc: Optional[torch.Tensor] = None  # 8 float64 sums
        self.run: Optional[torch.Tensor] = None  # [current run, longest run] of skipped steps
        self.steps = 0
        self._win: Optional[torch.Tensor] = None  # (3, W) float32: loss, non-finite flag, loss given
        self._pending = 0  # steps in the window not folded yet
        self._snap: Optional[torch.Tensor] = None
        self._snap_norm: Optional[torch.Tensor] = None
        self._snap_ids: Optional[tuple] = None
        self._snap_ok: Optional[torch.Tensor] = None
        self._snap_step = -2
        self._poll = None  # (pinned host tensor, event, copy in flight) for lagged reads on CUDA
        self._unfused = set()  # (device type, dtype) without GradScaler's kernel

    def _allocate(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.acc = torch.zeros(8, dtype=dtype, device=device)
        self.run = torch.zeros(2, dtype=dtype, device=device)
        self._make_window(device)

    def _make_window(self, device: torch.device, width: int = 0) -> None:
        self.fold_every = self._fold_arg or (1 if device.type == "cpu" else 8)
        width = max(width, self.fold_every)
        self._win = torch.zeros(3, width, dtype=torch.float32, device=device)
        self._win[2].fill_(1.0)
        self._reset = self._win[1:].clone()
        self._steps_idx = torch.arange(1, width + 1, dtype=self.acc.dtype, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._pending = 0

    # -------------------------------------------------------------- steps
    @torch.no_grad()
    def begin(self, grads: Sequence[torch.Tensor], loss: Any, device: torch.device) -> torch.Tensor:
        """Account a step's loss and check its gradients. Returns the step's flag: a float32
        scalar on ``device``, 1 when the loss or a gradient is not finite (the step is to be
        skipped), else 0; usable as a fused optimizer's ``found_inf``. Call :meth:`end` after the
        step, and :meth:`check` with any further gradient the step uses."""
        if self.acc is None:
            self._allocate(device)
        j = self._pending
        flag = self._win[1, j]
        slot = self._win[0, j:j + 1]
        tensors = list(grads)
        if isinstance(loss, torch.Tensor):
            slot.copy_(loss.detach().reshape(1))
            tensors.append(slot)
        elif loss is None:  # (not `win[2, j] = 0.0`: on CUDA that is a blocking host-to-device copy)
            self._win[2, j].zero_()
        elif math.isfinite(float(loss)) and abs(float(loss)) <= _FLOAT32_MAX:
            slot.fill_(float(loss))
        else:  # as a loss tensor would be: not finite in the float32 window
            flag.fill_(1.0)
        self.check(tensors, flag)
        return flag

    @torch.no_grad()
    def check(self, tensors: Sequence[torch.Tensor], flag: torch.Tensor) -> None:
        """Set ``flag`` to 1 if any of ``tensors`` holds a non-finite value (one fused kernel per
        device and dtype; the tensors are left as they are). The flag stays 0 or 1: fused
        optimizers skip a step only for ``found_inf == 1``."""
        if not tensors:
            return
        dev = tensors[0].device
        if dev == flag.device and (dev.type, None) not in self._unfused:
            try:  # the common case in one call: GradScaler's kernel takes mixed dtypes, not devices
                torch._amp_foreach_non_finite_check_and_unscale_(tensors, flag, self._one)
                return
            except (RuntimeError, NotImplementedError):  # by device and dtype below (errors again there)
                self._unfused.add((dev.type, None))
        by: Dict[Any, List[torch.Tensor]] = {}
        for t in tensors:
            by.setdefault((t.device, t.dtype), []).append(t)
        for group in by.values():
            dev = group[0].device
            target = flag if dev == flag.device else torch.zeros((), dtype=torch.float32, device=dev)
            key = (dev.type, group[0].dtype)
            if key not in self._unfused:
                try:  # multiplies by one (exact) and sets target to 1 on inf or NaN
                    torch._amp_foreach_non_finite_check_and_unscale_(
                        group, target, self._one if dev == self._one.device else self._one.to(dev))
                except NotImplementedError:  # no kernel for this device or dtype: norms instead
                    self._unfused.add(key)
            if key in self._unfused:
                norms = torch._foreach_norm(group)
                bad = (~torch.isfinite(torch.stack([n.float() for n in norms]).sum())).float()
                torch.maximum(target, bad, out=target)
            if target is not flag:
                torch.maximum(flag, target.to(flag.device), out=flag)

    @torch.no_grad()
    def probe(self, params: Sequence[torch.Tensor], flag: torch.Tensor) -> None:
        """Sample the gradient norm and alignment if this step is due (every ``signal_every``
        steps, and the step after, which is compared with it). Call between :meth:`begin` and
        the parameter update, with the gradients the step's statistics are about."""
        probe_now = self.steps % self.signal_every == 0
        compare = self._snap_step == self.steps - 1
        if not (probe_now or compare):
            return
        ids = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if not ids:
            return
        ok = flag == 0
        if compare and ids == self._snap_ids:
            self._compare(params, ids, ok)
        if probe_now:
            self._snapshot(params, ids, ok)

    def cancel(self) -> None:
        """Forget the step begun with :meth:`begin` (it raised before its update). A gradient
        sample :meth:`probe` already took for it stays in the interval's sums."""
        if self._win is not None:
            self._win[1:, self._pending] = self._reset[:, self._pending]

    def end(self) -> None:
        """Close the step begun with :meth:`begin`."""
        self._pending += 1
        self.steps += 1
        if self._pending == self.fold_every:
            self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        """Add the window's steps to the interval's sums and the run of skipped steps."""
        n = self._pending
        if n == 0:
            return
        loss, flag, given = self._win[:, :n]
        dtype = self.acc.dtype
        bad = (flag != 0).to(dtype)
        with_loss = (flag == 0) & (given != 0)
        self.acc[:self._SKIPPED + 1] += torch.stack([
            torch.where(with_loss, loss, 0.0).to(dtype).sum(), with_loss.to(dtype).sum(), bad.sum()])
        if n == 1:
            cur = (self.run[0] + 1.0) * bad[0]
        else:  # run at each step: bad steps since the last good one, plus the carried run if none yet
            count = bad.cumsum(0)
            last_good = torch.where(bad == 0, count, 0.0).cummax(0).values
            runs = count - last_good + self.run[0] * (count == self._steps_idx[:n]).to(dtype)
            cur = runs[-1]
            self.run[1] = torch.maximum(self.run[1], runs.max())
        self.run[0] = cur
        self.run[1] = torch.maximum(self.run[1], cur)
        self._win[1:, :n] = self._reset[:, :n]
        self._pending = 0

    def _flat(self, params, ids) -> torch.Tensor:
        """The gradients of ``params[ids]`` as one float32 vector on the tracker's device."""
        grads = [params[i].grad for i in ids]
        try:  # one C++ call (flatten and concatenate), the common case: one device, one dtype
            flat = torch._utils._flatten_dense_tensors(grads)
        except RuntimeError:  # several devices
            flat = torch.cat([g.reshape(-1).to(self.acc.device, torch.float32) for g in grads])
        return flat.to(self.acc.device, torch.float32)

    def _snapshot(self, params, ids, ok) -> None:
        self._snap = self._flat(params, ids)
        norm = torch.linalg.vector_norm(self._snap)
        ok = ok & torch.isfinite(norm)
        self.acc[self._GNORM:self._GNORM_N + 1] += torch.stack([torch.where(ok, norm, 0.0), ok.float()]).to(
            self.acc.dtype)
        self._snap_norm, self._snap_ids, self._snap_ok, self._snap_step = norm, ids, ok, self.steps

    def _compare(self, params, ids, ok) -> None:
        cur, prev = self._flat(params, ids), self._snap
        dot = torch.dot(cur, prev)
        n1, n2 = torch.linalg.vector_norm(cur), self._snap_norm
        valid = ok & self._snap_ok & (n1 > 0) & (n2 > 0)
        cos = torch.where(valid, dot / (n1 * n2).clamp_min(1e-30), 0.0)
        sign = torch.where(valid, (torch.sign(cur) * torch.sign(prev)).mean(), 0.0)
        self.acc[self._COS:] += torch.stack([cos, sign, valid.float()]).to(self.acc.dtype)

    # -------------------------------------------------------------- reads
    def summary(self) -> Dict[str, float]:
        """Read the interval's sums back (one host transfer) and start a new interval."""
        if self.acc is None:
            return {"loss": math.nan, "grad_norm": math.nan, "grad_cosine": math.nan,
                    "grad_sign_agreement": math.nan, "skipped": 0, "longest_skip_run": 0}
        self._fold()
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
        """Longest run of skipped steps so far in this interval (folded steps), if known without
        waiting; None otherwise.

        On the CPU the value is simply read. On CUDA a copy into pinned memory is started after
        a fold and read at a later call once it has landed, so an ordinary step never waits for
        the GPU.
        """
        if self.run is None:
            return None
        if self.run.device.type == "cpu":
            return int(self.run[1])
        if self.run.device.type != "cuda":
            return None
        if self._poll is None:
            self._poll = [torch.empty(1, dtype=self.run.dtype, pin_memory=True), torch.cuda.Event(), False]
        host, event, in_flight = self._poll
        value = None
        if in_flight and event.query():
            value = int(host[0])
            self._poll[2] = in_flight = False
        if not in_flight and self._pending == 0:  # just folded: fetch the new value
            host.copy_(self.run[1:2], non_blocking=True)
            event.record()
            self._poll[2] = True
        return value

    # -------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        pending = self._snap is not None and self._snap_step == self.steps - 1
        return {
            "version": self.STATE_VERSION, "signal_every": self.signal_every, "fold_every": self._fold_arg,
            "steps": self.steps, "window": None if self._win is None else self._win[:, :self._pending].clone(),
            "acc": None if self.acc is None else self.acc.clone(),
            "run": None if self.run is None else self.run.clone(),
            "snapshot": self._snap.clone() if pending else None,
            "snapshot_norm": self._snap_norm.clone() if pending else None,
            "snapshot_ids": list(self._snap_ids) if pending else None,
            "snapshot_ok": self._snap_ok.clone() if pending else None,
        }

    def load_state_dict(self, state: Dict[str, Any], device: torch.device) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"Signal tracker state of version {state.get('version', 1)} cannot be loaded by "
                             f"this rlopt (version {self.STATE_VERSION}); it was saved by an older release")
        self.steps = int(state["steps"])
        self.signal_every = int(state["signal_every"])
        self._fold_arg = self.fold_every = None if state["fold_every"] is None else int(state["fold_every"])
        self.acc = None if state["acc"] is None else state["acc"].to(device).clone()
        self.run = None if state["run"] is None else state["run"].to(device).clone()
        self._poll = None
        if self.acc is not None:  # the steps not folded yet come back into the window
            window = state["window"]
            self._make_window(device, width=window.shape[1])
            self._win[:, :window.shape[1]] = window.to(device)
            self._pending = window.shape[1]
            if self._pending >= self.fold_every:
                self._fold()
        else:
            self._win, self._pending = None, 0
        if state["snapshot"] is not None:
            self._snap = state["snapshot"].to(device).clone()
            self._snap_norm = state["snapshot_norm"].to(device).clone()
            self._snap_ids = tuple(state["snapshot_ids"])
            self._snap_ok = state["snapshot_ok"].to(device).clone()
            self._snap_step = self.steps - 1
        else:
            self._snap, self._snap_norm, self._snap_ids, self._snap_ok, self._snap_step = None, None, None, None, -2

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
