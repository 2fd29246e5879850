"""PyTorch Lightning: :class:`RLOptCallback` takes rlopt's decisions at the right point of
Lightning's loop and logs them.

.. code-block:: python

    import lightning as L
    from rlopt import RLSwitchingOptimizer
    from rlopt.integrations.lightning import RLOptCallback

    class Model(L.LightningModule):
        ...
        def validation_step(self, batch, batch_idx):
            ...
            self.log("val_loss", loss)
            self.log("val_acc", acc)             # a fraction in [0, 1]

        def configure_optimizers(self):
            return RLSwitchingOptimizer(self.parameters(), choices=["sgd", "sam", "adam"], policy="ppo",
                                        lr=0.1, total_epochs=self.trainer.max_epochs)

    L.Trainer(max_epochs=5, callbacks=[RLOptCallback()]).fit(model, train_loader, val_loader)

**When.** Lightning runs the epoch's validation inside the training epoch. The callback calls
``opt.epoch_end(val_loss, val_acc)`` with ``trainer.callback_metrics`` at the end of that
validation (``on_validation_end``, skipping the sanity check and validations in the middle of an
epoch), or at ``on_train_epoch_end`` without metrics in epochs without one, once per epoch, always before
``ModelCheckpoint`` saves (Lightning runs checkpoint callbacks last), so a checkpoint holds the
epoch's decision and resuming from it is bit-identical (the callback's state, the epoch last
decided, is in the checkpoint too). Decisions every N steps (``interval=N``)
are taken by the optimizer itself; the callback still marks the epochs and logs them.

**Steps.** Automatic optimization needs nothing more: Lightning hands ``optimizer.step`` a
closure (forward, backward, gradient clipping), which SAM calls twice and from which the policy
sees the training loss. With SAM, ``training_step`` (and its ``self.log`` calls) runs twice per
step; SAM with ``accumulate_grad_batches > 1`` is refused (Lightning's closure covers only the last
micro-batch). Manual optimization: call ``opt.step(closure)`` yourself.

**Baseline.** Lightning's sanity check sees only a few batches, so the callback does not use it.
Run ``trainer.validate(model, val_loader)`` before ``trainer.fit``: the callback keeps those
metrics and gives them to ``opt.baseline(...)`` at the start of training (not when resuming), so
the first epoch's reward pays for its progress.

**Logging.** Each decision's choice (as ``rlopt/choice_index``), reward, lr, weight decay and
signals go to the trainer's loggers through ``pl_module.log_dict`` (keys ``rlopt/...``), and with
``tensorboard_dir``/``jsonl_path``/``csv_path`` also to those files
(:class:`~rlopt.integrations.logging.DecisionLogger`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as pl
    except ImportError as err:
        raise ImportError("rlopt.integrations.lightning needs Lightning: pip install 'rlopt[lightning]'") from err

from .logging import DecisionLogger, find_controlled_optimizer, scalars

__all__ = ["RLOptCallback"]


def _metric(metrics: dict[str, Any], key: Optional[str]) -> Optional[float]:
    if key is None or key not in metrics:
        return None
    value = metrics[key]
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().item() if value.numel() == 1 else None
    return None if value is None else float(value)


class RLOptCallback(pl.Callback):
    """Calls ``epoch_end`` of the rlopt optimizer once per training epoch with the validation
    metrics, and logs its decisions (see the module doc).

    Args:
        val_loss_key: the key of the validation loss in ``trainer.callback_metrics`` (None: not given).
        val_acc_key: the key of the validation accuracy, a fraction in [0, 1] (None: not given).
        log: log the decisions through the LightningModule's loggers.
        tensorboard_dir, jsonl_path, csv_path: also write them there
            (:class:`~rlopt.integrations.logging.DecisionLogger`).
        optimizer_index: which of the module's optimizers is the rlopt one (None: the only one).

    A missing metric key is reported once by a warning listing the keys there are; the decision
    is then taken without it.
    """

    def __init__(
        self,
        val_loss_key: Optional[str] = "val_loss",
        val_acc_key: Optional[str] = "val_acc",
        log: bool = True,
        tensorboard_dir: Optional[str] = None,
        jsonl_path: Optional[str] = None,
        csv_path: Optional[str] = None,
        optimizer_index: Optional[int] = None,
    ):
        super().__init__()
        for name, value in (("val_loss_key", val_loss_key), ("val_acc_key", val_acc_key)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {value!r}")
        if not isinstance(log, bool):
            raise TypeError(f"log must be a bool, got {log!r}")
        if optimizer_index is not None and (isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int)):
            raise TypeError(f"optimizer_index must be an int or None, got {optimizer_index!r}")
        self.val_loss_key, self.val_acc_key, self.log = val_loss_key, val_acc_key, log
        self._files: dict[str, Any] = {
            "tensorboard_dir": tensorboard_dir,
            "jsonl_path": jsonl_path,
            "csv_path": csv_path,
        }
        self.optimizer_index = optimizer_index
        self.decision_logger: Optional[DecisionLogger] = None
        self._decided_epoch = -1  # the epoch whose epoch_end was called (trainer.current_epoch)
        self._pending: list = []  # records taken where Lightning does not allow self.log
        self._baseline: Optional[dict[str, Optional[float]]] = None
        self._warned: set = set()

    # ----------------------------------------------------------------- helpers
    def optimizer(self, trainer: pl.Trainer) -> Any:
        """The rlopt optimizer among ``trainer.optimizers`` (unwrapped)."""
        opts = list(trainer.optimizers)
        if self.optimizer_index is not None:
            return find_controlled_optimizer(opts[self.optimizer_index])
        found = []
        for o in opts:
            try:
                found.append(find_controlled_optimizer(o))
            except TypeError:
                pass
        if len(found) != 1:
            raise RuntimeError(
                f"RLOptCallback found {len(found)} rlopt optimizers among the module's "
                f"{len(opts)}; give optimizer_index="
            )
        return found[0]

    def _metrics(self, trainer: pl.Trainer) -> dict[str, Optional[float]]:
        metrics = trainer.callback_metrics
        out = {}
        for name, key in (("val_loss", self.val_loss_key), ("val_acc", self.val_acc_key)):
            out[name] = _metric(metrics, key)
            if key is not None and out[name] is None and key not in self._warned:
                self._warned.add(key)
                warnings.warn(
                    f"RLOptCallback: no '{key}' in trainer.callback_metrics (it has {sorted(metrics)}); "
                    f"the decision is taken without {name} (set {name}_key= to the key your module "
                    "logs, or None)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if out["val_loss"] is not None and math.isnan(out["val_loss"]):
            out["val_loss"] = None
        return out

    def _epoch_end(self, trainer: pl.Trainer, metrics: dict[str, Optional[float]]) -> None:
        opt = self.optimizer(trainer)
        # the policy may learn here: run outside Lightning's no_grad/inference_mode of validation
        with torch.inference_mode(False), torch.enable_grad():
            opt.epoch_end(**metrics)
        self._decided_epoch = trainer.current_epoch
        if self.decision_logger is not None:
            self._pending.extend(self.decision_logger.log_new())

    def _emit(self, pl_module: pl.LightningModule, records: list, on_step: bool) -> None:
        if not self.log or not records:
            return
        values = scalars(records[-1])  # one value per key and hook; the files get every record
        if values:
            pl_module.log_dict(
                {f"rlopt/{k}": v for k, v in values.items()},
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=1,
                sync_dist=False,
            )

    def state_dict(self) -> dict[str, Any]:
        """The epoch last decided: a checkpoint saved at the end of validation, before
        ``on_train_epoch_end``, resumes into that hook, which must not decide again."""
        return {"decided_epoch": self._decided_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._decided_epoch = int(state_dict.get("decided_epoch", -1))

    # ------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # a new fit; a checkpoint's state, if any, is loaded after this
            self._decided_epoch = -1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fn = getattr(trainer.state.fn, "value", trainer.state.fn)
        if fn == "validate":  # a validation before fit: kept for opt.baseline()
            self._baseline = self._metrics(trainer)
            return
        if fn != "fit" or trainer.sanity_checking or not trainer.is_last_batch:
            return
        if self._decided_epoch != trainer.current_epoch:
            self._epoch_end(trainer, self._metrics(trainer))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        opt = self.optimizer(trainer)
        if (
            trainer.accumulate_grad_batches > 1
            and pl_module.automatic_optimization
            and any(hasattr(o, "base_optimizer") for o in opt.inner_optimizers.values())
        ):
            sam = [n for n, o in opt.inner_optimizers.items() if hasattr(o, "base_optimizer")]
            raise ValueError(
                f"Choices {sam} evaluate the gradient twice, but with accumulate_grad_batches="
                f"{trainer.accumulate_grad_batches} the closure Lightning gives the step covers only the "
                "last micro-batch: use accumulate_grad_batches=1 (or larger batches) with them"
            )
        self.decision_logger = DecisionLogger(opt, **self._files)
        self._pending = []
        if opt.steps_taken > 0:  # resumed: what is in the history was logged by the run that saved it
            self.decision_logger.skip_existing()
        elif self._baseline is not None and hasattr(opt, "baseline"):
            opt.baseline(**self._baseline)
        self._baseline = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.decision_logger is not None:
            self._emit(pl_module, self.decision_logger.log_new(), on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._decided_epoch != trainer.current_epoch:  # no validation at this epoch's end: no fresh metrics
            self._epoch_end(trainer, {})
        pending, self._pending = self._pending, []
        self._emit(pl_module, pending, on_step=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decision_logger is not None:
            self.decision_logger.log_new()
            self.decision_logger.close()
