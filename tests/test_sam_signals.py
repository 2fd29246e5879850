"""The signals that say when SAM may pay: the sharpness SAM measures on its own steps, the
learning rate against its peak, the gradient norm's z-score, the validation gap; and the
versioned layout that keeps policies trained on the earlier features working."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlopt import RLSwitchingOptimizer
from rlopt.control.observation import LAYOUT_VERSION, LAYOUTS, observation_layout
from rlopt.control.sharpness import measure_sharpness


def _task(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    return model, x, y


def _closure(get_opt, model, x, y):
    """torch's closure convention for ``model`` on ``(x, y)``; ``get_opt`` gives the optimizer
    (made after the closure in some tests)."""

    def closure():
        get_opt().zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def test_sharpness_of_sam_steps_is_the_direct_estimate():
    model, x, y = _task()
    rho = 0.05
    opt = RLSwitchingOptimizer(
        model.parameters(),
        choices=["sgd", ("sam", {"rho": rho})],
        policy="constant:sam",
        lr=0.1,
        interval=5,
        max_nonfinite_steps=None,
    )

    closure = _closure(lambda: opt, model, x, y)

    expected = []
    for _ in range(10):
        expected.append(float(measure_sharpness(list(model.parameters()), closure, rho)))  # weights restored
        opt.step(closure)
    got = [h["signals"]["sharpness"] for h in opt.history]
    # decisions come before the interval's last update: decision k covers steps 5k-4 .. 5k
    # decisions at steps 1 (the first: no SAM step yet), 5 and 10, each after its step's SAM pass
    assert len(got) == 3 and math.isnan(got[0])
    # the window holds float32 losses: the estimate agrees to float32 rounding of L(w + e) - L(w)
    assert got[1] == pytest.approx(sum(expected[:5]) / 5, rel=2e-3)
    assert got[2] == pytest.approx(sum(expected[5:]) / 5, rel=2e-3)
    assert all(e > 0 for e in expected)


def test_sgd_steps_leave_the_sharpness_unmeasured():
    model, x, y = _task()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="constant:sgd", lr=0.1, interval=3)

    closure = _closure(lambda: opt, model, x, y)

    for _ in range(9):
        opt.step(closure)
    assert all(math.isnan(h["signals"]["sharpness"]) for h in opt.history)
    assert "sharpness" not in opt.state_dict()["rlopt"]["tracker"]  # nothing kept for a signal never measured


def test_sam_steps_read_nothing_back_to_the_host(monkeypatch):
    model, x, y = _task()
    opt = RLSwitchingOptimizer(
        model.parameters(),
        choices=["sgd", "sam"],
        policy="constant:sam",
        lr=0.1,
        interval=1000,
        max_nonfinite_steps=None,
    )

    closure = _closure(lambda: opt, model, x, y)

    opt.step(closure)  # the first decision reads (once)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name: (reads.append(_n), _o(self, *a))[1]
        )
    for _ in range(20):
        opt.step(closure)
    monkeypatch.undo()
    assert reads == []


def test_lr_against_its_peak_and_the_gradient_norm_z_score():
    model, x, y = _task()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam"], policy="constant:sgd", lr=0.1, interval=2, signal_every=1
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 3) * (0.5 if k >= 6 else 1.0))

    closure = _closure(lambda: opt, model, x, y)

    for _ in range(12):
        opt.step(closure)
        sched.step()
    names = opt.observation_layout["names"]
    col = {n: names.index(n) for n in ("lr_to_peak", "grad_norm_z", "val_gap")}
    lrs = [h["signals"]["lr"] for h in opt.history]
    peak = 0.0
    for h, lr in zip(opt.history, lrs):
        peak = max(peak, lr)
        assert h["observation"][col["lr_to_peak"]] == pytest.approx(2 * lr / peak - 1, abs=1e-6)
    assert opt.history[-1]["observation"][col["lr_to_peak"]] == pytest.approx(0.0, abs=1e-6)  # half the peak
    zs = [h["observation"][col["grad_norm_z"]] for h in opt.history]
    assert zs[:2] == [0.0, 0.0] and any(z != 0.0 for z in zs[3:]) and all(-1 < z < 1 for z in zs)
    assert all(h["observation"][col["val_gap"]] == 0.0 for h in opt.history)  # no validation given
    opt.epoch_end(val_loss=closure().item() * 2)
    opt.step(closure), opt.step(closure)  # the next decision sees it
    assert opt.history[-1]["observation"][col["val_gap"]] > 0


def test_val_gap_is_the_log_ratio_of_validation_to_training_loss():
    model, x, y = _task()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam"], policy="constant:sgd", lr=0.1, interval="epoch"
    )

    closure = _closure(lambda: opt, model, x, y)

    for _ in range(3):
        opt.step(closure)
    opt.epoch_end(val_loss=2.0)
    h = opt.history[-1]
    col = opt.observation_layout["names"].index("val_gap")
    assert h["observation"][col] == pytest.approx(math.tanh(math.log(2.0 / h["signals"]["loss"])), abs=1e-6)


def test_a_policy_of_layout_version_1_gets_version_1_observations():
    from rlopt.registry import load_pretrained

    policy = load_pretrained("switch-sgd-sam")
    assert policy.obs_layout["version"] == 1
    model, x, y = _task()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="switch-sgd-sam", lr=0.1, interval=2)

    closure = _closure(lambda: opt, model, x, y)

    for _ in range(6):
        opt.step(closure)
    assert opt.observation_layout == observation_layout(("sgd", "sam"), (), 1)
    assert all(len(h["observation"]) == len(LAYOUTS[1]) + 2 for h in opt.history)
    fresh = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="dqn", lr=0.1)
    assert fresh.observation_layout["version"] == LAYOUT_VERSION == 2
    with pytest.raises(ValueError, match="Unknown observation layout version"):
        observation_layout(("sgd",), (), 99)


def test_checkpoints_keep_the_new_signals_and_older_ones_still_load():
    import copy

    _, x, y = _task()

    def make(model):
        return RLSwitchingOptimizer(
            model.parameters(), choices=["sgd", "sam"], policy="constant:sam", lr=0.1, interval=4
        )

    def closure_for(model, opt):
        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    model = _task()[0]
    opt = make(model)
    for _ in range(6):
        opt.step(closure_for(model, opt))
    model2 = copy.deepcopy(model)
    twin = make(model2)
    twin.load_state_dict(
        copy.deepcopy(opt.state_dict())
    )  # (a copy: torch shares loaded tensors) mid-interval: a SAM step's sharpness waits in the window
    for _ in range(4):
        opt.step(closure_for(model, opt))
        twin.step(closure_for(model2, twin))
    a, b = opt.history[-1]["signals"], twin.history[-1]["signals"]
    assert a.keys() == b.keys()
    for key in a:  # equal, or both unmeasured
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
    assert not math.isnan(twin.history[-1]["signals"]["sharpness"])
    # a checkpoint written before these signals existed: no sharpness entry, no running moments
    old = make(model)
    sd_old = old.state_dict()
    sd_old["rlopt"] = dict(sd_old["rlopt"])
    for part in sd_old["rlopt"].values():
        if isinstance(part, dict):
            part.pop("sharpness", None)
            part.pop("running", None)
    make(model).load_state_dict(sd_old)
