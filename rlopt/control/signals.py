"""The signal tracker: an interval's training signals, gathered on the device.

:class:`SignalTracker` accumulates, on the parameters' device and without any host
synchronisation, the training loss and how many steps were skipped for non-finite values
(every step), and every ``signal_every`` steps the global gradient norm and the alignment of
two successive gradients (cosine and mean sign agreement). :meth:`SignalTracker.read` reads
everything back in one transfer; optimizers call it only at decisions.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Optional, TypedDict

import torch

from .torch_compat import copy_into, non_finite_check_

__all__ = ["SignalTracker"]

_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _refuse_sparse(tensors: Sequence[torch.Tensor]) -> None:
    """Sparse gradients get a clear error before the step changes anything (checked only off the
    common path: the fused check kernel refuses them first)."""
    if any(t.layout != torch.strided for t in tensors):
        raise RuntimeError(
            "rlopt does not support sparse gradients (from nn.Embedding(sparse=True) or "
            "nn.EmbeddingBag(sparse=True)); build those layers with sparse=False"
        )


class Summary(TypedDict):
    """What :meth:`SignalTracker.read` returns: the interval's means (NaN: none) and counts."""

    loss: float
    grad_norm: float
    grad_cosine: float
    grad_sign_agreement: float
    skipped: int
    longest_skip_run: int
    sharpness: float


class SignalTracker:
    """Device-side accumulators of one interval's training signals (see module doc).

    Built to add as little as possible to a step, because on a GPU a training step is often
    bound by the host launching kernels, and every extra operation shows:

    * :meth:`begin` copies the loss into a window of recent steps (nothing when there is no
      loss) and checks the gradients and the loss for non-finite values with one fused kernel
      (GradScaler's), into a 0/1 flag that fused optimizers read as ``found_inf``.
    * :meth:`end` only counts; every ``fold_every`` steps the window is folded into the
      interval's sums and the run of skipped steps (one batch of small operations).
    * Every ``signal_every`` steps :meth:`probe` takes a flat copy of the gradient (its norm is
      the gradient-norm sample) and at the next step compares the new gradient with it (cosine,
      mean sign agreement). The raw numbers go to a row of a small buffer; ratios and validity are
      worked out when the buffer is folded, at decisions or when it is full.

    No operation in an ordinary step reads a value back to the host, so none waits for the
    device. On the CPU :meth:`poll_skip_run` is exact at every step; on CUDA it reads the run
    from pinned memory once a copy has landed, so a long run of non-finite steps is noticed up
    to about ``fold_every`` plus a few steps late.

    Args:
        signal_every: gradient norm and alignment are sampled every this many steps.
        fold_every: steps per fold of the window (default 128: a fold is a batch of about 25 small
            operations, so it costs a step little when it is rare).
    """

    # slots of the accumulator vector
    _LOSS, _LOSS_N, _SKIPPED, _GNORM, _GNORM_N, _COS, _SIGN, _ALIGN_N = range(8)
    # columns of a probe row: a gradient-norm sample and its step's flag; a comparison with the
    # previous sample: this gradient's norm, dot product, mean sign agreement, flag, and the
    # previous sample's norm and flag. NaN where a row holds no such entry.
    _S_NORM, _S_FLAG, _C_NORM, _C_DOT, _C_SIGN, _C_FLAG, _C_PNORM, _C_PFLAG = range(8)
    STATE_VERSION = 1
    DEFAULT_FOLD_EVERY = 128
    PROBE_ROWS = 16
    # attributes set outside __init__, or whose type the first assignment does not tell
    _unfused: set[tuple[str, Optional[torch.dtype]]]
    _win_loss: Sequence[torch.Tensor]
    _win_flag: Sequence[torch.Tensor]
    _poll: Optional[list[Any]]
    _host_current: Optional[bool]
    _undo_probe: Optional[tuple[int, Optional[torch.Tensor], Optional[tuple], int, Optional[torch.Tensor]]]

    def __init__(self, signal_every: int = 10, fold_every: Optional[int] = None):
        if isinstance(signal_every, bool) or not isinstance(signal_every, int) or signal_every < 1:
            raise ValueError(f"Invalid signal_every: {signal_every}")
        if fold_every is not None and (
            isinstance(fold_every, bool) or not isinstance(fold_every, int) or fold_every < 1
        ):
            raise ValueError(f"Invalid fold_every: {fold_every}")
        self.signal_every = signal_every
        self._fold_arg = fold_every
        self.fold_every = fold_every or self.DEFAULT_FOLD_EVERY
        self.acc: Optional[torch.Tensor] = None  # 8 sums (float64; float32 on MPS)
        self.run: Optional[torch.Tensor] = None  # [current run, longest run] of skipped steps
        self.steps = 0
        self._win: Optional[torch.Tensor] = None  # (2, W) float32: loss (NaN: none given), flag
        self._pending = 0  # steps in the window not folded yet
        self._rows: Optional[torch.Tensor] = None  # (R, 8) float32 probe rows
        self._nrows = 0  # rows in use
        self._snap: Optional[torch.Tensor] = None  # flat gradient of the last sample
        self._snap_ids: Optional[tuple] = None
        self._snap_stats: Optional[torch.Tensor] = None  # [norm, flag] of the last sample
        self._snap_step = -2
        self._poll = None  # [pinned host tensor, event, copy in flight, folds copied] for lagged reads on CUDA
        self._folds = 0
        self._host_run: Optional[list[int]] = None  # CPU: [current run, longest, window steps seen]
        self._unfused = set()  # (device type, dtype) without GradScaler's kernel
        self.sharp: Optional[torch.Tensor] = None  # [sum, count] of SAM steps' sharpness estimates
        self._sharp_win: Optional[torch.Tensor] = None  # (2, W) float32: L(w + e), rho |g| (NaN: none)

    def _allocate(self, device: torch.device) -> None:
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.acc = torch.zeros(8, dtype=dtype, device=device)
        self.run = torch.zeros(2, dtype=dtype, device=device)
        self._one = torch.ones((), dtype=torch.float32, device=device)
        self._snap_stats = torch.zeros(2, dtype=torch.float32, device=device)
        self._make_window(device)
        self._make_rows(device)

    def _make_window(self, device: torch.device, width: int = 0) -> None:
        width = max(width, self.fold_every)
        self._win = torch.zeros(2, width, dtype=torch.float32, device=device)
        self._win[0].fill_(math.nan)
        self._reset = self._win.clone()
        self._steps_idx = torch.arange(1, width + 1, dtype=self.acc.dtype, device=device)
        self._pending = 0
        self._make_views()

    def _make_rows(self, device: torch.device, count: int = 0) -> None:
        self._rows = torch.full((max(count, self.PROBE_ROWS), 8), math.nan, dtype=torch.float32, device=device)
        self._nrows = 0
        self._make_views()

    def _make_views(self) -> None:
        """Per-step views of the window and the probe rows (indexing costs a dispatch per step)."""
        win, rows = self.__dict__.get("_win"), self.__dict__.get("_rows")
        self._win_loss, self._win_flag = (win[0].unbind(), win[1].unbind()) if win is not None else ((), ())
        self._row_views = [r.unbind() for r in rows] if rows is not None else []

    # -------------------------------------------------------------- steps
    def begin(
        self,
        grads: list[torch.Tensor],
        loss: Any,
        device: torch.device,
        loss_skips: bool = True,
        inv_scale: Optional[torch.Tensor] = None,
        found_inf: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Account a step's loss and check its gradients. Returns the step's flag: a float32
        scalar on ``device``, 1 when a gradient (or, with ``loss_skips``, the loss) is not finite
        (the step is to be skipped), else 0; usable as a fused optimizer's ``found_inf``. A
        non-finite loss is never averaged. Call :meth:`end` after the step, and :meth:`check`
        with any further gradient the step uses. With GradScaler: ``inv_scale`` unscales the
        gradients in place (in the same kernel), and its ``found_inf`` also skips the step."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.begin(grads, loss, device, loss_skips, inv_scale, found_inf)
        if self.acc is None:
            self._allocate(device)
        j = self._pending
        flag = self._win_flag[j]
        checked_loss: list[torch.Tensor] = []  # the loss slot, checked with the gradients
        if isinstance(loss, torch.Tensor) and (loss.dim() == 0 or loss.numel() > 0) and not loss.is_complex():
            slot = self._win_loss[j]
            # a scalar as it is; an unreduced loss (one value per sample) by its mean
            slot.copy_(
                loss if loss.dim() == 0 else loss.reshape(()) if loss.numel() == 1 else loss.detach().float().mean()
            )
            if loss_skips:
                checked_loss = [slot]
        elif not isinstance(loss, numbers.Real) or isinstance(loss, bool):
            pass  # None, or what the closure returned is not a loss (a tuple...): not averaged
        elif math.isfinite(float(loss)) and abs(float(loss)) <= _FLOAT32_MAX:
            self._win_loss[j].fill_(float(loss))
        elif loss_skips:  # as a loss tensor would be: not finite in the float32 window
            flag.fill_(1.0)
        if inv_scale is None:  # one kernel for the gradients and the loss
            tensors = [*grads, *checked_loss]
            if tensors and tensors[0].device == flag.device and not self._unfused:
                try:  # check()'s common case, inline: this runs at every step
                    non_finite_check_(tensors, flag, self._one)
                except (RuntimeError, NotImplementedError):  # check() finds another way, or the reason
                    self.check(tensors, flag)
            else:
                self.check(tensors, flag)
        else:  # the loss is not scaled: checked on its own
            self.check(grads, flag, inv_scale)
            self.check(checked_loss, flag)
        if found_inf is not None:
            torch.maximum(flag, found_inf.to(flag.device, flag.dtype).reshape(()), out=flag)
        return flag

    def check(
        self, tensors: Sequence[torch.Tensor], flag: torch.Tensor, inv_scale: Optional[torch.Tensor] = None
    ) -> None:
        """Set ``flag`` to 1 if any of ``tensors`` holds a non-finite value (one fused kernel per
        device and dtype; the tensors are left as they are, or multiplied by ``inv_scale`` in
        place when given). The flag stays 0 or 1: fused optimizers skip a step only for
        ``found_inf == 1``."""
        if not tensors:
            return
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.check(tensors, flag, inv_scale)
        one = self._one if inv_scale is None else inv_scale.to(self._one.device)
        unscale = inv_scale is not None
        dev = tensors[0].device
        if dev == flag.device and (dev.type, None) not in self._unfused:
            try:  # the common case in one call: GradScaler's kernel takes mixed dtypes, not devices
                non_finite_check_(tensors, flag, one, unscale=unscale)
                return
            except (RuntimeError, NotImplementedError):  # by device and dtype below (errors again there)
                _refuse_sparse(tensors)
                self._unfused.add((dev.type, None))
        else:
            _refuse_sparse(tensors)
        by: dict[Any, list[torch.Tensor]] = {}
        for t in tensors:
            by.setdefault((t.device, t.dtype), []).append(t)
        for group in by.values():
            dev = group[0].device
            target = flag if dev == flag.device else torch.zeros((), dtype=torch.float32, device=dev)
            key = (dev.type, group[0].dtype)
            if key not in self._unfused:
                try:  # multiplies by one (exact) or inv_scale, and sets target to 1 on inf or NaN
                    non_finite_check_(group, target, one.to(dev), unscale=unscale)
                except (NotImplementedError, RuntimeError):  # no kernel for this device or dtype (torch 2.4
                    self._unfused.add(key)  # raises RuntimeError for complex): norms instead
            if key in self._unfused:
                non_finite_check_(group, target, one.to(dev), fused=False, unscale=unscale)
            if target is not flag:
                torch.maximum(flag, target.to(flag.device), out=flag)

    def probe(self, params: Sequence[torch.Tensor], flag: torch.Tensor) -> None:
        """Sample the gradient norm and alignment if this step is due (every ``signal_every``
        steps, and the step after, which is compared with it). Call between :meth:`begin` and
        the parameter update, with the gradients the step's statistics are about."""
        sample = self.steps % self.signal_every == 0
        compare = self._snap_step == self.steps - 1
        if not (sample or compare):
            return
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.probe(params, flag)
        ids = tuple(i for i, p in enumerate(params) if p.grad is not None)
        if not ids:
            return
        compare = compare and self._snap is not None and ids == self._snap_ids  # (None: a retried step)
        if not (sample or compare):
            return
        if self._nrows == len(self._row_views):
            self._fold_rows()
        # what cancel() needs to take this sample back (the step may still raise before its update)
        self._undo_probe = (
            self._nrows,
            self._snap,
            self._snap_ids,
            self._snap_step,
            self._snap_stats.clone() if sample else None,
        )
        row = self._row_views[self._nrows]
        self._nrows += 1
        flat = self._flat(params, ids)
        if compare:
            prev = self._snap
            torch.linalg.vector_norm(flat, out=row[self._C_NORM])
            torch.dot(flat, prev, out=row[self._C_DOT])
            signs = torch.sign(flat) if sample else flat.sign_()  # (flat is scratch unless it is kept)
            torch.mean(signs.mul_(torch.sign(prev)), 0, out=row[self._C_SIGN])
            row[self._C_FLAG].copy_(flag)
            self._rows[self._nrows - 1, self._C_PNORM :].copy_(self._snap_stats)
            self._snap = None
        if sample:
            stats = self._snap_stats
            torch.linalg.vector_norm(flat, out=stats[0])
            stats[1].copy_(flag)
            self._rows[self._nrows - 1, self._S_NORM : self._S_FLAG + 1].copy_(stats)
            self._snap, self._snap_ids, self._snap_step = flat, ids, self.steps

    def add_sharpness(self, perturbed_loss: Any, first_order: torch.Tensor) -> None:
        """Record the step's SAM evaluation: ``perturbed_loss`` = L(w + e) and ``first_order`` =
        ``rho |g|`` (the first-order part of L(w + e) - L(w)); the step's own loss, given to
        :meth:`begin`, is L(w). Folded with the window into the mean sharpness estimate
        ``(L(w + e) - L(w)) / (rho |g|)`` of the interval's steps that were not skipped (see
        :mod:`rlopt.control.sharpness`); two small copies, no host sync. Call between
        :meth:`begin` and :meth:`end`."""
        if not isinstance(perturbed_loss, torch.Tensor):
            if not isinstance(perturbed_loss, numbers.Real) or isinstance(perturbed_loss, bool):
                return
            perturbed_loss = torch.tensor(float(perturbed_loss))
        if perturbed_loss.numel() != 1 or perturbed_loss.is_complex():
            perturbed_loss = perturbed_loss.detach().float().mean() if perturbed_loss.numel() else None
            if perturbed_loss is None:
                return
        if self._sharp_win is None:
            self._sharp_win = torch.full(
                (2, self._win.shape[1]), math.nan, dtype=torch.float32, device=self._win.device
            )
            self.sharp = torch.zeros(2, dtype=self.acc.dtype, device=self.acc.device)
        device = self._sharp_win.device
        self._sharp_win[:, self._pending].copy_(
            torch.stack(
                [
                    perturbed_loss.detach().reshape(()).to(device, torch.float32),
                    first_order.detach().reshape(()).to(device, torch.float32),
                ]
            )
        )

    def cancel(self) -> None:
        """Forget the step begun with :meth:`begin` (it raised before its update). A gradient
        sample :meth:`probe` already took for it stays in the interval's sums."""
        self._host_current = None
        undo, self._undo_probe = self.__dict__.get("_undo_probe"), None
        if undo is not None:
            nrows, self._snap, self._snap_ids, self._snap_step, stats = undo
            self._rows[nrows : self._nrows].fill_(math.nan)
            self._nrows = nrows
            if stats is not None:
                self._snap_stats.copy_(stats)
        if self._win is not None:
            self._win[:, self._pending] = self._reset[:, self._pending]
        if self._sharp_win is not None:
            self._sharp_win[:, self._pending] = math.nan

    def end(self) -> None:
        """Close the step begun with :meth:`begin`."""
        bad = self.__dict__.get("_host_current")
        if bad is not None:  # a CPU poll read this step's flag: carry it into the host's run
            self._host_current = None
            run = self._host_run
            if run is not None and run[2] == self._pending:
                run[0] = run[0] + 1 if bad else 0
                run[1] = max(run[1], run[0])
                run[2] += 1
        self._undo_probe = None
        self._pending += 1
        self.steps += 1
        if self._pending >= self.fold_every:
            self._fold()

    def _fold(self) -> None:
        """Add the window's steps to the interval's sums and the run of skipped steps."""
        n = self._pending
        if n == 0:
            return
        with torch.no_grad():
            loss, flag = self._win[:, :n]
            dtype = self.acc.dtype
            counted = (flag == 0) & loss.isfinite()  # NaN: no loss given
            sums = torch.stack([torch.where(counted, loss, 0.0), counted, flag]).to(dtype)  # one batch of sums
            bad = sums[2]
            self.acc[: self._SKIPPED + 1] += sums.sum(1)
            # run at each step: bad steps since the last good one, plus the carried run if none yet
            count = bad.cumsum(0)
            last_good = torch.where(bad == 0, count, 0.0).cummax(0).values
            runs = count - last_good + self.run[0] * (count == self._steps_idx[:n]).to(dtype)
            self.run.copy_(torch.stack([runs[-1], torch.maximum(self.run[1], runs.max())]))
            if (
                self._sharp_win is not None and self.sharp is not None
            ):  # sharpness of the SAM steps not skipped (NaN elsewhere)
                est = (self._sharp_win[0, :n] - loss) / self._sharp_win[1, :n]
                ok = (flag == 0) & est.isfinite()
                self.sharp += torch.stack([torch.where(ok, est, 0.0).to(dtype).sum(), ok.to(dtype).sum()])
                self._sharp_win.fill_(math.nan)
            self._win.copy_(self._reset)
        self._pending = 0
        self._host_run = None
        self._folds += 1

    def _fold_rows(self) -> None:
        """Add the probe rows to the interval's gradient sums."""
        k = self._nrows
        if k == 0:
            return
        with torch.no_grad():
            dtype = self.acc.dtype
            gn, gf, cn, dot, sign, cf, pn, pf = self._rows[:k].to(dtype).unbind(1)
            ok = (gf == 0) & gn.isfinite()  # a finite sample of a step that was not skipped
            valid = (cf == 0) & (pf == 0) & (cn > 0) & (pn > 0) & cn.isfinite() & pn.isfinite()
            cos = torch.where(valid, dot / (cn * pn).clamp_min(1e-30), 0.0)
            self.acc[self._GNORM :] += torch.stack(
                [
                    torch.where(ok, gn, 0.0).sum(),
                    ok.to(dtype).sum(),
                    cos.sum(),
                    torch.where(valid, sign, 0.0).sum(),
                    valid.to(dtype).sum(),
                ]
            )
            self._rows[:k].fill_(math.nan)
        self._nrows = 0

    def _flat(self, params: Sequence[torch.Tensor], ids: Sequence[int]) -> torch.Tensor:
        """The gradients of ``params[ids]`` as one float32 vector on the tracker's device, copied
        into one of two buffers kept for this (the one the last snapshot is not in): a sample
        allocates nothing, so a large gradient costs no fresh pages at every sample."""
        grads = [params[i].grad for i in ids]
        key = (ids, tuple(g.shape for g in grads))
        bufs = self.__dict__.get("_flat_bufs")
        if bufs is None or bufs[0] != key:
            sizes = [g.numel() for g in grads]
            flats = [torch.empty(sum(sizes), dtype=torch.float32, device=self.acc.device) for _ in range(2)]
            views = [[v.view(g.shape) for v, g in zip(f.split(sizes), grads)] for f in flats]
            bufs = self._flat_bufs = (key, flats, views)
        k = 1 if self._snap is bufs[1][0] else 0
        copy_into(bufs[2][k], grads)
        return bufs[1][k]

    # -------------------------------------------------------------- reads
    def summary(self) -> Summary:
        """:meth:`read`, then :meth:`new_interval`."""
        out = self.read()
        self.new_interval()
        return out

    def new_interval(self) -> None:
        """Start a new interval: the sums restart; the current run of skipped steps goes on."""
        if self.acc is not None:
            self.acc.zero_()
            self.run[1] = self.run[0]
            if self._nrows:  # (read() added them on the host)
                self._rows[: self._nrows].fill_(math.nan)
                self._nrows = 0
            if self.sharp is not None:
                self.sharp.zero_()
            self._host_run = None

    def reset_run(self) -> None:
        """Forget the run of skipped steps so far (after it was reported): the next steps start
        a new run. The skipped steps stay counted in the interval's sums."""
        if self.acc is not None:
            self._fold()
            self.run.zero_()
            self._host_run = None

    def read(self) -> Summary:
        """The interval's means and counts so far (one host transfer). Changes no meaning: the
        window is folded into the sums, which the next read would do too; the probe rows in use
        (a few, sampled since the last fold of rows) come back in the same transfer and are
        added on the host, as :meth:`_fold_rows` would add them on the device."""
        if self.acc is None:
            return {
                "loss": math.nan,
                "grad_norm": math.nan,
                "grad_cosine": math.nan,
                "grad_sign_agreement": math.nan,
                "skipped": 0,
                "longest_skip_run": 0,
                "sharpness": math.nan,
            }
        self._fold()
        k = self._nrows
        parts = [self.acc, self.run] + ([self.sharp] if self.sharp is not None else [])
        if k:
            parts.append(self._rows[:k].reshape(-1).to(self.acc.dtype))
        v = torch.cat(parts).tolist()
        fixed = 12 if self.sharp is not None else 10
        v, rows = v[:fixed], v[fixed:]
        for r in range(k):  # _fold_rows' arithmetic, in float64 on the host
            gn, gf, cn, dot, sign, cf, pn, pf = rows[8 * r : 8 * r + 8]
            if gf == 0 and math.isfinite(gn):  # a finite sample of a step that was not skipped
                v[self._GNORM] += gn
                v[self._GNORM_N] += 1
            if cf == 0 and pf == 0 and cn > 0 and pn > 0 and math.isfinite(cn) and math.isfinite(pn):
                v[self._COS] += dot / max(cn * pn, 1e-30)
                v[self._SIGN] += sign
                v[self._ALIGN_N] += 1

        def mean(total: float, n: float) -> float:
            return total / n if n > 0 else math.nan

        return {
            "loss": mean(v[self._LOSS], v[self._LOSS_N]),
            "grad_norm": mean(v[self._GNORM], v[self._GNORM_N]),
            "grad_cosine": mean(v[self._COS], v[self._ALIGN_N]),
            "grad_sign_agreement": mean(v[self._SIGN], v[self._ALIGN_N]),
            "skipped": int(v[self._SKIPPED]),
            "longest_skip_run": int(v[9]),
            "sharpness": mean(v[10], v[11]) if len(v) > 10 else math.nan,
        }

    def poll_skip_run(self, current: Optional[torch.Tensor] = None) -> Optional[int]:
        """Longest run of skipped steps so far in this interval, if known without waiting; None
        otherwise.

        On the CPU it is exact: the folded run and the window are simply read. On CUDA a copy
        of the folded run into pinned memory starts after each fold and is read at a later call
        once it has landed, so an ordinary step never waits for the GPU.

        ``current``: the flag of the step under way (begun, not ended), counted too on the CPU.
        Under ``torch.compile`` nothing is read (None): a read would break the graph.
        """
        if self.run is None or _compiling():
            return None
        if self.run.is_cpu:  # folded run, then the window's steps not seen yet (usually none)
            run = self._host_run
            if run is None:
                run = self._host_run = [int(a) for a in self.run.tolist()] + [0]
            if run[2] < self._pending:  # steps that ended without a poll
                cur, longest = run[0], run[1]
                for k in range(run[2], self._pending):
                    cur = cur + 1 if self._win_flag[k].item() else 0
                    longest = max(longest, cur)
                run[0], run[1], run[2] = cur, longest, self._pending
            longest = run[1]
            if current is not None:  # read once; end() carries it into the run
                self._host_current = current.item() != 0
                if self._host_current:
                    longest = max(longest, run[0] + 1)
            return longest
        kind = self.run.device.type
        if kind != "cuda":
            return None
        if self._poll is None:
            self._poll = [torch.empty(1, dtype=self.run.dtype, pin_memory=True), torch.cuda.Event(), False, -1]
        host, event, in_flight, copied = self._poll
        value = None
        if in_flight and event.query():
            value = int(host[0])
            self._poll[2] = in_flight = False
        if not in_flight and copied != self._folds:  # folded since the last copy: fetch the new value
            stream = torch.cuda.current_stream(self.run.device)
            with torch.cuda.stream(stream):
                host.copy_(self.run[1:2], non_blocking=True)
            event.record(stream)
            self._poll[2:] = [True, self._folds]
        return value

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        pending = self._snap is not None and self._snap_step == self.steps - 1
        allocated = self.acc is not None
        return {
            "version": self.STATE_VERSION,
            "signal_every": self.signal_every,
            "fold_every": self._fold_arg,
            "steps": self.steps,
            "window": self._win[:, : self._pending].clone() if allocated else None,
            "acc": self.acc.clone() if allocated else None,
            "run": self.run.clone() if allocated else None,
            "probe_rows": self._rows[: self._nrows].clone() if allocated else None,
            "snapshot": self._snap.clone() if pending else None,
            "snapshot_stats": self._snap_stats.clone() if pending else None,
            "snapshot_ids": list(self._snap_ids) if pending else None,
            # only once a SAM step was taken (absent before, and in older checkpoints)
            **(
                {"sharpness": {"sums": self.sharp.clone(), "window": self._sharp_win[:, : self._pending].clone()}}
                if self.sharp is not None
                else {}
            ),
        }

    def check_state(self, state: Any) -> None:
        """Raise ``ValueError`` unless :meth:`load_state_dict` can load ``state``. Changes nothing."""
        if not isinstance(state, Mapping):
            raise ValueError(f"The signal tracker state must be a dict, got {type(state).__name__}")
        keys = (
            "version",
            "signal_every",
            "fold_every",
            "steps",
            "window",
            "acc",
            "run",
            "probe_rows",
            "snapshot",
            "snapshot_stats",
            "snapshot_ids",
        )
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"The signal tracker state lacks {missing}")
        if state["version"] != self.STATE_VERSION:
            raise ValueError(
                f"The signal tracker state is of version {state['version']!r}; this rlopt reads "
                f"version {self.STATE_VERSION}"
            )
        for key in ("signal_every", "steps"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < (key == "signal_every"):
                raise ValueError(f"Invalid signal tracker '{key}': {value!r}")
        fold = state["fold_every"]
        if fold is not None and (isinstance(fold, bool) or not isinstance(fold, numbers.Integral) or fold < 1):
            raise ValueError(f"Invalid signal tracker 'fold_every': {fold!r}")
        if state["acc"] is None:
            return
        shapes = {"acc": (8,), "run": (2,)}
        for key, shape in shapes.items():
            if not (isinstance(state[key], torch.Tensor) and tuple(state[key].shape) == shape):
                raise ValueError(f"The signal tracker's '{key}' must be a tensor of shape {shape}")
        window, rows = state["window"], state["probe_rows"]
        if not (isinstance(window, torch.Tensor) and window.dim() == 2 and window.shape[0] == 2):
            raise ValueError("The signal tracker's 'window' must be a tensor of shape (2, n)")
        if not (isinstance(rows, torch.Tensor) and rows.dim() == 2 and rows.shape[1] == 8):
            raise ValueError("The signal tracker's 'probe_rows' must be a tensor of shape (k, 8)")
        sharp = state.get("sharpness")
        if sharp is not None:
            sums, win = (sharp.get("sums"), sharp.get("window")) if isinstance(sharp, Mapping) else (None, None)
            if not (
                isinstance(sums, torch.Tensor)
                and tuple(sums.shape) == (2,)
                and isinstance(win, torch.Tensor)
                and tuple(win.shape) == (2, window.shape[1])
            ):
                raise ValueError(
                    "The signal tracker's 'sharpness' must hold 'sums' of shape (2,) and a 'window' "
                    "of shape (2, n) as long as 'window'"
                )
        if state["snapshot"] is not None:
            snap, stats, ids = state["snapshot"], state["snapshot_stats"], state["snapshot_ids"]
            if not (
                isinstance(snap, torch.Tensor)
                and snap.dim() == 1
                and isinstance(stats, torch.Tensor)
                and tuple(stats.shape) == (2,)
                and isinstance(ids, (list, tuple))
            ):
                raise ValueError("The signal tracker's gradient snapshot is malformed")

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.check_state(state)
        self.steps = int(state["steps"])
        self.signal_every = int(state["signal_every"])
        self._fold_arg = None if state["fold_every"] is None else int(state["fold_every"])
        self.fold_every = self._fold_arg or self.DEFAULT_FOLD_EVERY
        self._poll = self._host_run = None
        self._folds = 0
        self._snap, self._snap_ids, self._snap_step = None, None, -2
        self.sharp = self._sharp_win = None
        if state["acc"] is None:
            self.acc = self.run = self._win = self._rows = None
            self._pending = self._nrows = 0
            return
        self._allocate(device)
        self.acc.copy_(state["acc"])
        self.run.copy_(state["run"])
        window, rows = state["window"], state["probe_rows"]
        self._make_window(device, width=window.shape[1])
        self._win[:, : window.shape[1]] = window.to(device)
        self._pending = window.shape[1]
        self._make_rows(device, count=rows.shape[0])
        self._rows[: rows.shape[0]] = rows.to(device)
        self._nrows = rows.shape[0]
        sharp = state.get("sharpness")
        if sharp is not None:
            self.sharp = sharp["sums"].to(device, self.acc.dtype).clone()
            self._sharp_win = torch.full((2, self._win.shape[1]), math.nan, dtype=torch.float32, device=device)
            self._sharp_win[:, : window.shape[1]] = sharp["window"].to(device)
        if self._pending >= self.fold_every:
            self._fold()
        if state["snapshot"] is not None:
            self._snap = state["snapshot"].to(device).clone()
            self._snap_stats.copy_(state["snapshot_stats"])
            self._snap_ids = tuple(state["snapshot_ids"])
            self._snap_step = self.steps - 1

    def snapshot(self) -> dict[str, Any]:
        """What :meth:`restore` needs to undo the steps and reads that follow (a few small
        tensor copies; taken only at decisions)."""
        snap = {k: v for k, v in self.__dict__.items() if k not in self._VIEWS}
        for key in ("acc", "run", "_win", "_rows", "_snap_stats", "sharp", "_sharp_win"):
            if snap.get(key) is not None:
                snap[key] = snap[key].clone()
        snap["_host_run"] = None if self._host_run is None else list(self._host_run)
        snap["_unfused"] = set(self._unfused)
        return snap

    def restore(self, snap: dict[str, Any]) -> None:
        self.__dict__.update(snap)
        self._make_views()

    _VIEWS = ("_win_loss", "_win_flag", "_row_views")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_poll"] = None  # CUDA events do not pickle; the next poll starts a new copy
        state.pop("_flat_bufs", None)  # scratch, made again at the next sample
        for name in self._VIEWS:  # pickle does not keep views of a tensor; rebuilt on load
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.setdefault("sharp", None)  # (pickled before the sharpness signal existed)
        state.setdefault("_sharp_win", None)
        self.__dict__.update(state)
        self._make_views()


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())
