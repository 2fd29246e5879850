"""Hugging Face ``Trainer``: :class:`RLOptTrainer` hands the rlopt optimizer a closure, and
:class:`RLOptCallback` takes the decisions at epoch ends with the Trainer's eval metrics.

.. code-block:: python

    from transformers import TrainingArguments
    from rlopt import RLSwitchingOptimizer
    from rlopt.integrations.transformers import RLOptTrainer

    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam", "adamw"], policy="ppo",
                               lr=0.05, total_epochs=3)
    args = TrainingArguments("out", num_train_epochs=3, eval_strategy="epoch", report_to=[])
    trainer = RLOptTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                           compute_metrics=accuracy, optimizers=(opt, None))
    trainer.evaluate()          # optional: the metrics before training, for opt.baseline()
    trainer.train()             # trainer.train(resume_from_checkpoint=True) resumes bit for bit

**Steps.** The Trainer calls ``optimizer.step()`` with no closure, after its own forward, backward
and gradient clipping. :class:`RLOptTrainer` records each ``training_step`` and gives the step a
closure: its first call returns the loss already computed (the gradients are in place, nothing
is recomputed); a second call (SAM's) clears the gradients, replays the ``training_step`` of
every micro-batch since the last step (so gradient accumulation works) and clips as the Trainer
does. The policy thus sees the training loss. The replay uses :class:`transformers.Trainer`'s own
``training_step``: a subclass's override of it runs once per step.

**Decisions.** :class:`RLOptCallback` (added by :class:`RLOptTrainer`; add it yourself to a plain
``Trainer``, which then works for choices without SAM and gives the policy no training loss)
calls ``opt.epoch_end(val_loss, val_acc)`` once per epoch: after the epoch's evaluation when one
follows (``eval_strategy="epoch"``), else at ``on_epoch_end`` with the metrics of the last
evaluation in that epoch, if any. Both come before the epoch's checkpoint is saved, so resuming
is bit-identical. With ``interval=N`` the optimizer decides every N steps itself. An evaluation
before the first step (``trainer.evaluate()`` before ``train()``, or ``eval_on_start=True``)
goes to ``opt.baseline(...)``.

**Logging.** :class:`RLOptTrainer` adds the newest decision's choice index, reward, lr, weight
decay and signals (``rlopt/...``) to the Trainer's logs, which go wherever ``report_to`` says;
``tensorboard_dir``/``jsonl_path``/``csv_path`` of the callback write every decision to files
(:class:`~rlopt.integrations.logging.DecisionLogger`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Callable, Optional

try:
    from transformers import Trainer, TrainerCallback
except ImportError as err:
    raise ImportError(
        "rlopt.integrations.transformers needs transformers and accelerate: pip install 'rlopt[transformers]'"
    ) from err

from .logging import DecisionLogger, decision_record, find_controlled_optimizer, scalars

if TYPE_CHECKING:
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

__all__ = ["RLOptCallback", "RLOptTrainer"]


class RLOptCallback(TrainerCallback):
    """Calls the rlopt optimizer's ``epoch_end`` once per epoch with the eval metrics, and gives
    it an evaluation run before training as its baseline (see the module doc).

    Args:
        val_loss_key: the key of the validation loss in the eval metrics (None: not given).
        val_acc_key: the key of the validation accuracy, a fraction in [0, 1] (None: not given);
            ``compute_metrics`` returning ``{"accuracy": ...}`` gives ``eval_accuracy``.
        tensorboard_dir, jsonl_path, csv_path: write every decision there
            (:class:`~rlopt.integrations.logging.DecisionLogger`).

    A missing key is reported once by a warning listing the keys there are.
    """

    def __init__(
        self,
        val_loss_key: Optional[str] = "eval_loss",
        val_acc_key: Optional[str] = "eval_accuracy",
        tensorboard_dir: Optional[str] = None,
        jsonl_path: Optional[str] = None,
        csv_path: Optional[str] = None,
    ) -> None:
        for name, value in (("val_loss_key", val_loss_key), ("val_acc_key", val_acc_key)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {value!r}")
        self.val_loss_key, self.val_acc_key = val_loss_key, val_acc_key
        self._files: dict[str, Any] = {
            "tensorboard_dir": tensorboard_dir,
            "jsonl_path": jsonl_path,
            "csv_path": csv_path,
        }
        self.decision_logger: Optional[DecisionLogger] = None
        self.opt: Any = None
        self.trainer_log_cursor = -1  # the last decision RLOptTrainer put in the Trainer's logs
        self._epoch_pending = False
        self._metrics: dict[str, Optional[float]] = {}  # of the last evaluation since the last decision
        self._baseline: Optional[dict[str, Optional[float]]] = None
        self._warned: set = set()
        self.gives_closure = False  # set by RLOptTrainer

    def _convert(self, metrics: Mapping[str, Any]) -> dict[str, Optional[float]]:
        out: dict[str, Optional[float]] = {}
        for name, key in (("val_loss", self.val_loss_key), ("val_acc", self.val_acc_key)):
            value = None if key is None else metrics.get(key)
            if key is not None and value is None and key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"RLOptCallback: no '{key}' in the eval metrics (they have {sorted(metrics)}); the "
                    f"decision is taken without {name} (set {name}_key= to the right key, or None)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            out[name] = None if value is None else float(value)
        if out["val_loss"] is not None and math.isnan(out["val_loss"]):
            out["val_loss"] = None
        return out

    def _decide(self, metrics: Mapping[str, Optional[float]]) -> None:
        self.opt.epoch_end(**metrics)
        self._epoch_pending, self._metrics = False, {}
        if self.decision_logger is not None:
            self.decision_logger.log_new()

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        self.opt = find_controlled_optimizer(optimizer)
        self.decision_logger = DecisionLogger(self.opt, **self._files)
        if not self.gives_closure:
            _hint_closure(optimizer)
        self._epoch_pending, self._metrics = False, {}
        if self.opt.steps_taken > 0:  # resumed: the run that saved the checkpoint logged its decisions
            self.decision_logger.skip_existing()
            self.trainer_log_cursor = self.decision_logger.last_logged
        elif self._baseline is not None and hasattr(self.opt, "baseline") and self.opt.choice is None:
            self.opt.baseline(**self._baseline)
        self._baseline = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.decision_logger is not None:  # decisions every N steps
            self.decision_logger.log_new()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.opt is None:
            return
        self._epoch_pending = True
        if not control.should_evaluate:  # no evaluation follows: the metrics of this epoch's last one, if any
            self._decide(self._metrics)

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Optional[dict[str, float]] = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        converted = self._convert(metrics or {})
        opt = self.opt
        if opt is None:
            try:
                opt = find_controlled_optimizer(optimizer) if optimizer is not None else None
            except TypeError:
                opt = None
        if opt is not None and opt.steps_taken == 0 and opt.choice is None:  # before the first step
            if hasattr(opt, "baseline"):
                opt.baseline(**converted)
            return
        if self.opt is None:  # before train(), the optimizer not built yet
            self._baseline = converted
            return
        if self._epoch_pending:
            self._decide(converted)
        else:
            self._metrics = converted

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.opt is not None and self._epoch_pending:
            self._decide(self._metrics)
        if self.decision_logger is not None:
            self.decision_logger.log_new()
            self.decision_logger.close()


def _hint_closure(wrapper: Any) -> None:
    """Under a plain ``Trainer`` a choice that needs a closure (SAM) fails at the first step: say
    what to use instead."""
    if wrapper.__dict__.get("_rlopt_hint", False):
        return
    original = wrapper.step

    def step(closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
        try:
            return original(closure, **kwargs)
        except RuntimeError as err:
            if closure is None and "needs a closure" in str(err):
                raise RuntimeError(
                    f"{err}. The Hugging Face Trainer gives none: train with "
                    "rlopt.integrations.transformers.RLOptTrainer, which does"
                ) from err
            raise

    wrapper.step = step
    wrapper._rlopt_hint = True


class RLOptTrainer(Trainer):
    """A ``Trainer`` whose optimizer step receives a closure (see the module doc), with an
    :class:`RLOptCallback` (``rlopt_callback=``, default ``RLOptCallback()``) unless one is among
    ``callbacks``. Give the rlopt optimizer as ``optimizers=(opt, scheduler_or_None)``."""

    def __init__(self, *args: Any, rlopt_callback: Optional[RLOptCallback] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, RLOptCallback)]
        if rlopt_callback is not None and rlopt_callback not in found:
            self.add_callback(rlopt_callback)
            found.append(rlopt_callback)
        if not found:
            rlopt_callback = RLOptCallback()
            self.add_callback(rlopt_callback)
            found.append(rlopt_callback)
        self.rlopt_callback = found[0]
        for cb in found:
            cb.gives_closure = True
        self._rlopt_window: list = []  # the micro-batches since the last optimizer step
        self._rlopt_loss = None

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._install_closure_step()
        self._rlopt_window.append((model, inputs, args, kwargs))
        self._rlopt_loss = loss if self._rlopt_loss is None else self._rlopt_loss + loss
        return loss

    def _install_closure_step(self) -> None:
        wrapper = self.optimizer
        if wrapper.__dict__.get("_rlopt_closure_step", False):
            return
        original = wrapper.step

        def step(closure: Optional[Callable[[], Any]] = None, **kwargs: Any) -> Any:
            if closure is None:
                closure = self._take_closure()
            return original(closure, **kwargs)

        wrapper.step = step
        wrapper._rlopt_closure_step = True

    def _take_closure(self) -> Callable[[], Any]:
        window, loss = self._rlopt_window, self._rlopt_loss
        self._rlopt_window, self._rlopt_loss = [], None
        first = [loss]

        def closure() -> Any:
            if first:  # the Trainer's forward and backward of this step, already done
                return first.pop()
            total = None
            window[0][0].zero_grad(set_to_none=True)
            for model, inputs, args, kwargs in window:
                step_loss = Trainer.training_step(self, model, inputs, *args, **kwargs)
                total = step_loss if total is None else total + step_loss
            if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
                self.accelerator.clip_grad_norm_(window[0][0].parameters(), self.args.max_grad_norm)
            return total

        return closure

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        cb = self.rlopt_callback
        opt = cb.opt
        if opt is not None and opt.history and opt.history[-1]["decision"] > cb.trainer_log_cursor:
            record = decision_record(opt.history[-1], opt)
            logs = {**logs, **{f"rlopt/{k}": v for k, v in scalars(record).items()}}
            cb.trainer_log_cursor = record["decision"]
        super().log(logs, *args, **kwargs)
