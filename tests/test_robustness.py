"""What a careful user expects of the controlled optimizers, through the public API only:
atomic checkpoints, recoverable errors, bounded memory, copies across processes, clear errors
for bad input and corrupt files, decisions under no_grad, a warning for a forgotten epoch_end."""

from __future__ import annotations

import copy
import io
import multiprocessing
import os
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_tree_equal, make_closure, make_data, make_model, roundtrip
from torch.nn import functional as F

import rlopt
from rlopt import SAM, QLearningRateOptimizer, RLSwitchingOptimizer


def _trained(policy="dqn", steps=7, model=None, **kw):
    model = model or make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam", "adam"], policy=policy, interval=2, seed=1, total_steps=40, **kw
    )
    x, y = make_data()
    for _ in range(steps):
        opt.step(make_closure(model, opt, x, y))
    return model, opt


def _break(sd, path, value=None, delete=False):
    """``sd`` with the entry at ``path`` (keys and indices) replaced or deleted."""
    sd = copy.deepcopy(sd)
    node = sd
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return sd


BROKEN = [
    ("policy-state-missing", ("rlopt", "policy", "state"), None, True, "rlopt.policy"),
    ("controller-missing", ("rlopt", "controller"), None, True, "lacks"),
    ("tracker-missing", ("rlopt", "tracker"), None, True, "lacks"),
    ("history-missing", ("rlopt", "controller", "history"), None, True, "rlopt.controller lacks"),
    ("policy-weight-shape", ("rlopt", "policy", "state", "q_net", "0.weight"), torch.zeros(3, 3), False, "shape"),
    ("epsilon", ("rlopt", "policy", "state", "epsilon"), 5.0, False, "epsilon"),
    ("rng-garbage", ("rlopt", "policy", "state", "rng"), torch.zeros(7, dtype=torch.uint8), False, "RNG"),
    ("tracker-shape", ("rlopt", "tracker", "acc"), torch.zeros(3, dtype=torch.float64), False, "rlopt.tracker"),
    ("action-99", ("rlopt", "controller", "action"), 99, False, "rlopt.controller.action"),
    ("inner-entry-deleted", ("rlopt", "inner"), lambda v: v[:-1], False, "rlopt.inner"),
    ("momentum-shape", ("rlopt", "inner", 0, "state", 0, "momentum_buffer"), torch.zeros(2, 2), False, "shape"),
    ("format-version", ("rlopt", "version"), 99, False, "version"),
    ("counts", ("rlopt", "controller", "counts", "step"), -4, False, "counts"),
]


@pytest.mark.parametrize("name,path,value,delete,msg", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_broken_checkpoint_raises_a_clear_error_and_changes_nothing(name, path, value, delete, msg):
    model, opt = _trained()
    good = roundtrip(opt.state_dict())
    _, fresh = _trained(steps=3, model=make_model(seed=4))
    before = roundtrip(fresh.state_dict())
    params = [p.detach().clone() for p in fresh.param_groups[0]["params"]]
    bad = _break(good, path, value, delete)
    with pytest.raises(ValueError, match=msg):
        fresh.load_state_dict(bad)
    assert_tree_equal(before, roundtrip(fresh.state_dict()))  # every inner state, policy, tracker, history
    assert all(torch.equal(p, q) for p, q in zip(fresh.param_groups[0]["params"], params))
    fresh.load_state_dict(good)  # and the good one still loads
    assert_tree_equal(roundtrip(fresh.state_dict()), good)


def test_a_checkpoint_of_another_model_with_as_many_parameters_is_refused():
    _, opt = _trained()
    other = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh(), torch.nn.Linear(3, 8))  # shapes differ
    assert sum(p.numel() for p in other.parameters()) != 0
    wrong = RLSwitchingOptimizer(
        other.parameters(), choices=["sgd", "sam", "adam"], policy="dqn", interval=2, seed=1, total_steps=40
    )
    with pytest.raises(ValueError, match="shape"):
        wrong.load_state_dict(roundtrip(opt.state_dict()))


# ----------------------------------------------------------------------------- recoverable errors
def _nan_closure(model, opt, x, y, bad):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("nan") if bad[0] else 1.0)
        loss.backward()
        return loss

    return closure


def test_the_nonfinite_error_leaves_nothing_changed_and_the_optimizer_recovers():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", interval=50, max_nonfinite_steps=3
    )
    bad = [False]
    closure = _nan_closure(model, opt, x, y, bad)
    opt.step(closure)
    bad[0] = True
    opt.step(closure)
    opt.step(closure)
    params = [p.detach().clone() for p in model.parameters()]
    steps = opt.steps_taken
    with pytest.raises(RuntimeError, match="not finite for 3 consecutive steps"):
        opt.step(closure)
    assert opt.steps_taken == steps and all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    bad[0] = False
    for param_group in opt.param_groups:
        param_group["lr"] *= 0.5  # the user lowers the lr and goes on
    for _ in range(4):
        opt.step(closure)  # no error any more, and the steps are applied
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "high"])
def test_a_reward_that_is_not_a_finite_number_changes_nothing(value):
    x, y = make_data()
    model = make_model()
    paid = [0.0]
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "adam"], policy="dqn", interval=2, reward=lambda ctx: paid[0]
    )
    for _ in range(5):
        opt.step(make_closure(model, opt, x, y))
    before = roundtrip(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    paid[0] = value
    with pytest.raises((ValueError, TypeError), match="reward function returned"):
        opt.step(make_closure(model, opt, x, y))  # the step that ends an interval
    assert_tree_equal(before, roundtrip(opt.state_dict()))  # counters, tracker, policy, history
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))  # not applied
    paid[0] = 0.0
    opt.step(make_closure(model, opt, x, y))  # the same step again, now with a finite reward
    assert opt.steps_taken == 6 and len(opt.history) == len(before["rlopt"]["controller"]["history"]) + 1
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


# ------------------------------------------------------------------------------- bounded memory
def test_history_is_bounded_and_the_checkpoint_stays_flat():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "adam"], policy="random", interval=1, history_size=50
    )
    sizes = []
    for k in range(400):
        opt.step(make_closure(model, opt, x, y))
        if k % 100 == 99:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            sizes.append(buf.tell())
    assert len(opt.history) == 50 and opt.history[-1]["step"] == 400
    slope = (sizes[-1] - sizes[1]) / 200  # bytes per decision once the history is full
    assert abs(slope) < 2, sizes
    unbounded = RLSwitchingOptimizer(
        make_model().parameters(), choices=["sgd"], policy="random", interval=1, history_size=None
    )
    assert unbounded.controller.history_size is None


# --------------------------------------------------------------------------------------- copies
def _child(model, opt, queue):
    try:
        x, y = make_data()
        opt.step(make_closure(model, opt, x, y))
        queue.put((opt.steps_taken, len(opt.history), float(next(model.parameters()).sum())))
    except BaseException:  # the parent reports it
        import traceback

        queue.put(traceback.format_exc())


@pytest.mark.parametrize("policy", ["dqn", "ppo"])
def test_a_spawned_process_receives_the_optimizer(policy):
    model, opt = _trained(policy=policy, steps=5)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    env = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env])
    try:
        proc = ctx.Process(target=_child, args=(model, opt, queue))
        proc.start()
        proc.join(120)
    finally:
        os.environ["PYTHONPATH"] = env
    result = queue.get(timeout=10)
    assert proc.exitcode == 0 and not isinstance(result, str), result
    steps, decisions, _ = result
    assert steps == 6 and decisions == len(opt.history) + 1


def test_copies_keep_every_component():
    model, opt = _trained(policy="ppo")
    for twin in (copy.deepcopy(opt), __import__("pickle").loads(__import__("pickle").dumps(opt))):
        assert_tree_equal(roundtrip(twin.state_dict()), roundtrip(opt.state_dict()))


# ------------------------------------------------------------------------------ policy files
@pytest.mark.parametrize("content", ["empty", "random", "truncated"])
def test_corrupt_policy_files_give_a_clear_error(tmp_path, content):
    good = tmp_path / "good.pt"
    rlopt.policies.DQNPolicy(5, ("a", "b")).save(good)
    path = tmp_path / "bad.pt"
    data = good.read_bytes()
    path.write_bytes(
        {"empty": b"", "random": np.random.default_rng(0).bytes(4096), "truncated": data[: len(data) // 10]}[content]
    )
    with pytest.raises(ValueError, match="bad.pt") as info:
        rlopt.load_policy(str(path))
    assert "weights_only" not in str(info.value)


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "group,err,msg",
    [
        (dict(momentum=2.0), ValueError, "Invalid momentum value: 2.0"),
        (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay value: -1.0"),
        (dict(lr=float("nan")), ValueError, "Invalid learning rate: nan"),
        (dict(betas=(0.9, 1.5)), ValueError, "Invalid beta parameter at index 1"),
        (dict(nesterov="yes"), TypeError, "nesterov must be a bool"),
    ],
)
@pytest.mark.parametrize("build", ["switching", "lr", "sam"])
def test_param_group_hyper_parameters_are_checked(build, group, err, msg):
    def make(params):
        if build == "switching":
            return RLSwitchingOptimizer(params, choices=["sgd", "adam"], policy="constant:sgd")
        if build == "lr":
            return QLearningRateOptimizer(params, policy="constant:lr:keep")
        return SAM(params, torch.optim.SGD, lr=0.1)

    model = make_model()
    with pytest.raises(err, match=msg):
        make([{"params": list(model[0].parameters()), **group}])
    opt = make(list(model[0].parameters()))
    with pytest.raises(err, match=msg):
        opt.add_param_group({"params": list(model[2].parameters()), **group})
    assert len(opt.param_groups) == 1


def test_numpy_scalars_are_accepted_where_torch_accepts_them():
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(),
        choices=["sgd", "sam"],
        lr=np.float32(0.1),
        seed=np.int64(3),
        total_steps=np.int64(100),
        interval=np.int64(5),
        momentum=np.float64(0.5),
    )
    x, y = make_data()
    opt.step(make_closure(model, opt, x, y))
    QLearningRateOptimizer(make_model().parameters(), lr=np.float64(0.05), seed=np.int32(1), total_epochs=np.int64(3))


def test_a_choice_that_is_not_a_name_says_so():
    with pytest.raises(TypeError, match="A choice must be a name or a \\(name, kwargs\\) pair, got 1"):
        RLSwitchingOptimizer(make_model().parameters(), choices=["sgd", 1])


@pytest.mark.parametrize("base", ["adam", "adamw"])
def test_onecycle_works_on_the_lr_optimizer_over_adam(base):
    model = make_model()
    opt = QLearningRateOptimizer(model.parameters(), base=base, lr=1e-3, policy="constant:lr:keep", interval=2)
    ref_model = make_model()
    ref = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[base](ref_model.parameters(), lr=1e-3, fused=True)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=12) for o in (opt, ref)]
    x, y = make_data()
    for _ in range(12):
        opt.step(make_closure(model, opt, x, y))
        make_closure(ref_model, ref, x, y)()
        ref.step()
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["betas"] == ref.param_groups[0]["betas"]  # beta1 was cycled on the wrapper
    for p, q in zip(model.parameters(), ref_model.parameters()):  # the same fused kernel, the same schedule
        assert torch.equal(p, q)


# ------------------------------------------------------------------------------- decisions
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("policy", ["dqn", "ppo"])
def test_epoch_end_works_with_gradients_off(context, policy):
    x, y = make_data()
    model = make_model()
    cfg = {
        "dqn": rlopt.policies.DQNConfig(learning_starts=2, batch_size=2),
        "ppo": rlopt.policies.PPOConfig(rollout_len=2, minibatch_size=2),
    }[policy]
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy=cfg, interval="epoch")
    for epoch in range(8):
        for _ in range(3):
            opt.step(make_closure(model, opt, x, y))
        with getattr(torch, context)():
            opt.epoch_end(val_loss=1.0 / (epoch + 1), val_acc=0.1 * epoch)
    updates = getattr(opt.policy, "n_updates", 0)
    assert len(opt.history) == 9 and updates > 0


def test_a_forgotten_epoch_end_warns_once():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd"], policy="constant:sgd", interval="epoch")
    for _ in range(5):
        opt.step(make_closure(model, opt, x, y))
    opt.epoch_end(val_acc=0.5)  # a first epoch of 5 steps
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(60):
            opt.step(make_closure(model, opt, x, y))
    messages = [str(w.message) for w in caught if "epoch_end" in str(w.message)]
    assert len(messages) == 1 and "opt.epoch_end(" in messages[0]


def test_the_first_decision_comes_at_the_first_step():
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="random", interval=2)
    assert opt.choice is None and opt.history == []
    x, y = make_data()
    opt.step(make_closure(model, opt, x, y))
    assert opt.choice in ("sgd", "adam") and opt.history[0]["step"] == 0


# -------------------------------------------------------------------------------- compile
def test_compiled_ordinary_steps_have_no_graph_break():
    if not hasattr(torch, "_dynamo") or not hasattr(torch._dynamo, "explain"):
        pytest.skip("this torch has no torch._dynamo.explain")
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", interval="epoch")
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the first decision (a host sync, not an ordinary step)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = torch._dynamo.explain(opt.step)()
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 5):
        return  # torch 2.4's explain counts a break with no reason given: there it must only run
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_a_first_step_that_fails_takes_its_first_decision_back():
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="ppo", interval=3)
    before = roundtrip(opt.state_dict())

    def failing():
        raise KeyError("out of memory, say")

    with pytest.raises(KeyError):
        opt.step(failing)
    assert opt.choice is None and opt.history == []
    assert_tree_equal(before, roundtrip(opt.state_dict()))


@pytest.mark.parametrize("steps", [4, 5])  # an ordinary step, and one that ends an interval
def test_an_update_that_raises_is_not_counted(steps):
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd"], policy="random", interval=3)
    for _ in range(steps):
        opt.step(make_closure(model, opt, x, y))
    before = roundtrip(opt.state_dict())
    inner = opt.inner_optimizers["sgd"]
    original = type(inner).step

    def broken(self, closure=None):
        raise RuntimeError("the inner update failed")

    type(inner).step = broken
    try:
        with pytest.raises(RuntimeError, match="inner update failed"):
            opt.step(make_closure(model, opt, x, y))
    finally:
        type(inner).step = original
    after = roundtrip(opt.state_dict())
    assert after["rlopt"]["controller"]["counts"] == before["rlopt"]["controller"]["counts"]
    assert len(after["rlopt"]["controller"]["history"]) == len(before["rlopt"]["controller"]["history"])
