"""rlopt under Lightning and the Hugging Face Trainer, and the decision logger they share: every
choice (SAM included) trains, one decision per epoch, the validation metrics and the training
loss reach the policy, bf16 autocast, resume from the framework's checkpoint bit for bit (same
process, same operations: the runs must agree exactly). Tiny models on the CPU."""

import csv
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer
from rlopt.integrations.logging import DecisionLogger, decision_record, find_controlled_optimizer

CHOICES = ["sgd", "sam", "adam", "adamw"]


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _closure_steps(opt, model, x, y, steps):
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


# ------------------------------------------------------------------------------------ logging
def test_decision_logger_writes_each_decision_once(tmp_path):
    model = _net()
    x, y = _data()
    opt = QLearningRateOptimizer(model.parameters(), lr=0.1, interval=2, policy="dqn", seed=0)
    log = DecisionLogger(opt, jsonl_path=tmp_path / "d.jsonl", csv_path=tmp_path / "d.csv")
    _closure_steps(opt, model, x, y, 3)
    first = log.log_new()
    assert [r["decision"] for r in first] == [0, 1] and log.log_new() == []
    _closure_steps(opt, model, x, y, 3)
    opt.epoch_end(val_loss=0.75, val_acc=0.5)
    second = log.log_new()
    assert [r["decision"] for r in second] == [2, 3]  # decision 3 at step 6, before the epoch end
    assert second[-1]["signals/loss"] > 0 and second[-1]["lr"] == opt.history[-1]["lr"]
    assert second[-1]["policy/epsilon"] == opt.history[-1]["policy"]["epsilon"]  # the policy's diagnostics
    lines = [json.loads(s) for s in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in lines] == [0, 1, 2, 3]
    assert lines[0]["reward"] is None and lines[0]["signals/loss"] is None  # no interval behind it; NaN -> null
    assert lines[1]["choice"] in opt.action_names and isinstance(lines[1]["reward"], float)
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert [int(r["decision"]) for r in rows] == [0, 1, 2, 3]
    assert float(rows[-1]["signals/loss"]) == pytest.approx(lines[-1]["signals/loss"])
    log.close()


def test_decision_logger_switching_records_lr_and_grows_csv(tmp_path):
    model = _net()
    x, y = _data()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="random", lr=0.05, seed=0)
    _closure_steps(opt, model, x, y, 2)
    log = DecisionLogger(opt, csv_path=tmp_path / "d.csv")
    assert log.log_new()[0]["lr"] == 0.05  # read from param_groups[0] for the switching optimizer
    opt.epoch_end(val_loss=0.5)
    rec = log.log_new()[-1]
    assert rec["signals/val_loss"] == 0.5 and rec["choice"] in ("sgd", "adam")
    assert rec["choice_index"] == opt.action_names.index(rec["choice"])
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(rows) == 2 and rows[1]["signals/val_loss"] == "0.5"
    assert decision_record(opt.history[-1], opt) == rec


def test_decision_logger_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _net()
    x, y = _data()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="random", lr=0.05, seed=0)
    log = DecisionLogger(opt, tensorboard_dir=tmp_path / "tb")
    _closure_steps(opt, model, x, y, 3)
    opt.epoch_end(val_loss=0.5, val_acc=0.25)
    log.log_new()
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"rlopt/reward", "rlopt/choice_index", "rlopt/lr", "rlopt/signals/val_acc", "rlopt/signals/loss"} <= set(
        tags
    )
    assert [e.step for e in acc.Scalars("rlopt/signals/val_acc")] == [3]
    assert acc.Scalars("rlopt/signals/val_acc")[0].value == pytest.approx(0.25)


def test_decision_logger_bad_input():
    with pytest.raises(TypeError, match="rlopt optimizer"):
        DecisionLogger(torch.optim.SGD(_net().parameters(), lr=0.1))
    opt = RLSwitchingOptimizer(_net().parameters(), choices=["sgd"], policy="random")
    with pytest.raises(TypeError, match="jsonl_path"):
        DecisionLogger(opt, jsonl_path=3)

    class Wrapper:  # as accelerate and Lightning wrap an optimizer
        def __init__(self, inner):
            self.optimizer = inner

    assert find_controlled_optimizer(Wrapper(Wrapper(opt))) is opt


# ---------------------------------------------------------------------------------- Lightning
def _lightning():
    pl = pytest.importorskip("lightning.pytorch")
    from rlopt.integrations.lightning import RLOptCallback

    class Tiny(pl.LightningModule):
        def __init__(self, make_opt):
            super().__init__()
            self.net = _net()
            self.make_opt = make_opt
            self.val_seen = []
            self.logits_dtypes = set()
            self.train_calls = 0

        def training_step(self, batch, batch_idx):
            self.train_calls += 1
            x, y = batch
            out = self.net(x)
            self.logits_dtypes.add(out.dtype)
            return F.cross_entropy(out.float(), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            out = self.net(x).float()
            self.log("val_loss", F.cross_entropy(out, y))
            self.log("val_acc", (out.argmax(1) == y).float().mean())

        def on_validation_epoch_end(self):
            if not self.trainer.sanity_checking:
                self.val_seen.append(float(self.trainer.callback_metrics["val_loss"]))

        def configure_optimizers(self):
            return self.make_opt(self.parameters())

    return pl, Tiny, RLOptCallback


def _loaders():
    x, y = _data(64)
    xv, yv = _data(32, seed=1)
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=32)
    return train, val


def _pl_trainer(pl, tmp_path, epochs, callbacks, **kw):
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=pl.loggers.CSVLogger(tmp_path / "logs"),
        callbacks=callbacks,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
        **kw,
    )


@pytest.mark.parametrize("choice", CHOICES)
def test_lightning_every_choice_decides_each_epoch(tmp_path, choice):
    pl, Tiny, RLOptCallback = _lightning()
    model = Tiny(
        lambda p: RLSwitchingOptimizer(p, choices=CHOICES, policy=f"constant:{choice}", lr=0.05, total_epochs=3, seed=0)
    )
    before = [p.detach().clone() for p in model.parameters()]
    _pl_trainer(pl, tmp_path, 3, [RLOptCallback()], enable_checkpointing=False).fit(model, *_loaders())
    opt = find_controlled_optimizer(model.trainer.optimizers[0])
    assert opt.steps_taken == 12 and opt.choice == choice
    assert model.train_calls == (24 if choice == "sam" else 12)  # SAM called Lightning's closure twice a step
    assert [h["epoch"] for h in opt.history] == [0, 1, 2, 3]  # the first step's decision, then one per epoch
    last = opt.history[-1]
    assert last["signals"]["val_loss"] == pytest.approx(model.val_seen[-1])  # this epoch's metrics, not a stale one
    assert 0.0 <= last["signals"]["val_acc"] <= 1.0
    assert all(math.isfinite(h["signals"]["loss"]) and math.isfinite(h["reward"]) for h in opt.history[1:])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    metrics = list(csv.DictReader(open(tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv")))
    logged = [r for r in metrics if r.get("rlopt/reward")]
    assert len(logged) == 3 and float(logged[-1]["rlopt/signals/val_loss"]) == pytest.approx(model.val_seen[-1])


def test_lightning_interval_steps_and_lr_control_bf16(tmp_path):
    pl, Tiny, RLOptCallback = _lightning()
    model = Tiny(lambda p: QLearningRateOptimizer(p, base="sam", lr=0.05, interval=3, policy="dqn", seed=0))
    trainer = _pl_trainer(
        pl,
        tmp_path,
        2,
        [RLOptCallback(csv_path=str(tmp_path / "d.csv"))],
        precision="bf16-mixed",
        enable_checkpointing=False,
    )
    trainer.fit(model, *_loaders())
    opt = find_controlled_optimizer(trainer.optimizers[0])
    assert model.logits_dtypes == {torch.bfloat16}  # the closure ran under Lightning's autocast
    assert [h["step"] for h in opt.history] == [0, 3, 6]
    assert all(math.isfinite(h["signals"]["loss"]) for h in opt.history[1:])
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert [int(r["decision"]) for r in rows] == [h["decision"] for h in opt.history] and "lr" in rows[0]


def test_lightning_baseline_from_validate(tmp_path):
    pl, Tiny, RLOptCallback = _lightning()
    calls = []

    def make(p):
        opt = RLSwitchingOptimizer(p, choices=["sgd", "adam"], policy="ppo", lr=0.05, total_epochs=1, seed=0)
        original = opt.baseline
        opt.baseline = lambda **kw: (calls.append(kw), original(**kw))[1]
        return opt

    model = Tiny(make)
    train, val = _loaders()
    trainer = _pl_trainer(pl, tmp_path, 1, [RLOptCallback()], enable_checkpointing=False)
    trainer.validate(model, val, verbose=False)
    trainer.fit(model, train, val)
    assert len(calls) == 1 and set(calls[0]) == {"val_loss", "val_acc"} and calls[0]["val_loss"] > 0


def test_lightning_missing_key_warns(tmp_path):
    pl, Tiny, RLOptCallback = _lightning()
    model = Tiny(lambda p: RLSwitchingOptimizer(p, choices=["sgd"], policy="random", lr=0.05, seed=0))
    with pytest.warns(RuntimeWarning, match="no 'accuracy' in trainer.callback_metrics"):
        _pl_trainer(pl, tmp_path, 1, [RLOptCallback(val_acc_key="accuracy")], enable_checkpointing=False).fit(
            model, *_loaders()
        )
    with pytest.raises(TypeError, match="val_loss_key"):
        RLOptCallback(val_loss_key=3)
    model = Tiny(lambda p: RLSwitchingOptimizer(p, choices=["sgd", "sam"], policy="random", lr=0.05, seed=0))
    with pytest.raises(ValueError, match=r"Choices \['sam'\] evaluate the gradient twice"):
        _pl_trainer(pl, tmp_path, 1, [RLOptCallback()], accumulate_grad_batches=2, enable_checkpointing=False).fit(
            model, *_loaders()
        )


def test_lightning_mid_epoch_validation_does_not_decide(tmp_path):
    pl, Tiny, RLOptCallback = _lightning()
    model = Tiny(lambda p: RLSwitchingOptimizer(p, choices=["sgd", "adam"], policy="random", lr=0.05, seed=0))
    _pl_trainer(pl, tmp_path, 2, [RLOptCallback()], val_check_interval=0.5, enable_checkpointing=False).fit(
        model, *_loaders()
    )
    opt = find_controlled_optimizer(model.trainer.optimizers[0])
    assert len(model.val_seen) == 4 and [h["epoch"] for h in opt.history] == [0, 1, 2]
    assert opt.history[-1]["signals"]["val_loss"] == pytest.approx(model.val_seen[-1])


@pytest.mark.parametrize("save_on_train_epoch_end", [None, False])  # saved after on_train_epoch_end / on_validation_end
def test_lightning_resume_is_bit_identical(tmp_path, save_on_train_epoch_end):
    pl, Tiny, RLOptCallback = _lightning()

    def make(p):
        return RLSwitchingOptimizer(p, choices=["sgd", "sam", "adam"], policy="ppo", lr=0.05, total_epochs=3, seed=0)

    def run(root, epochs, ckpt=None):
        torch.manual_seed(0)
        model = Tiny(make)
        save = pl.callbacks.ModelCheckpoint(
            dirpath=root / "ckpt", save_top_k=-1, filename="{epoch}", save_on_train_epoch_end=save_on_train_epoch_end
        )
        trainer = _pl_trainer(pl, root, epochs, [RLOptCallback(), save])
        trainer.fit(model, *_loaders(), ckpt_path=ckpt)
        return model, find_controlled_optimizer(trainer.optimizers[0])

    full, opt_full = run(tmp_path / "a", 3)
    run(tmp_path / "b", 1)
    resumed, opt_resumed = run(tmp_path / "c", 3, ckpt=str(tmp_path / "b" / "ckpt" / "epoch=0.ckpt"))
    assert len(opt_full.history) == 4
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert [(h["choice"], h["reward"]) for h in opt_full.history] == [
        (h["choice"], h["reward"]) for h in opt_resumed.history
    ]


# ---------------------------------------------------------------------------------- Hugging Face
class _HFModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()
        self.dtypes = set()
        self.train_calls = 0

    def forward(self, x, labels=None):
        self.train_calls += self.training
        logits = self.net(x)
        self.dtypes.add(logits.dtype)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        self.x, self.y = _data(n, seed)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _accuracy(pred):
    logits, labels = pred.predictions, pred.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def _hf(tmp_path, make_opt, epochs=2, trainer_cls=None, callbacks=None, resume=None, **kw):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from rlopt.integrations.transformers import RLOptTrainer

    args = dict(
        output_dir=str(tmp_path),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        eval_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="epoch",
        seed=0,
        dataloader_num_workers=0,
    )
    args.update(kw)
    transformers.set_seed(0)
    model = _HFModel()
    opt = make_opt(model.parameters())
    cls = trainer_cls or RLOptTrainer
    trainer = cls(
        model=model,
        args=transformers.TrainingArguments(**args),
        train_dataset=_Rows(64, 0),
        eval_dataset=_Rows(32, 1),
        compute_metrics=_accuracy,
        optimizers=(opt, None),
        callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a plain nn.Module: the Trainer's notes about it
        trainer.train(resume_from_checkpoint=resume)
    return trainer, model, opt


@pytest.mark.parametrize("choice", CHOICES)
def test_transformers_every_choice_decides_each_epoch(tmp_path, choice):
    trainer, model, opt = _hf(
        tmp_path,
        lambda p: RLSwitchingOptimizer(
            p, choices=CHOICES, policy=f"constant:{choice}", lr=0.05, total_epochs=2, seed=0
        ),
    )
    assert opt.steps_taken == 8 and opt.choice == choice
    assert model.train_calls == (16 if choice == "sam" else 8)  # SAM's second gradient: the replayed step
    assert [h["epoch"] for h in opt.history] == [0, 1, 2]
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert len(evals) == 2
    assert opt.history[-1]["signals"]["val_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert opt.history[-1]["signals"]["val_acc"] == pytest.approx(evals[-1]["eval_accuracy"])
    assert all(math.isfinite(h["signals"]["loss"]) and h["signals"]["loss"] > 0 for h in opt.history[1:])
    assert all(math.isfinite(h["reward"]) for h in opt.history[1:])
    logged = [e for e in trainer.state.log_history if "rlopt/reward" in e]
    assert logged and logged[-1]["rlopt/choice_index"] == CHOICES.index(choice)


def test_transformers_sam_with_accumulation_and_bf16(tmp_path):
    trainer, model, opt = _hf(
        tmp_path,
        lambda p: QLearningRateOptimizer(p, base="sam", lr=0.05, interval=2, policy="dqn", seed=0, total_epochs=2),
        gradient_accumulation_steps=2,
        bf16=True,
    )
    assert model.dtypes == {torch.bfloat16}  # forward under accelerate's autocast, the replay included
    assert opt.steps_taken == 4 and [h["step"] for h in opt.history] == [0, 2, 4]
    assert model.train_calls == 16  # 4 steps x 2 micro-batches, each replayed for SAM's second gradient
    assert all(math.isfinite(h["signals"]["loss"]) and math.isfinite(h["reward"]) for h in opt.history[1:])
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert opt.history[-1]["signals"]["val_loss"] == pytest.approx(evals[-1]["eval_loss"])


def test_transformers_plain_trainer_with_callback_and_baseline(tmp_path):
    transformers = pytest.importorskip("transformers")
    from rlopt.integrations.transformers import RLOptCallback

    calls = []

    def make(p):
        opt = RLSwitchingOptimizer(p, choices=["sgd", "adam"], policy="ppo", lr=0.05, total_epochs=2, seed=0)
        original = opt.baseline
        opt.baseline = lambda **kw: (calls.append(kw), original(**kw))[1]
        return opt

    cb = RLOptCallback(jsonl_path=str(tmp_path / "d.jsonl"))
    trainer, model, opt = _hf(tmp_path, make, trainer_cls=transformers.Trainer, callbacks=[cb], eval_on_start=True)
    assert len(calls) == 1 and calls[0]["val_loss"] > 0 and 0 <= calls[0]["val_acc"] <= 1
    assert [h["epoch"] for h in opt.history] == [0, 1, 2]  # decides without the closure, too
    lines = [json.loads(s) for s in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [r["decision"] for r in lines] == [0, 1, 2]


def test_transformers_resume_is_bit_identical(tmp_path):
    def make(p):
        return RLSwitchingOptimizer(p, choices=["sgd", "sam", "adam"], policy="ppo", lr=0.05, total_epochs=3, seed=0)

    _, full, opt_full = _hf(tmp_path / "a", make, epochs=3, save_strategy="epoch")
    _, resumed, opt_resumed = _hf(
        tmp_path / "a", make, epochs=3, save_strategy="epoch", resume=str(tmp_path / "a" / "checkpoint-4")
    )
    assert opt_resumed.steps_taken == 12 and len(opt_full.history) == 4
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert [(h["choice"], h["reward"]) for h in opt_full.history] == [
        (h["choice"], h["reward"]) for h in opt_resumed.history
    ]


def test_transformers_plain_trainer_with_sam_says_what_to_use(tmp_path):
    transformers = pytest.importorskip("transformers")
    from rlopt.integrations.transformers import RLOptCallback

    with pytest.raises(RuntimeError, match="train with rlopt.integrations.transformers.RLOptTrainer"):
        _hf(
            tmp_path,
            lambda p: RLSwitchingOptimizer(p, choices=["sgd", "sam"], policy="random", lr=0.05, seed=0),
            trainer_cls=transformers.Trainer,
            callbacks=[RLOptCallback()],
        )


def test_lightning_notebook_executes():
    pytest.importorskip("lightning")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "notebooks" / "lightning.ipynb"
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "resumed run bit-identical: True" in outputs and "rlopt/choice_index" in outputs
