"""RLSwitchingOptimizer: ground truth by difference, resume, schedulers, bad inputs, non-finite
steps, param-group edge cases, copies, training end to end.

Style of PyTorch's test_optim: one table of configurations (CONFIGS) and one of error inputs
(ERRORS); generic tests run over them.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
from conftest import (
    assert_state_equal,
    assert_tree_equal,
    make_closure,
    make_data,
    make_model,
    normalize,
    roundtrip,
    two_groups,
)
from test_sam import ReferenceSAM
from torch import nn
from torch.nn import functional as F

from rlopt import RLSwitchingOptimizer
from rlopt.policies import DQNConfig, Policy, PPOConfig
from rlopt.rewards import SwitchingReward

ALL = ["sgd", "sam", "adam", "adamw"]


# ----------------------------------------------------------------------------- configurations
def _plain(model):
    return list(model.parameters())


def _grouped(model):
    return two_groups(model)


def _edge_params(model):
    """A frozen layer (grad None), a zero-size parameter and an unused parameter."""
    model[0].requires_grad_(False)
    model.empty = nn.Parameter(torch.zeros(0, 3))
    model.unused = nn.Parameter(torch.ones(2))
    return [*model.parameters()]


def _lr_groups(params, scale):
    """The reference optimizer's groups: each user group's lr times the choice's lr scale."""
    if params and isinstance(params[0], dict):
        return [{**g, "lr": g.get("lr", 0.1) * scale} for g in params]
    return params


@dataclass
class Case:
    id: str
    choice: str  # the active choice (constant policy)
    make_ref: Callable  # (params, fused) -> reference torch optimizer with the wrapper's semantics
    choice_kwargs: Optional[dict] = None
    wrapper_kwargs: Optional[dict] = None
    params: Callable = _plain

    def build(self, model):
        choices = [(c, self.choice_kwargs or {}) if c == self.choice else c for c in ALL]
        return RLSwitchingOptimizer(
            self.params(model),
            choices=choices,
            policy=f"constant:{self.choice}",
            **{"lr": 0.1, **(self.wrapper_kwargs or {})},
        )

    def reference(self, model, fused):
        return self.make_ref(self.params(model), fused)


def _sgd(**kw):
    return lambda params, fused: torch.optim.SGD(params, **{"lr": 0.1, "momentum": 0.9, **kw}, fused=fused)


def _adam(cls=torch.optim.Adam, lr=1e-3, scale=0.01, **kw):
    return lambda params, fused: cls(_lr_groups(params, scale), lr=lr, **kw, fused=fused)


def _sam(**kw):
    return lambda params, fused: ReferenceSAM(
        params, torch.optim.SGD, **{"lr": 0.1, "momentum": 0.9, "rho": 0.05, **kw}, fused=fused
    )


CONFIGS = [
    Case("sgd", "sgd", _sgd()),
    Case(
        "sgd-nesterov-wd",
        "sgd",
        _sgd(nesterov=True, weight_decay=5e-4),
        choice_kwargs=dict(nesterov=True, weight_decay=5e-4),
    ),
    Case(
        "sgd-wrapper-momentum-wd",
        "sgd",
        _sgd(momentum=0.5, weight_decay=1e-2),
        wrapper_kwargs=dict(momentum=0.5, weight_decay=1e-2),
    ),
    Case("sgd-pinned-momentum", "sgd", _sgd(momentum=0.3), choice_kwargs=dict(momentum=0.3)),
    Case("sgd-groups", "sgd", _sgd(), params=_grouped),
    Case("sgd-edge-params", "sgd", _sgd(), params=_edge_params),
    Case("adam", "adam", _adam()),
    Case(
        "adam-betas-amsgrad",
        "adam",
        _adam(betas=(0.8, 0.99), amsgrad=True),
        choice_kwargs=dict(betas=(0.8, 0.99), amsgrad=True),
    ),
    Case("adam-abs-lr", "adam", _adam(lr=3e-3, scale=3e-3 / 0.1), choice_kwargs=dict(lr=3e-3)),
    Case("adam-groups", "adam", _adam(), params=_grouped),
    Case("adam-edge-params", "adam", _adam(), params=_edge_params),
    Case("adamw", "adamw", _adam(torch.optim.AdamW, weight_decay=1e-2)),
    Case(
        "adamw-wrapper-wd-groups",
        "adamw",
        _adam(torch.optim.AdamW, weight_decay=0.05),
        wrapper_kwargs=dict(weight_decay=0.05),
        params=_grouped,
    ),
    Case("sam", "sam", _sam()),
    Case(
        "sam-nesterov-wd-rho",
        "sam",
        _sam(nesterov=True, weight_decay=5e-4, rho=0.2),
        choice_kwargs=dict(nesterov=True, weight_decay=5e-4, rho=0.2),
    ),
    Case("sam-groups", "sam", _sam(), params=_grouped),
    Case("sam-edge-params", "sam", _sam(), params=_edge_params),
]
IDS = [c.id for c in CONFIGS]


def _inner_state(opt, choice):
    inner = opt.inner_optimizers[choice]
    return getattr(inner, "base_optimizer", inner).state


def _ref_state(ref):
    return getattr(ref, "base_optimizer", ref).state


def _nonempty(state):
    return {k: v for k, v in state.items() if v}


def assert_inner_matches(opt_state, ref_state, opt_params, ref_params, exact, rtol=1e-5, atol=1e-6):
    """The wrapper's inner state equals the reference's, parameter by parameter (matched by
    position in the two models). rlopt pre-zeroes SGD momentum buffers for every parameter
    (documented in ``_prepare_state``): a parameter the reference never stepped (no gradient)
    may only hold those untouched zeros."""
    opt_params, ref_params = list(opt_params), list(ref_params)
    assert len(opt_params) == len(ref_params)
    for p, q in zip(opt_params, ref_params):
        a, b = opt_state.get(p, {}), ref_state.get(q, {})
        if not b:
            assert set(a) <= {"momentum_buffer"} and not any(v.any() for v in a.values()), a
            continue
        assert_state_equal({p: a}, {q: b}, exact=exact, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------- ground truth by difference
@pytest.mark.parametrize("fused", [True, False], ids=["fused-exact", "default-allclose"])
@pytest.mark.parametrize("case", CONFIGS, ids=IDS)
def test_constant_policy_matches_plain_torch(case, fused):
    x, y = make_data()
    m_opt, m_ref = make_model(), make_model()
    opt, ref = case.build(m_opt), case.reference(m_ref, fused)
    start = [p.detach().clone() for p in m_opt.parameters()]
    for _ in range(10):
        c_ref = make_closure(m_ref, ref, x, y)
        if isinstance(ref, ReferenceSAM):
            l_ref = ref.step(c_ref)
        else:
            l_ref = c_ref()
            ref.step()
        l_opt = opt.step(make_closure(m_opt, opt, x, y))
        assert opt.choice == case.choice
        if fused:  # bit for bit: the same fused kernel on both sides (SAM: the same perturbation
            # arithmetic as the reference, then the same fused SGD step); found_inf=0 changes nothing
            assert torch.equal(l_opt, l_ref)
            for p, q in zip(m_opt.parameters(), m_ref.parameters()):
                assert torch.equal(p, q)
        else:  # torch's default (for-loop) kernel against rlopt's fused one: other roundings,
            # float32 tolerances over 10 steps
            torch.testing.assert_close(l_opt, l_ref, rtol=1e-5, atol=1e-6)
            for p, q in zip(m_opt.parameters(), m_ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert_inner_matches(
            _inner_state(opt, case.choice), _ref_state(ref), m_opt.parameters(), m_ref.parameters(), exact=fused
        )
    moved = [not torch.equal(p, s) for p, s in zip(m_opt.parameters(), start)]
    assert any(moved)
    if case.params is _edge_params:  # frozen, empty and unused parameters are left alone
        assert not any(moved[:2]) and m_opt[0].weight.grad is None
        assert torch.equal(m_opt.unused, torch.ones(2)) and m_opt.empty.numel() == 0


def test_inner_optimizers_keep_their_own_state_across_switches():
    """Adam's moments are untouched during an SGD stretch and resume where they were."""
    x, y = make_data()
    model = make_model()
    script = [0, 0, 1, 1, 0]  # adam, adam, sgd, sgd, adam; interval 2
    opt = RLSwitchingOptimizer(model.parameters(), choices=["adam", "sgd"], policy=Scripted(script), interval=2)
    closure = make_closure(model, opt, x, y)
    adam, sgd = opt.inner_optimizers["adam"], opt.inner_optimizers["sgd"]
    for _ in range(4):
        opt.step(closure)
    assert opt.choice == "sgd"
    saved = copy.deepcopy(adam.state)
    sgd_before = [sgd.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for _ in range(4):
        opt.step(closure)
        assert opt.history[-1]["choice"] in ("sgd", "adam")
        assert_state_equal(adam.state, saved)
    assert all(float(s["step"]) == 4 for s in adam.state.values())
    assert all(not torch.equal(sgd.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), sgd_before))
    assert opt.choice == "adam"
    opt.step(closure)
    assert all(float(s["step"]) == 5 for s in adam.state.values())
    assert [h["choice"] for h in opt.history] == ["adam", "adam", "sgd", "sgd", "adam"]


class Scripted(Policy):
    """Plays a fixed list of actions (a test double; knows nothing of parameters)."""

    kind = "scripted"

    def __init__(self, actions: list[int]):
        super().__init__(1, ["_"])
        self.actions = list(actions)
        self.i = 0
        self.rewards = []
        self.observations = []

    def act(self, obs):
        self.observations.append(obs.clone())
        action = self.actions[min(self.i, len(self.actions) - 1)]
        self.i += 1
        return action

    def observe(self, reward, next_obs, *, terminal=False, truncated=False):
        self.rewards.append((reward, terminal, truncated))
        return {}


def _sgd_sam(model, script, **kw):
    return RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam"], policy=Scripted(script), interval=2, lr=0.1, **kw
    )


def test_sgd_and_sam_share_one_momentum_buffer_across_switches():
    """A switch between SGD and SAM carries the velocity on: the wrapper equals one SAM whose base
    SGD also takes the plain steps (a schedule running SAM's ascent on some steps of one SGD)."""
    x, y = make_data()
    m_opt, m_ref = make_model(), make_model()
    opt = _sgd_sam(m_opt, [0, 1, 1, 0, 1])
    ref = ReferenceSAM(m_ref.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, fused=True)
    ran = []
    for k in range(10):
        opt.step(make_closure(m_opt, opt, x, y))
        # the choice that ran step k: the last decision taken before it (at a step count <= k)
        ran.append(next(h["choice"] for h in reversed(opt.history) if h["step"] <= k))
        closure = make_closure(m_ref, ref, x, y)
        if ran[-1] == "sam":
            ref.step(closure)
        else:
            closure()
            ref.base_optimizer.step()
        for p, q in zip(m_opt.parameters(), m_ref.parameters()):
            assert torch.equal(p, q), f"step {k}"
    assert ran == ["sgd"] * 2 + ["sam"] * 4 + ["sgd"] * 2 + ["sam"] * 2
    assert opt.inner_optimizers["sgd"].state is opt.inner_optimizers["sam"].base_optimizer.state


def test_separate_momentum_when_asked():
    x, y = make_data()
    model = make_model()
    opt = _sgd_sam(model, [0, 1], share_momentum=False)
    sgd, sam = opt.inner_optimizers["sgd"], opt.inner_optimizers["sam"].base_optimizer
    assert sgd.state is not sam.state
    for _ in range(2):
        opt.step(make_closure(model, opt, x, y))
    sgd_buffers = [sgd.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    assert all(not torch.any(sam.state[p]["momentum_buffer"]) for p in model.parameters())  # SAM starts at 0
    for _ in range(2):
        opt.step(make_closure(model, opt, x, y))
    assert all(torch.equal(sgd.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), sgd_buffers))
    with pytest.raises(TypeError, match="share_momentum must be a bool"):
        RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], share_momentum="yes")


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_shared_momentum_survives_checkpoints_and_copies(how):
    x, y = make_data()
    model = make_model()
    opt = _sgd_sam(model, [0, 1, 0])
    for _ in range(3):
        opt.step(make_closure(model, opt, x, y))
    if how == "state_dict":
        m2 = make_model(seed=1)
        m2.load_state_dict(model.state_dict())
        o2 = _sgd_sam(m2, [0, 1, 0])
        o2.load_state_dict(roundtrip(opt.state_dict()))
        o2.policy.i = opt.policy.i  # the test double keeps its place in the script outside its state
    else:
        m2, o2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert o2.inner_optimizers["sgd"].state is o2.inner_optimizers["sam"].base_optimizer.state
    for _ in range(3):
        for m, o in ((model, opt), (m2, o2)):
            o.step(make_closure(m, o, x, y))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))


def test_loading_a_checkpoint_with_separate_momentum_warns():
    x, y = make_data()
    model = make_model()
    opt = _sgd_sam(model, [0], share_momentum=False)
    opt.step(make_closure(model, opt, x, y))
    o2 = _sgd_sam(make_model(), [0])
    with pytest.warns(RuntimeWarning, match="share_momentum=False"):
        o2.load_state_dict(roundtrip(opt.state_dict()))
    assert o2.inner_optimizers["sgd"].state is o2.inner_optimizers["sam"].base_optimizer.state


@pytest.fixture(autouse=True)
def _scripted_fits(monkeypatch):
    """Let a Scripted policy take whatever action set / layout the optimizer has."""
    import rlopt.control.resolve as resolve

    original = resolve.check_policy

    def check(policy, action_names, layout):
        if isinstance(policy, Scripted):
            policy.action_names, policy.obs_dim, policy.obs_layout = tuple(action_names), len(layout["names"]), layout
        return original(policy, action_names, layout)

    monkeypatch.setattr(resolve, "check_policy", check)


# ------------------------------------------------------------------------------------- closures
def test_step_without_closure_when_no_choice_needs_one():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="constant:sgd")
    ref_model = make_model()
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9, fused=True)
    for _ in range(3):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            assert o.step() is None
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_missing_closure_with_sam_among_choices_raises_at_first_step():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="constant:sgd")
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"needs a closure.*\['sam'\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.state_dict()["rlopt"]["controller"]["counts"]["step"] == 0


def test_step_returns_closure_loss():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sam", "adam"], policy="constant:sam")
    expected = F.cross_entropy(model(x), y)
    assert torch.equal(opt.step(make_closure(model, opt, x, y)), expected)


# --------------------------------------------------------------------------------- resume
DQN_SMALL = DQNConfig(hidden=16, learning_starts=2, batch_size=4, target_update=2, epsilon_decay=0.7)
PPO_SMALL = PPOConfig(hidden=16, rollout_len=2, update_epochs=2)
RESUME = [
    ("dqn-interval3", DQN_SMALL, 3),
    ("ppo-interval3", PPO_SMALL, 3),
    ("dqn-default-interval3", "dqn", 3),
    ("ppo-epoch", PPO_SMALL, "epoch"),
    ("random-interval2", "random", 2),
]


def _run_side_by_side(pairs, x, y, steps, start, epoch_every=4):
    for k in range(start, start + steps):
        for model, opt in pairs:
            opt.step(make_closure(model, opt, x, y))
            if opt.interval == "epoch" and (k + 1) % epoch_every == 0:
                opt.epoch_end(val_loss=1.0 / (k + 2), val_acc=min(1.0, 0.1 * k))
        if len(pairs) == 2:
            (m1, o1), (m2, o2) = pairs
            for p, q in zip(m1.parameters(), m2.parameters()):
                assert torch.equal(p, q), f"step {k}"
            assert o1.choice == o2.choice


def _build_resume(policy, interval, model):
    return RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam", "adam"], policy=policy, interval=interval, seed=3, total_steps=40
    )


@pytest.mark.parametrize("name,policy,interval", RESUME, ids=[r[0] for r in RESUME])
def test_resume_equivalence(name, policy, interval):
    x, y = make_data()
    m1 = make_model()
    o1 = _build_resume(policy, interval, m1)
    n_steps = 7  # mid-interval: pending gradient snapshot, pending policy transition
    _run_side_by_side([(m1, o1)], x, y, n_steps, 0)
    assert o1.state_dict()["rlopt"]["controller"]["counts"]["step"] == n_steps
    ckpt = roundtrip({"model": m1.state_dict(), "opt": o1.state_dict()})

    m2 = make_model(seed=1)  # a fresh process: different weights until loaded
    o2 = _build_resume(policy, interval, m2)
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    assert_tree_equal(normalize(o1.history), normalize(o2.history))
    updates_at_resume = getattr(o1.policy, "n_updates", None)

    _run_side_by_side([(m1, o1), (m2, o2)], x, y, 23, n_steps)
    assert_tree_equal(normalize(o1.history), normalize(o2.history))
    assert len(o1.history) > 3
    assert_tree_equal(o1.state_dict(), o2.state_dict())
    learns = not (isinstance(o1.policy.config, DQNConfig) and o1.policy.config.learning_starts > len(o1.history))
    if updates_at_resume is not None and learns:  # the policy learned after the resume, identically
        # (the default DQN waits for more transitions than this short run makes: its resume is checked above)
        assert o1.policy.n_updates > updates_at_resume
    if isinstance(interval, int):
        assert len({h["choice"] for h in o1.history}) > 1  # decisions really vary


def test_state_dict_keeps_params_by_index_and_loads_weights_only():
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="dqn", interval=2)
    x, y = make_data()
    for _ in range(3):
        opt.step(make_closure(model, opt, x, y))
    sd = roundtrip(opt.state_dict())
    for inner in sd["rlopt"]["inner"]:
        assert all(isinstance(k, int) for k in inner["state"])
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]


# --------------------------------------------------------------------------- LR schedulers
def _plateau(opt):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)


SCHEDULERS = {
    "step": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6),
    "onecycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.2, total_steps=10, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
    "plateau": _plateau,
}


def _sched_step(sched, k):
    if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
        sched.step(float(k))  # an ever-worse metric: the lr halves every step
    else:
        sched.step()


@pytest.mark.parametrize("sched_name", sorted(SCHEDULERS))
@pytest.mark.parametrize("choice", ALL + ["sgd-pinned"])
def test_scheduler_reaches_inner_optimizer(choice, sched_name):
    x, y = make_data()
    model = make_model()
    choices = [
        ("sgd-pinned", {"family": "sgd", "momentum": 0.5}) if c == "sgd-pinned" else c for c in ALL + ["sgd-pinned"]
    ]
    opt = RLSwitchingOptimizer(two_groups(model), choices=choices, policy=f"constant:{choice}", lr=0.1)
    spec = {s.name: s for s in opt.choices}[choice]
    inner = opt.inner_optimizers[choice]
    sched = SCHEDULERS[sched_name](opt)
    lrs, moms = set(), set()
    for k in range(8):
        opt.step(make_closure(model, opt, x, y))
        for group, inner_group in zip(opt.param_groups, inner.param_groups):
            assert inner_group["lr"] == group["lr"] * spec.lr_scale
            lrs.add(group["lr"])
            if choice in ("sgd", "sam"):
                assert inner_group["momentum"] == group["momentum"]
                moms.add(group["momentum"])
            elif choice == "sgd-pinned":
                assert inner_group["momentum"] == 0.5
            else:
                assert inner_group["betas"] == (0.9, 0.999)
        _sched_step(sched, k)
    assert len(lrs) > 2  # the scheduler really moved the lr
    if sched_name == "onecycle" and choice in ("sgd", "sam"):
        assert len(moms) > 2


def test_onecycle_on_wrapper_equals_onecycle_on_torch_sgd():
    """Exact: the scheduler (lr and momentum cycling) on the wrapper reaches SGD as on plain SGD."""
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    opt = RLSwitchingOptimizer(m1.parameters(), choices=["sgd", "adam"], policy="constant:sgd", lr=0.1)
    ref = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, fused=True)
    s1, s2 = (SCHEDULERS["onecycle"](o) for o in (opt, ref))
    for _ in range(10):
        opt.step(make_closure(m1, opt, x, y))
        c = make_closure(m2, ref, x, y)
        c()
        ref.step()
        s1.step()
        s2.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p, q)


# ------------------------------------------------------------------------------ bad inputs
def _p():
    return [nn.Parameter(torch.zeros(2))]


ERRORS = [
    (dict(lr=-0.1), ValueError, "Invalid learning rate"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
    (dict(lr=float("inf")), ValueError, "Invalid learning rate"),
    (dict(params=[{"params": _p(), "lr": -1.0}]), ValueError, "Invalid learning rate"),
    (dict(params=[{"params": _p(), "lr": float("nan")}]), ValueError, "Invalid learning rate"),
    (dict(momentum=1.5), ValueError, "Invalid momentum"),
    (dict(momentum=float("nan")), ValueError, "Invalid momentum"),
    (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay"),
    (dict(weight_decay=float("nan")), ValueError, "Invalid weight_decay"),
    (dict(lr="0.1"), TypeError, "Invalid learning rate: '0.1'"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Tensor lr must be 1-element"),
    (dict(momentum="0.9"), TypeError, "Invalid momentum value: '0.9'"),
    (dict(weight_decay=True), TypeError, "Invalid weight_decay value: True"),
    (dict(weight_decay="x"), TypeError, "Invalid weight_decay value: 'x'"),
    (dict(seed=2**70), ValueError, "Invalid seed"),
    (dict(choices=["sgd", "lion"]), ValueError, "Unknown choice 'lion'"),
    (dict(choices=[]), ValueError, "must not be empty"),
    (dict(choices="sgd"), TypeError, "not a string"),
    (dict(choices=["sgd", "sgd"]), ValueError, "Duplicate choice"),
    (dict(choices=[("sgd", {"betas": (0.9, 0.99)})]), TypeError, "Unknown option"),
    (dict(choices=[("adam", {"lr": -1e-3})]), ValueError, "Invalid learning rate for choice 'adam'"),
    (dict(choices=[("adam", {"lr": float("nan")})]), ValueError, "Invalid learning rate for choice"),
    (dict(choices=[("adam", {"betas": (1.5, 0.9)})]), ValueError, "Invalid options for choice 'adam'"),
    (dict(choices=[("sgd", {"nesterov": True, "momentum": 0.0})]), ValueError, "choice 'sgd'"),
    (dict(policy="alphazero"), ValueError, "Unknown policy 'alphazero'"),
    (dict(policy="constant:lion"), ValueError, "Unknown action 'lion'"),
    (dict(policy=3), TypeError, "Invalid policy"),
    (dict(interval=0), ValueError, "Invalid interval"),
    (dict(interval=-2), ValueError, "Invalid interval"),
    (dict(interval="step"), TypeError, "interval must be"),
    (dict(interval=2.5), TypeError, "interval must be"),
    (dict(max_nonfinite_steps=0), ValueError, "Invalid max_nonfinite_steps"),
    (dict(total_steps=0), ValueError, "Invalid total_steps"),
    (dict(seed="a"), TypeError, "seed must be an int"),
    (dict(reward=3), TypeError, "reward must be callable"),
    (dict(signal_every=0), ValueError, "Invalid signal_every"),
]


@pytest.mark.parametrize("kwargs,err,msg", ERRORS, ids=[f"{i}-{list(e[0])[0]}" for i, e in enumerate(ERRORS)])
def test_bad_inputs(kwargs, err, msg):
    kwargs = dict(kwargs)
    params = kwargs.pop("params", _p())
    with pytest.raises(err, match=msg):
        RLSwitchingOptimizer(params, **{"choices": ["sgd", "adam"], **kwargs})


@pytest.mark.parametrize(
    "kwargs,err,msg",
    [
        (dict(val_acc=1.5), ValueError, "fraction"),
        (dict(val_acc=-0.1), ValueError, "fraction"),
        (dict(val_loss=float("nan")), ValueError, "NaN"),
        (dict(val_loss="low"), TypeError, "must be a number"),
    ],
)
def test_bad_epoch_end(kwargs, err, msg):
    opt = RLSwitchingOptimizer(_p(), choices=["sgd", "adam"], policy="constant:sgd")
    with pytest.raises(err, match=msg):
        opt.epoch_end(**kwargs)


def test_bad_add_param_group():
    opt = RLSwitchingOptimizer(_p(), choices=["sgd", "adam"], policy="constant:sgd")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": _p(), "lr": float("nan")})
    with pytest.raises(TypeError, match="param_group must be a dict"):
        opt.add_param_group(_p())
    assert all(len(o.param_groups) == 1 for o in opt.inner_optimizers.values())


def _trained(choices, policy, model=None, steps=4, groups=None):
    x, y = make_data()
    model = model or make_model()
    opt = RLSwitchingOptimizer(groups or model.parameters(), choices=choices, policy=policy, interval=2)
    for _ in range(steps):
        opt.step(make_closure(model, opt, x, y))
    return model, opt


LOAD_ERRORS = [
    ("other-choices", dict(choices=["sgd", "adam", "sam"]), "choices"),
    ("fewer-choices", dict(choices=["sgd", "sam"]), "choices"),
    ("other-policy-kind", dict(policy="ppo"), "policy.kind"),
    ("other-policy-config", dict(policy=DQNConfig(hidden=16)), "policy.config"),
    ("other-groups", dict(groups="two"), "param_groups"),
    ("not-rlopt", dict(plain=True), "Not an rlopt optimizer state dict"),
    ("tracker-without-version", dict(old_tracker=True), r"rlopt.tracker: .*lacks \['version'\]"),
]


@pytest.mark.parametrize("name,src,msg", LOAD_ERRORS, ids=[e[0] for e in LOAD_ERRORS])
def test_failed_load_changes_nothing(name, src, msg):
    model, opt = _trained(["sgd", "sam", "adam"], "dqn", steps=5)
    before = roundtrip(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    policy_before = roundtrip(opt.policy.state_dict())
    if src.get("plain"):
        other = torch.optim.SGD(make_model().parameters(), lr=0.1).state_dict()
    else:
        m = make_model(seed=5)
        groups = two_groups(m) if src.get("groups") == "two" else None
        _, o = _trained(src.get("choices", ["sgd", "sam", "adam"]), src.get("policy", "dqn"), m, steps=3, groups=groups)
        other = roundtrip(o.state_dict())
        if src.get("old_tracker"):  # a tracker state without its version
            del other["rlopt"]["tracker"]["version"]
    with pytest.raises(ValueError, match=msg):
        opt.load_state_dict(other)
    assert_tree_equal(before, roundtrip(opt.state_dict()))
    assert_tree_equal(policy_before, roundtrip(opt.policy.state_dict()))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    # and it still works
    x, y = make_data()
    opt.step(make_closure(model, opt, x, y))


# ------------------------------------------------------------------------------- non-finite
NONFINITE_CHOICES = [
    ("sgd", {}),
    ("sgd", {"nesterov": True, "weight_decay": 1e-3}),
    ("adam", {}),
    ("adamw", {}),
    ("sam", {}),
    ("sgd", {"fused": False}),
    ("adam", {"fused": False}),
    ("sam", {"fused": False}),
]
BAD = {
    "nan-loss": "loss",  # loss NaN -> NaN gradients
    "inf-grad": "grad",  # finite loss, one gradient entry inf
    "nan-loss-only": "loss_only",  # gradients fine, the returned loss NaN
    "inf-grad-second-pass": "sam_second",  # SAM's second gradient inf (first fine)
}


def _bad_closure(model, opt, x, y, mode, bad):
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if bad() and mode == "loss":
            loss = loss * float("nan")
        loss.backward()
        if bad() and (mode == "grad" or (mode == "sam_second" and calls[0] % 2 == 0)):
            model[0].weight.grad[0, 0] = float("inf")
        if bad() and mode == "loss_only":
            return torch.tensor(float("nan"))
        return loss

    return closure


def _snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        {n: copy.deepcopy(_inner_state(opt, n)) for n in opt.inner_optimizers},
    )


def _build_nonfinite(choice, kw, model, **extra):
    choices = [(choice, kw), "adam" if choice != "adam" else "sgd"]
    if kw.get("fused") is False:
        with pytest.warns(RuntimeWarning, match="without fused kernels"):
            return RLSwitchingOptimizer(model.parameters(), choices=choices, policy=f"constant:{choice}", **extra)
    return RLSwitchingOptimizer(model.parameters(), choices=choices, policy=f"constant:{choice}", **extra)


@pytest.mark.parametrize("mode", sorted(BAD))
@pytest.mark.parametrize("choice,kw", NONFINITE_CHOICES, ids=[f"{c}{kw}" for c, kw in NONFINITE_CHOICES])
def test_nonfinite_step_is_skipped_counted_and_penalised(choice, kw, mode):
    if BAD[mode] == "sam_second" and choice != "sam":
        mode = "inf-grad"
    x, y = make_data()
    model = make_model()
    opt = _build_nonfinite(
        choice,
        kw,
        model,
        interval=5,
        max_nonfinite_steps=3,
        reward=SwitchingReward(acc=0, loss=0, cost=0, cost_per_decision=0, final=0),
    )
    is_bad = [False]
    closure = _bad_closure(model, opt, x, y, BAD[mode], lambda: is_bad[0])
    for _ in range(3):
        opt.step(closure)
    params, states = _snapshot(model, opt)
    assert states[choice]  # the inner optimizer has state to protect
    is_bad[0] = True
    for _ in range(2):
        opt.step(closure)
        for p, q in zip(model.parameters(), params):
            assert torch.equal(p, q)
        for n in opt.inner_optimizers:
            assert_state_equal(_inner_state(opt, n), states[n])
    # the decision at step 5 saw 2 skipped steps out of 5
    last = opt.history[-1]
    assert last["step"] == 5 and last["signals"]["skipped"] == 2
    names = opt.observation_layout["names"]
    assert last["observation"][names.index("skipped")] == pytest.approx(0.4)
    assert last["reward"] == pytest.approx(-0.4)  # only the skip penalty is switched on
    # consecutive: one more bad step makes three in a row -> error
    with pytest.raises(RuntimeError, match="not finite for 3 consecutive steps"):
        opt.step(closure)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    for n in opt.inner_optimizers:
        assert_state_equal(_inner_state(opt, n), states[n])


def test_nonfinite_runs_must_be_consecutive():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", interval=4, max_nonfinite_steps=2
    )
    pattern = [True, False, True, False, True, False, True]
    i = [0]
    closure = _bad_closure(model, opt, x, y, "loss", lambda: pattern[i[0]])
    for i[0] in range(len(pattern)):
        opt.step(closure)
    assert opt.state_dict()["rlopt"]["controller"]["counts"]["skipped_total"] == 2
    assert [h["signals"]["skipped"] for h in opt.history[1:]] == [2]


def test_dqn_policy_sees_the_penalty():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(),
        choices=["sgd", "adam"],
        policy=DQNConfig(learning_starts=100),
        interval=2,
        max_nonfinite_steps=None,
        reward=SwitchingReward(acc=0, loss=0, cost=0, cost_per_decision=0, final=0),
    )
    closure = _bad_closure(model, opt, x, y, "loss", lambda: True)
    for _ in range(4):
        opt.step(closure)
    buf = opt.policy.buffer
    assert len(buf) == 2 and torch.equal(buf.reward[:2], torch.tensor([-1.0, -1.0]))


@pytest.mark.parametrize("choice,ref_cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_nonfinite_first_step_then_normal_equals_torch_on_normal_steps(choice, ref_cls):
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    opt = RLSwitchingOptimizer(
        m1.parameters(), choices=["sgd", "adam"], policy=f"constant:{choice}", lr=0.1, momentum=0.9
    )
    lr = 0.1 if choice == "sgd" else 1e-3
    extra = dict(momentum=0.9) if choice == "sgd" else {}
    ref = ref_cls(m2.parameters(), lr=lr, fused=True, **extra)
    bad = [True]
    opt.step(_bad_closure(m1, opt, x, y, "loss", lambda: bad[0]))
    bad[0] = False
    for _ in range(5):
        opt.step(_bad_closure(m1, opt, x, y, "loss", lambda: bad[0]))
        make_closure(m2, ref, x, y)()
        ref.step()
        for p, q in zip(m1.parameters(), m2.parameters()):  # same fused kernel; the skipped step
            assert torch.equal(p, q)  # touched no parameter and no state
    assert_inner_matches(_inner_state(opt, choice), ref.state, m1.parameters(), m2.parameters(), exact=True)


def test_skipped_sam_step_leaves_batch_norm_statistics_finite():
    """A SAM step whose first gradient is not finite is skipped, and its second pass runs at w,
    not at a NaN perturbation: the model's buffers (batch norm) stay finite, as under SGD."""
    x, y = make_data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(x.shape[1], 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="constant:sam", lr=0.1)
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        (loss * (float("inf") if calls[0] == 1 else 1.0)).backward()  # the first gradient only
        return loss

    w = [p.detach().clone() for p in model.parameters()]
    opt.step(closure)
    assert calls[0] == 2 and opt.tracker.summary()["skipped"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert bool(torch.isfinite(model[1].running_mean).all() and torch.isfinite(model[1].running_var).all())


@pytest.mark.parametrize("saved,loaded", [(False, True), (True, False)])
def test_checkpoint_moves_between_fused_and_unfused_choices(saved, loaded):
    """A checkpoint keeps the loading optimizer's own kernels (fused or not): the inner groups'
    implementation flags are not taken from the file, and training goes on alike."""
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*runs without fused kernels.*")  # fused=False, asked for
        o1 = RLSwitchingOptimizer(m1.parameters(), choices=[("sgd", {"fused": saved})], policy="constant:sgd", lr=0.1)
        o2 = RLSwitchingOptimizer(m2.parameters(), choices=[("sgd", {"fused": loaded})], policy="constant:sgd", lr=0.1)
    for _ in range(3):
        o1.step(make_closure(m1, o1, x, y))
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(roundtrip(o1.state_dict()))
    assert o2.inner_optimizers["sgd"].param_groups[0]["fused"] is loaded
    for _ in range(3):
        o1.step(make_closure(m1, o1, x, y))
        o2.step(make_closure(m2, o2, x, y))
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q)


def test_sparse_gradients_are_refused_before_anything_changes():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 3, sparse=True)
    opt = RLSwitchingOptimizer(emb.parameters(), choices=["sgd", "adam"], policy="constant:sgd", lr=0.1)
    w = emb.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = emb(torch.tensor([1, 2, 3])).square().sum()
        loss.backward()
        return loss

    for _ in range(2):  # the first step and a later one (no gradient sample due)
        with pytest.raises(RuntimeError, match="does not support sparse gradients"):
            opt.step(closure)
    assert torch.equal(emb.weight, w) and opt.tracker.steps == 0


def test_param_group_edits_reach_the_inner_optimizers():
    """A hand edit of param_groups (as a weight-decay schedule makes) reaches every choice that
    takes the value from the wrapper; a choice that pins its own keeps it."""
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    opt = RLSwitchingOptimizer(
        m1.parameters(),
        choices=[("sgd", {}), ("adamw", {"weight_decay": 0.05}), "adam"],
        policy="constant:sgd",
        lr=0.1,
        weight_decay=0.0,
    )
    ref = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=0.0, fused=True)
    for o in (opt, ref):
        o.param_groups[0]["weight_decay"] = 0.5
        o.param_groups[0]["momentum"] = 0.5
    for _ in range(3):
        opt.step(make_closure(m1, opt, x, y))
        make_closure(m2, ref, x, y)()
        ref.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    inner = {name: o.param_groups[0] for name, o in opt.inner_optimizers.items()}
    assert inner["sgd"]["weight_decay"] == 0.5 and inner["sgd"]["momentum"] == 0.5
    opt.controller.action = 2  # the next steps run adam (as a decision would choose it)
    opt.step(make_closure(m1, opt, x, y))
    assert inner["adam"]["weight_decay"] == 0.5
    opt.controller.action = 1
    opt.step(make_closure(m1, opt, x, y))
    assert inner["adamw"]["weight_decay"] == 0.05  # pinned by the choice


def test_steps_without_a_loss_warn_once_and_the_loss_can_be_passed():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", interval=2)
    with pytest.warns(UserWarning, match="training loss") as caught:
        for _ in range(4):  # two decisions without a loss: one warning
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert len([w for w in caught if "training loss" in str(w.message)]) == 1
    assert caught[0].filename == __file__  # it points at the caller's line
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(lambda loss=loss: loss)  # after backward(): the loss reaches the policy
    assert opt.history[-1]["signals"]["loss"] == pytest.approx(loss.detach().item(), rel=0.05)


@pytest.mark.parametrize("returned", ["vector", "tuple", "list", "not-a-loss"])
def test_closure_may_return_an_unreduced_loss_or_a_tuple(returned):
    """As with torch optimizers, step() returns what the closure returned. An unreduced loss is
    tracked by its mean; a tuple or list ``(loss, outputs)`` by its first element (the pattern of
    scripts that need the outputs); anything else is not tracked."""
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="constant:sam", interval=2)

    def closure():
        opt.zero_grad()
        out = model(x)
        per_sample = F.cross_entropy(out, y, reduction="none")
        per_sample.mean().backward()
        return {
            "vector": per_sample,
            "tuple": (per_sample.mean(), out),
            "list": [per_sample.mean(), out],
            "not-a-loss": "done",
        }[returned]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [opt.step(closure) for _ in range(2)]
    assert type(out[0]) is {"vector": torch.Tensor, "tuple": tuple, "list": list, "not-a-loss": str}[returned]
    loss = opt.history[-1]["signals"]["loss"]
    expected = F.cross_entropy(model(x), y).item()
    if returned == "not-a-loss":
        assert math.isnan(loss) and any("training loss" in str(w.message) for w in caught)
    else:
        assert 0 < loss < 2 * expected and not any("training loss" in str(w.message) for w in caught)


@pytest.mark.filterwarnings("ignore:None of the last")  # GradScaler: no closure, no loss
@pytest.mark.parametrize(
    "choice,ref_cls,unscale_first",
    [("sgd", torch.optim.SGD, False), ("adam", torch.optim.Adam, False), ("sgd", torch.optim.SGD, True)],
)
def test_grad_scaler_steps_match_torch_and_count_every_step(choice, ref_cls, unscale_first):
    """With torch.amp.GradScaler the wrapper equals torch's fused optimizer under the same scaler,
    an overflowed step included (skipped on the device), and every step reaches the budget."""
    x, y = make_data()
    lr = 0.1 if choice == "sgd" else 1e-3
    extra = dict(momentum=0.9) if choice == "sgd" else {}
    results = []
    for wrapped in (True, False):
        model = make_model()
        opt = (
            RLSwitchingOptimizer(
                model.parameters(),
                choices=["sgd", "adam"],
                policy=f"constant:{choice}",
                lr=0.1,
                interval=2,
                total_steps=6,
            )
            if wrapped
            else ref_cls(model.parameters(), lr=lr, fused=True, **extra)
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for t in range(6):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if t == 2:
                next(model.parameters()).grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        results.append((model, opt, scaler.get_scale()))
    (m1, o1, s1), (m2, _, s2) = results
    # Bit for bit: GradScaler's scales are powers of two, so rlopt's g * (1 / scale) and the fused
    # kernel's g / scale are the same number; the update is the same fused kernel.
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert s1 == s2 == 2.0**9  # one overflow: the scale was halved once
    assert o1.steps_taken == 6 and o1.history[-1]["final"]
    assert sum(h["signals"]["skipped"] for h in o1.history) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")  # dynamo's graph-break notes; the missing loss
def test_compiled_step_equals_the_eager_step():
    """torch.compile(opt.step) (as torch documents for its own optimizers) runs and steps alike."""
    x, y = make_data()
    models, opts = [make_model(), make_model()], []
    for m in models:
        opts.append(RLSwitchingOptimizer(m.parameters(), choices=["sgd", "adam"], policy="constant:sgd", lr=0.1))
    steps = [torch.compile(opts[0].step, backend="eager"), opts[1].step]
    for _ in range(3):
        for m, opt, step in zip(models, opts, steps):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            step()
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q)
    assert opts[0].steps_taken == opts[1].steps_taken == 3


def test_state_dict_hooks_see_the_whole_state():
    """torch's optimizer state-dict hooks run around the wrapper's whole state: a save post-hook
    sees the "rlopt" entry, a load pre-hook can transform it, a load post-hook sees it loaded."""
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    o1 = RLSwitchingOptimizer(m1.parameters(), choices=["sgd", "adam"], policy="dqn", interval=2)
    for _ in range(5):
        o1.step(make_closure(m1, o1, x, y))
    calls = []
    o1.register_state_dict_pre_hook(lambda opt: calls.append("save-pre"))
    o1.register_state_dict_post_hook(lambda opt, sd: calls.append(("save-post", "rlopt" in sd)))
    sd = o1.state_dict()
    o2 = RLSwitchingOptimizer(m2.parameters(), choices=["sgd", "adam"], policy="dqn", interval=2)

    def drop_last_decision(opt, state):  # a pre-hook that edits the rlopt entry
        ctl = state["rlopt"]["controller"]
        state["rlopt"] = {**state["rlopt"], "controller": {**ctl, "history": ctl["history"][:-1]}}
        calls.append("load-pre")

    o2.register_load_state_dict_pre_hook(drop_last_decision)
    o2.register_load_state_dict_post_hook(lambda opt: calls.append(("load-post", len(opt.history))))
    o2.load_state_dict(sd)
    n = len(o1.history) - 1
    assert calls == ["save-pre", ("save-post", True), "load-pre", ("load-post", n)]
    assert len(o2.history) == n and len(sd["rlopt"]["controller"]["history"]) == n + 1  # the caller's dict is kept


@pytest.mark.parametrize("choice", ["sgd", "sam", "adam"])
def test_bf16_autocast_in_the_closure_equals_torch(choice):
    """bf16 autocast inside the closure (the README's mixed-precision recipe) with each choice
    equals torch's fused optimizer (SAM: the reference SAM) under the same autocast."""
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    opt = RLSwitchingOptimizer(m1.parameters(), choices=["sgd", "sam", "adam"], policy=f"constant:{choice}", lr=0.1)
    ref = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, fused=True),
        "sam": lambda p: ReferenceSAM(p, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, fused=True),
        "adam": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    }[choice](m2.parameters())

    def closure_for(model, o):
        def closure():
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = F.cross_entropy(out.float(), y)
            loss.backward()
            return loss

        return closure

    for _ in range(4):
        opt.step(closure_for(m1, opt))
        c2 = closure_for(m2, ref)
        if choice == "sam":
            c2()
            ref.first_step()
            c2()
            ref.second_step()
        else:
            c2()
            ref.step()
        for p, q in zip(m1.parameters(), m2.parameters()):  # the same autocast forward, the same
            assert torch.equal(p, q)  # fused kernels (SAM: reference arithmetic)


def test_add_param_group_reaches_every_inner_optimizer():
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    opt = RLSwitchingOptimizer(m1[0].parameters(), choices=ALL, policy="constant:sgd", lr=0.1)
    ref = torch.optim.SGD(m2[0].parameters(), lr=0.1, momentum=0.9, fused=True)
    extra = {"lr": 0.02, "weight_decay": 1e-3}
    opt.add_param_group({"params": list(m1[2].parameters()), **extra})
    ref.add_param_group({"params": list(m2[2].parameters()), **extra})
    for spec in opt.choices:
        inner = opt.inner_optimizers[spec.name]
        assert len(inner.param_groups) == 2
        assert inner.param_groups[1]["lr"] == 0.02 * spec.lr_scale
        assert inner.param_groups[1]["weight_decay"] == 1e-3
        assert inner.param_groups[1]["params"] == list(m1[2].parameters())
    sam = opt.inner_optimizers["sam"]
    assert sam.param_groups is sam.base_optimizer.param_groups
    for _ in range(5):
        opt.step(make_closure(m1, opt, x, y))
        make_closure(m2, ref, x, y)()
        ref.step()
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p, q)


COPIES = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda obj: pickle.loads(pickle.dumps(obj)),
}


@pytest.mark.parametrize("how", sorted(COPIES))
@pytest.mark.parametrize("policy", [DQN_SMALL, PPO_SMALL, "random"], ids=["dqn", "ppo", "random"])
def test_copied_optimizer_continues_identically(policy, how):
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam", "adam"], policy=policy, interval=2, seed=1)
    for _ in range(5):
        opt.step(make_closure(model, opt, x, y))
    model2, opt2 = COPIES[how]((model, opt))
    assert opt2.policy is not opt.policy
    assert opt2._params[0] is next(model2.parameters())
    for inner in opt2.inner_optimizers.values():
        assert inner.param_groups[0]["params"][0] is next(model2.parameters())
    _run_side_by_side([(model, opt), (model2, opt2)], x, y, 9, 5)
    assert_tree_equal(normalize(opt.history), normalize(opt2.history))
    assert_tree_equal(opt.state_dict(), opt2.state_dict())
    assert len(opt.history) >= 7


def test_inner_groups_are_independent_dicts():
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=ALL, policy="constant:sgd", lr=0.1)
    groups = [g for o in opt.inner_optimizers.values() for g in o.param_groups]
    ids = {id(g) for g in groups} | {id(g) for g in opt.param_groups}
    assert len(groups) == 4  # SAM's groups are its base optimizer's (one list), not another copy
    assert len(ids) == len(groups) + len(opt.param_groups)
    assert opt.inner_optimizers["adam"].param_groups[0]["lr"] == pytest.approx(1e-3)


# --------------------------------------------------------------------------- end to end
def _blobs(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    y = torch.randint(0, 3, (n,), generator=g)
    x = centers[y] + 0.7 * torch.randn(n, 4, generator=g)
    return x, y


@pytest.mark.parametrize("interval", ["epoch", 4])
@pytest.mark.parametrize("policy", ["dqn", "ppo"])
def test_small_model_trains_and_records_decisions(policy, interval):
    x, y = _blobs()
    xv, yv = _blobs(48, seed=1)
    model = make_model(hidden=16)
    epochs, batch = 6, 16
    opt = RLSwitchingOptimizer(
        model.parameters(),
        choices=["sgd", "sam", "adam"],
        policy=policy,
        interval=interval,
        lr=0.1,
        total_epochs=epochs,
        seed=0,
    )
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    for _ in range(epochs):
        for i in range(0, len(x), batch):
            opt.step(make_closure(model, opt, x[i : i + batch], y[i : i + batch]))
        with torch.no_grad():
            out = model(xv)
            vl, va = F.cross_entropy(out, yv).item(), (out.argmax(1) == yv).float().mean().item()
        assert opt.epoch_end(val_loss=vl, val_acc=va) == opt.choice
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
    assert last < 0.6 * first
    assert va > 0.8
    steps = epochs * len(x) // batch
    n_decisions = 1 + (epochs if interval == "epoch" else steps // interval)
    assert len(opt.history) == n_decisions
    obs_dim = len(opt.observation_layout["names"])
    for k, h in enumerate(opt.history):
        assert h["decision"] == k and h["choice"] in ("sgd", "sam", "adam")
        assert len(h["observation"]) == obs_dim
        assert (h["reward"] is None) == (k == 0)
        assert all(-1.0 <= v <= 1.0 for v in h["observation"])
    assert opt.history[-1]["final"] and not any(h["final"] for h in opt.history[:-1])
    assert [h["step"] for h in opt.history] == sorted(h["step"] for h in opt.history)
    if interval == "epoch":
        assert opt.history[1]["signals"]["val_acc"] is not None and not math.isnan(opt.history[1]["signals"]["val_acc"])


def test_switching_reward_charges_compute_not_decisions():
    """SAM over the whole budget costs `cost` however many decisions split it; one point of final
    accuracy is worth about 2 * acc / 100 = 0.2."""
    from rlopt.control.observation import Signals
    from rlopt.rewards import RewardContext

    only_cost = SwitchingReward(acc=0, loss=0, skipped=0, final=0)

    def charge(n, cost=2.0, share=1.0):
        total, before = 0.0, None
        for k in range(1, n + 1):
            now = Signals(cost=cost, progress=share * k / n, budget_share=share / n, steps=10)
            total += only_cost(RewardContext(now=now, before=before, action="sam", final=k == n))
            before = now
        return total

    for n in (1, 7, 30):
        assert charge(n) == pytest.approx(-0.2)
        assert charge(n, share=0.3) == pytest.approx(-0.06)  # SAM over 30% of the budget
        assert charge(n, cost=1.0) == 0.0
    unknown = RewardContext(now=Signals(cost=2.0), before=None, action="sam", final=False)
    assert only_cost(unknown) == pytest.approx(-0.05)  # no budget: charged per decision
    acc_only = SwitchingReward(loss=0, cost=0, skipped=0)
    first, last = Signals(val_acc=0.50, val_fresh=True), Signals(val_acc=0.51, val_fresh=True)
    gain = acc_only(RewardContext(now=last, before=first, action="sgd", final=True)) - 10 * 0.50
    assert gain == pytest.approx(0.2)  # +1 point: 0.1 from the gain, 0.1 from the final bonus


@pytest.mark.parametrize("budget", [dict(total_steps=30), dict(total_epochs=3)])
def test_cost_share_of_the_budget_as_the_optimizer_reports_it(budget):
    """SAM for one interval of 5 steps in a 30-step budget is charged 5/30 of `cost`; with only
    total_epochs the share is known once an epoch has been counted (per decision before that)."""
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam"], policy=Scripted([1, 0, 0, 1, 0, 0, 0]), interval=5, lr=0.1, **budget
    )
    for k in range(30):
        opt.step(make_closure(model, opt, x, y))
        if (k + 1) % 10 == 0:
            opt.epoch_end(val_loss=1.0, val_acc=0.5)
    shares = [h["signals"]["budget_share"] for h in opt.history[1:]]
    if "total_steps" in budget:
        assert shares[:6] == pytest.approx([5 / 30] * 6)
    else:  # steps per epoch unknown until the first epoch ends
        assert all(math.isnan(v) for v in shares[:2]) and shares[2:6] == pytest.approx([5 / 30] * 4)


@pytest.mark.parametrize("budget", [dict(total_steps=30, total_epochs=3), dict(total_epochs=3)])
def test_final_decision_every_n_steps_is_paid_on_the_final_validation(budget):
    """With decisions every N steps and a known number of epochs, the budget's last step leaves
    the final decision to epoch_end, so the final bonus sees the last epoch's validation."""
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam"], policy="constant:sgd", interval=5, lr=0.1, **budget
    )
    for k in range(30):
        opt.step(make_closure(model, opt, x, y))
        if (k + 1) % 10 == 0:
            opt.epoch_end(val_loss=1.0 - 0.1 * (k + 1) / 10, val_acc=0.5 + 0.1 * (k + 1) / 10)
    last = opt.history[-1]
    assert last["final"] and last["step"] == 30 and sum(h["final"] for h in opt.history) == 1
    assert last["signals"]["val_epoch"] == 3 and last["signals"]["val_fresh"]
    assert last["signals"]["val_acc"] == pytest.approx(0.8)
    assert [h["step"] for h in opt.history] == [0, 5, 10, 15, 20, 25, 30]
    # without total_epochs nothing says epoch_end will follow: the last step decides
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam"], policy="constant:sgd", interval=5, lr=0.1, total_steps=30
    )
    for _ in range(30):
        opt.step(make_closure(model, opt, x, y))
    assert opt.history[-1]["final"] and opt.history[-1]["step"] == 30


def test_a_step_that_raises_after_the_gradient_comparison_can_be_retried():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sam", "sgd"], policy="constant:sam", signal_every=2)
    fail = [False]
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if fail[0] and calls[0] % 2 == 0:  # SAM's second evaluation
            fail[0] = False
            raise RuntimeError("out of memory (simulated)")
        return loss

    opt.step(closure)
    fail[0] = True
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step(closure)
    for _ in range(3):
        opt.step(closure)
    opt.epoch_end(val_loss=1.0, val_acc=0.5)
    assert opt.history[-1]["signals"]["steps"] == 4


def test_separate_momentum_after_loading_a_shared_checkpoint_is_really_separate():
    x, y = make_data()
    model = make_model()
    shared = _sgd_sam(model, [0])
    shared.step(make_closure(model, shared, x, y))
    opt = _sgd_sam(model, [0], share_momentum=False)
    with pytest.warns(RuntimeWarning, match="share_momentum=True"):
        opt.load_state_dict(roundtrip(shared.state_dict()))
    sgd, sam = opt.inner_optimizers["sgd"], opt.inner_optimizers["sam"].base_optimizer
    sam_before = [sam.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.step(make_closure(model, opt, x, y))  # an SGD step
    assert all(torch.equal(sam.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), sam_before))
    assert not all(torch.equal(sgd.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), sam_before))


def test_hooks_registered_on_an_inner_optimizer_still_run():
    x, y = make_data()
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="constant:sgd")
    calls = []
    opt.inner_optimizers["sgd"].register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    opt.step(make_closure(model, opt, x, y))
    assert calls == [1]
