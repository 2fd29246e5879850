"""What real training scripts need, through the public API: a closure that returns
``(loss, outputs)``, an lr optimizer paid from validation metrics alone, a starting baseline, a
warning for an lr carried over from another optimizer, extending a resumed run, inner lrs that
show a scheduler's change at once."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import make_closure, make_data, make_model, roundtrip
from torch.nn import functional as F

from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer


def _tuple_closure(model, opt, x, y):
    def closure():
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        return loss, out

    return closure


def test_a_closure_returning_loss_and_outputs_feeds_the_policy_and_gives_the_outputs_back():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="ppo", interval=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "no training loss" warning
        for _ in range(4):
            loss, out = opt.step(_tuple_closure(model, opt, x, y))
    assert out.shape == (len(x), 3) and loss.dim() == 0
    assert all(math.isfinite(h["signals"]["loss"]) for h in opt.history[1:])


def test_the_lr_optimizer_is_paid_from_validation_metrics_without_a_training_loss():
    x, y = make_data()
    model = make_model()
    opt = QLearningRateOptimizer(model.parameters(), policy="dqn", interval="epoch", lr=0.05)
    opt.baseline(val_loss=1.5)  # measured before training: the first epoch is paid too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the no-training-loss warning
        for epoch in range(5):
            for _ in range(3):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()  # no closure: no training loss
            opt.epoch_end(val_loss=1.0 / (epoch + 1), val_acc=0.1 * epoch)
    rewards = [h["reward"] for h in opt.history[1:]]
    assert all(r is not None and r > 0 for r in rewards), rewards  # the validation loss fell each epoch


def test_without_any_signal_the_optimizer_says_what_to_pass():
    x, y = make_data()
    model = make_model()
    opt = QLearningRateOptimizer(model.parameters(), policy="dqn", interval=2)
    with pytest.warns(UserWarning, match="Pass the loss"):
        for _ in range(4):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()


def test_a_baseline_before_training_makes_the_first_reward_pay_for_progress():
    x, y = make_data()
    rewards = {}
    for with_baseline in (False, True):
        model = make_model()
        opt = RLSwitchingOptimizer(
            model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", interval="epoch", total_epochs=3
        )
        if with_baseline:
            opt.baseline(val_loss=2.0, val_acc=0.2)
        for _epoch in range(2):
            for _ in range(2):
                opt.step(make_closure(model, opt, x, y))
            opt.epoch_end(val_loss=1.0, val_acc=0.5)
        rewards[with_baseline] = opt.history[1]["reward"]  # the first epoch's reward
        assert opt.history[1]["epoch"] == 1
    assert rewards[True] > rewards[False] + 1.0  # +0.3 accuracy and a halved validation loss are paid
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd"], policy="constant:sgd")
    opt.step(make_closure(model, opt, x, y))
    with pytest.raises(RuntimeError, match="before the first step"):
        opt.baseline(val_acc=0.1)


@pytest.mark.parametrize(
    "choice,lr,warns", [("sgd", 1.0, True), ("sgd", 0.1, False), ("adam", 10.0, True), ("adam", 0.1, False)]
)
def test_an_implausible_lr_for_the_running_choice_warns_once(choice, lr, warns):
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=[choice], policy=f"constant:{choice}", lr=lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(make_closure(model, opt, x, y))
    hits = [w for w in caught if "usually trains at" in str(w.message)]
    assert len(hits) == (1 if warns else 0)


def test_extending_a_resumed_run_moves_the_horizon_and_pays_the_final_reward_once():
    x, y = make_data()

    def build(model, epochs):
        return RLSwitchingOptimizer(
            model.parameters(), choices=["sgd", "adam"], policy="ppo", interval="epoch", total_epochs=epochs, seed=0
        )

    model = make_model()
    opt = build(model, 2)
    for _ in range(2):
        opt.step(make_closure(model, opt, x, y))
    opt.epoch_end(val_loss=1.0, val_acc=0.3)
    for _ in range(2):
        opt.step(make_closure(model, opt, x, y))
    ckpt = roundtrip(opt.state_dict())  # saved before the shorter run's last epoch_end
    longer = build(model, 3)
    longer.load_state_dict(ckpt)
    for epoch in (2, 3):
        longer.epoch_end(val_loss=1.0 / epoch, val_acc=0.3 + 0.1 * epoch)
        if epoch == 2:
            for _ in range(2):
                longer.step(make_closure(model, longer, x, y))
    finals = [h for h in longer.history if h["final"]]
    assert len(finals) == 1 and finals[0]["epoch"] == 3
    assert longer.history[-2]["signals"]["progress"] == pytest.approx(2 / 3)
    done = roundtrip(longer.state_dict())
    extended = build(make_model(), 4)
    with pytest.warns(UserWarning, match="final reward was paid"):
        extended.load_state_dict(done)


def test_inner_learning_rates_show_a_schedulers_change_at_once():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(make_closure(model, opt, x, y))
    sched.step()
    inner = opt.inner_optimizers
    assert inner["sgd"].param_groups[0]["lr"] == 0.05 and inner["adam"].param_groups[0]["lr"] == 0.05 * 0.01
