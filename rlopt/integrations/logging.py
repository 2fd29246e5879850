"""Decisions out of memory: :class:`DecisionLogger` writes an rlopt optimizer's decisions (choice,
reward, learning rate, every signal) to TensorBoard, a JSON-lines file and/or a CSV file.

.. code-block:: python

    from rlopt.integrations.logging import DecisionLogger

    log = DecisionLogger(opt, tensorboard_dir="runs/tb", jsonl_path="runs/decisions.jsonl")
    for epoch in range(epochs):
        ...                          # train, validate
        opt.epoch_end(val_loss=val_loss, val_acc=val_acc)
        log.log_new()                # writes the decisions taken since the last call
    log.close()

A decision is one entry of ``opt.history``; :func:`decision_record` flattens it into one row:
``decision``, ``step``, ``epoch``, ``choice`` (the action's name), ``choice_index``, ``reward``
(None at the first decision, which has no interval behind it), ``final``, ``lr`` and
``weight_decay``, then ``signals/<name>`` for every signal and ``policy/<name>`` for every numeric
policy diagnostic. The learning-rate controller records ``lr`` and ``weight_decay`` at each
decision; for other optimizers they are read from ``param_groups[0]`` when :meth:`log_new` runs
(call it right after the decision). Scalars go to TensorBoard under ``rlopt/<key>`` at the
decision's optimizer step; non-finite and missing values are left out there, and written as
``null`` (JSONL) or an empty cell (CSV). Missing folders are created; files are appended to; a
CSV file whose columns grow is rewritten with the wider header. TensorBoard needs the ``tensorboard`` package
(``pip install tensorboard``); the files need nothing.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["DecisionLogger", "decision_record", "find_controlled_optimizer", "scalars"]

_FIRST = ("decision", "step", "epoch", "choice", "choice_index", "reward", "final", "lr", "weight_decay")


def find_controlled_optimizer(optimizer: Any) -> Any:
    """The rlopt optimizer inside ``optimizer``: itself, or the one a framework wrapped
    (Lightning's ``LightningOptimizer._optimizer``, accelerate's ``AcceleratedOptimizer.optimizer``,
    nested). Raises ``TypeError`` naming what was found when there is none."""
    from ..control.base import ControlledOptimizer

    seen = optimizer
    for _ in range(8):  # wrappers nest a few levels at most
        if isinstance(optimizer, ControlledOptimizer):
            return optimizer
        inner = getattr(optimizer, "_optimizer", None) or getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    raise TypeError(
        f"Expected an rlopt optimizer (RLSwitchingOptimizer, QLearningRateOptimizer), possibly wrapped "
        f"by a framework; got {type(seen).__name__}"
    )


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def decision_record(entry: Mapping[str, Any], opt: Any = None) -> dict[str, Any]:
    """One ``opt.history`` entry as a flat dict (see the module doc). ``opt`` supplies
    ``choice_index`` and, when the entry lacks them, ``lr``/``weight_decay`` from ``param_groups[0]``."""
    rec: dict[str, Any] = {
        "decision": entry.get("decision"),
        "step": entry.get("step"),
        "epoch": entry.get("epoch"),
        "choice": entry.get("choice"),
        "choice_index": entry.get("action"),
        "reward": _number(entry.get("reward")),
        "final": bool(entry.get("final", False)),
    }
    for key in ("lr", "weight_decay"):
        value = entry.get(key)
        if value is None and opt is not None and opt.param_groups:
            value = opt.param_groups[0].get(key)
        rec[key] = _number(value)
    for key, value in (entry.get("signals") or {}).items():
        rec[f"signals/{key}"] = _number(value)
    for key, value in (entry.get("policy") or {}).items():
        value = _number(value)
        if value is not None:
            rec[f"policy/{key}"] = value
    return rec


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a :func:`decision_record` (``decision``/``step``/``epoch``
    left out: they index the record), for metric loggers."""
    out = {}
    for key, value in record.items():
        if key in ("decision", "step", "epoch") or isinstance(value, str):
            continue
        value = _number(value)
        if value is not None and math.isfinite(value):
            out[key] = value
    return out


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class DecisionLogger:
    """Write the decisions of ``opt`` not yet written (see the module doc).

    Args:
        opt: an rlopt optimizer (``RLSwitchingOptimizer``, ``QLearningRateOptimizer``), or a
            framework's wrapper of one.
        tensorboard_dir: write scalars with ``torch.utils.tensorboard.SummaryWriter`` there.
        jsonl_path: append one JSON object per decision.
        csv_path: append one row per decision.
        prefix: the TensorBoard tag prefix.

    :meth:`log_new` returns the records it wrote; with no destination it only returns them (the
    integrations use that to hand them to a framework's logger).
    """

    def __init__(
        self,
        opt: Any,
        tensorboard_dir: Optional[str] = None,
        jsonl_path: Optional[str] = None,
        csv_path: Optional[str] = None,
        prefix: str = "rlopt",
    ):
        for name, value in (("tensorboard_dir", tensorboard_dir), ("jsonl_path", jsonl_path), ("csv_path", csv_path)):
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path or None, got {value!r}")
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {prefix!r}")
        self.opt = find_controlled_optimizer(opt)
        self.prefix = prefix.rstrip("/")
        self.jsonl_path = None if jsonl_path is None else os.fspath(jsonl_path)
        self.csv_path = None if csv_path is None else os.fspath(csv_path)
        for path in (self.jsonl_path, self.csv_path):
            if path is not None and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
        self._writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # torch's writer needs the tensorboard package
                raise ImportError("tensorboard_dir needs the tensorboard package: pip install tensorboard") from err
            self._writer = SummaryWriter(log_dir=os.fspath(tensorboard_dir))
        self._csv_header: Optional[list[str]] = None
        self.last_logged = -1  # the last decision index written

    def skip_existing(self) -> None:
        """Treat every decision now in ``opt.history`` as written (after resuming from a
        checkpoint whose decisions were logged by the run that saved it)."""
        history = self.opt.history
        if history:
            self.last_logged = max(self.last_logged, int(history[-1]["decision"]))

    def log_new(self) -> list[dict[str, Any]]:
        """Write the decisions taken since the last call; returns their records, oldest first."""
        new = [decision_record(e, self.opt) for e in self.opt.history if e["decision"] > self.last_logged]
        if not new:
            return new
        if self._writer is not None:
            for rec in new:
                for key, value in scalars(rec).items():
                    self._writer.add_scalar(f"{self.prefix}/{key}", value, global_step=rec["step"])
            self._writer.flush()
        if self.jsonl_path is not None:
            with open(self.jsonl_path, "a", encoding="utf-8") as f:
                for rec in new:
                    f.write(json.dumps({k: _json_safe(v) for k, v in rec.items()}) + "\n")
        if self.csv_path is not None:
            self._write_csv(new)
        self.last_logged = new[-1]["decision"]
        return new

    def _write_csv(self, records: Sequence[Mapping[str, Any]]) -> None:
        path = self.csv_path
        assert path is not None  # called only with a csv_path
        if self._csv_header is None and os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="", encoding="utf-8") as f:
                self._csv_header = next(csv.reader(f), None)
        header = list(self._csv_header or [])
        extra = [k for rec in records for k in rec if k not in header]
        extra = sorted(set(extra), key=lambda k: (k not in _FIRST, _FIRST.index(k) if k in _FIRST else 0, k))
        if extra or not header:
            rows = []
            if header and os.path.exists(path):
                with open(path, newline="", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
            header = header + extra
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(rows)
            self._csv_header = header
        with open(path, "a", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=header)
            for rec in records:
                w.writerow(
                    {
                        k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                        for k, v in rec.items()
                    }
                )

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the files are closed after each write)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
