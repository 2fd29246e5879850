"""QLearningRateOptimizer: actions and bounds, equivalence with the plain base optimizer under a
frozen "keep" policy, resume, features, schedulers, copies, non-finite safety."""

import copy
import math
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlopt import SAM, QLearningRateOptimizer
from rlopt.control.observation import Signals
from rlopt.policies import ConstantConfig, Policy
from rlopt.rewards import InverseDistanceReward, LogImprovementReward, RewardContext

KEEP = "constant:lr:keep"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one thread avoids oversubscribing shared CPU cores (8x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed=0):
    with torch.random.fork_rng(devices=[]):  # the suite checks that the global RNG is left alone
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def make_data(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def closure_for(model, opt, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


class Scripted(Policy):
    """Plays the given action names in order, then the first action (keep)."""

    kind = "scripted-test"
    Config = ConstantConfig

    def __init__(self, obs_dim, action_names, script=(), **kwargs):
        super().__init__(obs_dim, action_names, None, **kwargs)
        self.script = list(script)

    def act(self, obs):
        self._check_obs(obs)
        return self.action_names.index(self.script.pop(0)) if self.script else 0


def scripted(params, script, **kw):
    probe = QLearningRateOptimizer([nn.Parameter(torch.zeros(1))], policy="random", **kw)
    policy = Scripted(len(probe.observation_layout["names"]), probe.action_names, script)
    return QLearningRateOptimizer(params, policy=policy, **kw)


def run_steps(model, opt, data):
    for x, y in data:
        opt.step(closure_for(model, opt, x, y))


def inner_lr(opt):
    return next(iter(opt.inner_optimizers.values())).param_groups[0]["lr"]


def inner_wd(opt):
    return next(iter(opt.inner_optimizers.values())).param_groups[0]["weight_decay"]


# ------------------------------------------------------------------------------- actions
def test_action_names():
    p = [nn.Parameter(torch.zeros(2))]
    assert QLearningRateOptimizer(p, policy=KEEP).action_names == ("lr:keep", "lr:halve", "lr:reset")
    both = QLearningRateOptimizer(p, weight_decay=1e-3, control=("weight_decay", "lr"), policy="random")
    assert len(both.action_names) == 12
    assert both.action_names[0] == "lr:keep|wd:keep" and "lr:halve|wd:x1.25" in both.action_names
    wd = QLearningRateOptimizer(p, weight_decay=1e-3, control=("weight_decay",), policy="constant:wd:keep")
    assert wd.action_names == ("wd:keep", "wd:halve", "wd:x1.25", "wd:reset")


def test_lr_halve_reset_and_bounds():
    model = make_model()
    opt = scripted(
        model.parameters(),
        ["lr:halve", "lr:halve", "lr:halve", "lr:reset", "lr:keep"],
        lr=0.1,
        interval=1,
        max_lr_halvings=2,
    )
    data = make_data(5)
    assert opt.lr == 0.1  # no decision before the first step
    seen = []
    for x, y in data:
        opt.step(closure_for(model, opt, x, y))
        seen.append(opt.lr)
    # first decision (at the first step): halve; then halve, halve (stops at 0.1 * 2^-2), reset, keep, keep
    assert [h["lr"] for h in opt.history] == [0.05, 0.025, 0.025, 0.1, 0.1, 0.1]
    assert seen == [0.025, 0.025, 0.1, 0.1, 0.1]
    assert inner_lr(opt) == 0.1


def test_wd_actions_and_bounds():
    model = make_model()
    script = [
        "lr:halve|wd:x1.25",
        "lr:keep|wd:x1.25",
        "lr:keep|wd:x1.25",
        "lr:keep|wd:halve",
        "lr:reset|wd:reset",
        "lr:keep|wd:halve",
        "lr:keep|wd:halve",
    ]
    opt = scripted(
        model.parameters(),
        script,
        lr=0.1,
        weight_decay=1e-2,
        control=("lr", "weight_decay"),
        interval=1,
        max_wd_growths=2,
        max_wd_halvings=1,
    )
    data = make_data(6)
    seen = [None]  # the first decision comes at the first step
    for x, y in data:
        opt.step(closure_for(model, opt, x, y))
        seen.append((opt.lr, opt.weight_decay))
    wd_max = 1e-2 * 1.25**2
    expected = [
        (0.05, 1e-2 * 1.25),
        (0.05, wd_max),
        (0.05, wd_max),
        (0.05, wd_max / 2),
        (0.1, 1e-2),
        (0.1, 5e-3),
        (0.1, 5e-3),
    ]
    assert [s[0] for s in seen[1:]] == [e[0] for e in expected[1:]]
    assert [s[1] for s in seen[1:]] == pytest.approx([e[1] for e in expected[1:]], rel=1e-15)
    assert [h["lr"] for h in opt.history][: len(expected)] == [e[0] for e in expected]
    assert [h["weight_decay"] for h in opt.history][: len(expected)] == pytest.approx(
        [e[1] for e in expected], rel=1e-15
    )
    opt.step(closure_for(model, opt, *data[0]))
    assert inner_wd(opt) == opt.weight_decay and inner_lr(opt) == opt.lr


# ----------------------------------------------------------------- equivalence with base
def _equal_states(a, b):
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key in sa[k]:
            if torch.is_tensor(sa[k][key]):
                assert torch.equal(sa[k][key], sb[k][key]), key


@pytest.mark.parametrize("base", ["sgd", "adam", "adamw", "sam"])
def test_keep_policy_matches_plain_optimizer(base):
    lr = 0.1 if base in ("sgd", "sam") else 1e-2
    m1, m2 = make_model(), make_model()
    opt = QLearningRateOptimizer(m1.parameters(), base=base, lr=lr, weight_decay=5e-4, policy=KEEP, interval=3)
    if base == "sgd":
        ref = torch.optim.SGD(m2.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, fused=True)
    elif base in ("adam", "adamw"):
        cls = torch.optim.Adam if base == "adam" else torch.optim.AdamW
        ref = cls(m2.parameters(), lr=lr, weight_decay=5e-4, fused=True)
    else:
        ref = SAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9, weight_decay=5e-4, fused=True)
    for x, y in make_data(10):
        l1 = opt.step(closure_for(m1, opt, x, y))
        l2 = ref.step(closure_for(m2, ref, x, y))
        # bit for bit: the keep action leaves lr and weight decay as given, and both sides run the
        # same fused kernel (SAM: rlopt.SAM's own arithmetic on both sides)
        assert torch.equal(l1, l2)
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p1, p2)
    inner = opt.inner_optimizers[base]
    _equal_states(getattr(inner, "base_optimizer", inner), getattr(ref, "base_optimizer", ref))
    assert len(opt.history) == 1 + 10 // 3 and all(h["choice"] == "lr:keep" for h in opt.history)


# ------------------------------------------------------------------------------ resume
def _same_history(h1, h2):
    assert repr(h1) == repr(h2)  # repr: NaN == NaN


@pytest.mark.parametrize(
    "control,base,policy,sched",
    [
        (("lr",), "sgd", "dqn", False),
        (("lr", "weight_decay"), "sgd", "dqn", False),
        (("lr",), "sam", "dqn", True),
        (("lr", "weight_decay"), "adamw", "ppo", True),
    ],
)
def test_resume_bit_for_bit(tmp_path, control, base, policy, sched):
    kw = dict(lr=0.05, weight_decay=1e-3, control=control, base=base, policy=policy, interval=2, seed=3, total_steps=60)
    m1 = make_model()
    o1 = QLearningRateOptimizer(m1.parameters(), **kw)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=7, gamma=0.7) if sched else None
    data = make_data(30, seed=5)
    for x, y in data:
        o1.step(closure_for(m1, o1, x, y))
        if s1 is not None:
            s1.step()
    o1.epoch_end(val_loss=1.0, val_acc=0.4)
    torch.save({"opt": o1.state_dict(), "sched": s1 and s1.state_dict()}, tmp_path / "opt.pt")
    m2 = make_model(seed=9)
    m2.load_state_dict(m1.state_dict())
    o2 = QLearningRateOptimizer(m2.parameters(), **kw)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=7, gamma=0.7) if sched else None
    ck = torch.load(tmp_path / "opt.pt", weights_only=True)
    o2.load_state_dict(ck["opt"])
    if s2 is not None:
        s2.load_state_dict(ck["sched"])
    assert o2.factors == o1.factors and o2.lr == o1.lr
    if policy == "dqn":
        assert o1.policy.n_updates > 0  # the DQN is learning: its state must resume too
    for x, y in data[:30]:
        o1.step(closure_for(m1, o1, x, y))
        o2.step(closure_for(m2, o2, x, y))
        for s in (s1, s2):
            if s is not None:
                s.step()
        for p1, p2 in zip(m1.parameters(), m2.parameters()):
            assert torch.equal(p1, p2)
    _same_history(o1.history, o2.history)
    assert len({h["choice"] for h in o1.history}) > 1


def test_load_rejects_other_control():
    p = [nn.Parameter(torch.zeros(2))]
    sd = QLearningRateOptimizer(p, policy="random").state_dict()
    other = QLearningRateOptimizer(p, weight_decay=1e-3, control=("weight_decay",), policy="random")
    with pytest.raises(ValueError):
        other.load_state_dict(sd)


# ---------------------------------------------------------------------------- bad inputs
P = [nn.Parameter(torch.zeros(2))]
BAD = [
    (dict(lr=-0.1), ValueError, "Invalid learning rate"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
    (dict(lr=float("inf")), ValueError, "Invalid learning rate"),
    (dict(lr=0.0), ValueError, "Invalid learning rate"),
    (dict(lr="0.1"), TypeError, "Invalid learning rate"),
    (dict(base="rmsprop"), ValueError, "Unknown base"),
    (dict(base=3), TypeError, "base must be"),
    (dict(control=()), ValueError, "control must name"),
    (dict(control=("momentum",)), ValueError, "Unknown control"),
    (dict(control=("lr", "lr")), ValueError, "Duplicate"),
    (dict(interval=0), ValueError, "Invalid interval"),
    (dict(interval=-3), ValueError, "Invalid interval"),
    (dict(interval="step"), TypeError, "interval"),
    (dict(weight_decay=-1e-4), ValueError, "Invalid weight_decay"),
    (dict(weight_decay=float("nan")), ValueError, "Invalid weight_decay"),
    (dict(weight_decay=0.0, control=("lr", "weight_decay")), ValueError, "positive"),
    (dict(momentum=1.0), ValueError, "Invalid momentum"),
    (dict(objective_memory=0), ValueError, "objective_memory"),
    (dict(max_lr_halvings=0), ValueError, "max_lr_halvings"),
    (dict(policy="constant:lr:double"), ValueError, "Unknown action"),
    (dict(policy="nonsense"), ValueError, "Unknown policy"),
    (dict(base=("sgd", {"lr": 0.2})), ValueError, "lr=..."),
    (dict(max_lr_halvings=2000), ValueError, "Invalid max_lr_halvings: 2000 \\(at most 1022"),
    (dict(max_lr_halvings=1023), ValueError, "Invalid max_lr_halvings"),
    (dict(max_wd_halvings=1023), ValueError, "Invalid max_wd_halvings"),
    (
        dict(max_wd_growths=5000, weight_decay=0.1, control=("weight_decay",)),
        ValueError,
        "Invalid max_wd_growths: 5000 \\(at most 3180",
    ),
    (dict(max_wd_growths=3181), ValueError, "Invalid max_wd_growths"),
    (dict(train_policy="no"), TypeError, "Invalid policy training mode: 'no'"),
    (dict(train_policy=1), TypeError, "Invalid policy training mode"),
    # the base's options are checked as a switching optimizer's choice is (rlopt.choices)
    (dict(base=("sgd", 3)), TypeError, "options of base 'sgd' must be a dict"),
    (dict(base=("sgd", {"momentum": 1.5})), ValueError, "Invalid momentum value: 1.5 \\(choice 'sgd'\\)"),
    (dict(base=("sam", {"momentum": -0.1})), ValueError, "Invalid momentum value: -0.1 \\(choice 'sam'\\)"),
    (dict(base=("sgd", {"momentum": "0.9"})), TypeError, "Invalid momentum value"),
    (dict(base=("sgd", {"nesterov": "no"})), TypeError, "nesterov for choice 'sgd' must be a bool"),
    (dict(base=("sgd", {"weight_decay": True})), TypeError, r"Invalid weight_decay value.*\(choice 'sgd'\)"),
    (dict(base=("sgd", {"weight_decay": float("inf")})), ValueError, r"Invalid weight_decay value.*\(choice 'sgd'\)"),
    (dict(base=("sam", {"rho": "a"})), TypeError, "Invalid rho for choice 'sam'"),
    (dict(base=("sam", {"rho": -0.05})), ValueError, "Invalid rho for choice 'sam'"),
    (dict(base=("sam", {"adaptive": "no"})), TypeError, "adaptive for choice 'sam' must be a bool"),
    (dict(base=("adam", {"betas": (0.9, 1.0)})), ValueError, "Invalid options for choice 'adam'.*beta"),
    (dict(base=("adam", {"betas": (float("nan"), 0.999)})), ValueError, "Invalid options for choice 'adam'"),
    (dict(base=("adamw", {"eps": -1e-8})), ValueError, "Invalid eps for choice 'adamw'"),
    (dict(base=("adamw", {"amsgrad": 1})), TypeError, "amsgrad for choice 'adamw' must be a bool"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QLearningRateOptimizer(P, **kwargs)


def test_largest_bounds_are_normal_floats_and_run():
    """The limits of max_lr_halvings / max_wd_halvings / max_wd_growths are the real ones: at
    them the bounds are normal positive floats and the lr_level/wd_level features are finite."""
    from rlopt.optim.lr_control import MAX_GROWTHS, MAX_HALVINGS

    model = make_model()
    opt = QLearningRateOptimizer(
        model.parameters(),
        weight_decay=1e-3,
        control=("lr", "weight_decay"),
        policy="random",
        interval=2,
        max_lr_halvings=MAX_HALVINGS,
        max_wd_halvings=MAX_HALVINGS,
        max_wd_growths=MAX_GROWTHS,
    )
    for lo, hi in opt._bounds.values():
        assert lo >= sys.float_info.min and math.isfinite(hi)
    run_steps(model, opt, make_data(4))
    opt._lr_wd = {"lr": opt._bounds["lr"][0], "weight_decay": opt._bounds["weight_decay"][0]}  # at the floor
    run_steps(model, opt, make_data(4, seed=2))
    assert len(opt.history) >= 4
    assert all(math.isfinite(v) for h in opt.history for v in h["observation"])
    assert 0.0 < inner_lr(opt) and 0.0 < inner_wd(opt)


def test_policy_of_other_action_set_rejected():
    probe = QLearningRateOptimizer(P, policy="random")
    policy = Scripted(len(probe.observation_layout["names"]) + 9, ["lr:keep|wd:keep"] * 12)
    with pytest.raises(ValueError, match="action set"):
        QLearningRateOptimizer(P, policy=policy)


# ------------------------------------------------------------------------------ features
def _feature(opt, name, k):
    return opt.history[k]["observation"][opt.observation_layout["names"].index(name)]


def test_objective_position_hand_computed():
    p = nn.Parameter(torch.zeros(3))
    opt = QLearningRateOptimizer([p], policy=KEEP, interval=1, objective_memory=3)
    values = [5.0, 4.0, 6.0, 3.0, 4.5, 7.0, 4.0, float("nan"), 2.0]
    for v in values:

        def closure(v=v):
            opt.zero_grad()
            loss = (p * 0).sum() + v
            loss.backward()
            return loss

        opt.step(closure)
    # lowest-3 memory before each value: [] [5] [4,5] [4,5,6] [3,4,5] [3,4,4.5] [3,4,4.5] (nan skipped) [3,4,4]
    expected = [0.0, 1.0, 1.0, 0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 1.0]  # decision 0: before any step
    assert [_feature(opt, "objective_position", k) for k in range(len(values) + 1)] == expected


def test_alignment_features_hand_computed():
    p = nn.Parameter(torch.zeros(4))
    opt = QLearningRateOptimizer([p], base=("sgd", {"momentum": 0.0}), lr=0.1, policy=KEEP, interval=2, signal_every=1)
    gs = [
        torch.tensor([1.0, 2.0, -1.0, 0.5]),
        torch.tensor([1.0, -1.0, -2.0, 0.5]),
        torch.tensor([-1.0, -1.0, 1.0, 1.0]),
        torch.tensor([2.0, 1.0, 1.0, -1.0]),
    ]
    for g in gs:

        def closure(g=g):
            opt.zero_grad()
            loss = (p * g).sum()
            loss.backward()
            return loss

        opt.step(closure)

    def cos(a, b):
        return float(torch.dot(a, b) / (a.norm() * b.norm()))

    def sign(a, b):
        return float((torch.sign(a) * torch.sign(b)).mean())

    # decision 1 (steps 0-1): one pair (g0, g1); decision 2 (steps 2-3): pairs (g1, g2), (g2, g3)
    assert _feature(opt, "grad_cosine", 1) == pytest.approx(cos(gs[0], gs[1]), abs=1e-6)
    assert _feature(opt, "grad_sign_agreement", 1) == pytest.approx(sign(gs[0], gs[1]), abs=1e-6)
    assert _feature(opt, "grad_cosine", 2) == pytest.approx((cos(gs[1], gs[2]) + cos(gs[2], gs[3])) / 2, abs=1e-6)
    assert _feature(opt, "grad_sign_agreement", 2) == pytest.approx(
        (sign(gs[1], gs[2]) + sign(gs[2], gs[3])) / 2, abs=1e-6
    )


def test_level_features():
    model = make_model()
    opt = scripted(
        model.parameters(),
        ["lr:keep|wd:keep", "lr:halve|wd:x1.25", "lr:halve|wd:halve"],
        lr=0.1,
        weight_decay=1e-2,
        control=("lr", "weight_decay"),
        interval=1,
    )
    run_steps(model, opt, make_data(2))
    lr_levels = [_feature(opt, "lr_level", k) for k in range(3)]
    # linear in log(value / initial) from [log 2^-10, 0] to [-1, 1]
    assert lr_levels == pytest.approx([1.0, 1.0, 1.0 - 2 / 10])
    lo, hi = math.log(2**-8), math.log(1.25**8)
    wd = [2 * (math.log(r) - lo) / (hi - lo) - 1 for r in (1.0, 1.0, 1.25)]
    assert [_feature(opt, "wd_level", k) for k in range(3)] == pytest.approx(wd)


def test_lr_reports_the_rate_in_use_with_a_base_lr_scale():
    """lr is what the inner optimizer runs at, lr_scale included; the level feature is relative."""
    model = make_model()
    opt = scripted(model.parameters(), ["lr:keep", "lr:halve"], base=("sgd", {"lr_scale": 0.5}), lr=0.1, interval=1)
    run_steps(model, opt, make_data(2))  # decisions: keep (construction), halve, keep
    assert inner_lr(opt) == opt.lr == 0.025
    assert [h["lr"] for h in opt.history] == [0.05, 0.025, 0.025]
    assert [_feature(opt, "lr_level", k) for k in range(3)] == pytest.approx([1.0, 1.0, 1.0 - 2 / 10])


# ------------------------------------------------------------------------------- rewards
def test_rewards():
    now = Signals(loss=0.5, val_acc=0.8, val_loss=0.6, steps=10, skipped=1)
    before = Signals(loss=1.0, val_acc=0.7, val_loss=0.9, steps=10)
    ctx = RewardContext(now=now, before=before, action="lr:keep", final=False)
    r = InverseDistanceReward(lr=0.1, wd=0.2, skipped=1.0)(ctx)
    assert r == pytest.approx(0.1 / 0.5 + 0.2 / 0.2 - 0.1)
    guarded = InverseDistanceReward(lr=0.1, wd=0.0, loss_bound=0.6, min_distance=0.01)(ctx)
    assert guarded == pytest.approx(0.1 / 0.01 - 0.1)  # below the bound: the distance is floored
    r = LogImprovementReward(lr=10.0, wd=1.0)(ctx)
    assert r == pytest.approx(10 * math.log(2.0) + math.log(0.9 / 0.6) - 0.1)
    assert LogImprovementReward()(RewardContext(now, None, "lr:keep", False)) == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        InverseDistanceReward(min_distance=0.0)


# --------------------------------------------------------------------------- scheduler
def test_scheduler_composes_with_agent():
    model = make_model()
    opt = scripted(model.parameters(), ["lr:keep", "lr:halve", "lr:keep", "lr:reset"], lr=0.1, interval=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    data = make_data(2)
    run_steps(model, opt, data)  # decision 1: halve
    assert opt.lr == 0.05 and inner_lr(opt) == 0.05  # the inner groups show what the next step uses
    sched.step()  # scheduled group lr 0.1 -> 0.05
    assert opt.param_groups[0]["lr"] == 0.05 and opt.lr == 0.025
    run_steps(model, opt, data)  # steps at 0.025; decision 2: keep
    assert inner_lr(opt) == 0.025
    sched.step()
    run_steps(model, opt, data)  # steps at 0.025 * 0.5; decision 3: reset -> the scheduled lr
    assert opt.history[-1]["choice"] == "lr:reset" and inner_lr(opt) == 0.025
    assert opt.lr == opt.param_groups[0]["lr"] == 0.025


# ---------------------------------------------------------------------- copies, safety
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle(how):
    model = make_model()
    opt = QLearningRateOptimizer(model.parameters(), policy="dqn", interval=2, seed=1)
    data = make_data(12)
    run_steps(model, opt, data[:6])
    if how == "deepcopy":
        m2, o2 = copy.deepcopy((model, opt))
    else:
        m2, o2 = pickle.loads(pickle.dumps((model, opt)))
    assert o2.lr == opt.lr and o2.action_names == opt.action_names
    for x, y in data[6:]:
        opt.step(closure_for(model, opt, x, y))
        o2.step(closure_for(m2, o2, x, y))
    for p1, p2 in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    _same_history(opt.history, o2.history)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_nonfinite_loss_is_skipped(base):
    model = make_model()
    opt = QLearningRateOptimizer(model.parameters(), base=base, lr=0.05, policy=KEEP, interval=4)
    data = make_data(4)
    run_steps(model, opt, data[:2])
    before = [p.detach().clone() for p in model.parameters()]
    inner = opt.inner_optimizers[base]
    state_before = copy.deepcopy(inner.state_dict()["state"])
    x, y = data[2]

    def bad():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    opt.step(bad)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for k, st in inner.state_dict()["state"].items():
        for key, v in st.items():
            assert torch.equal(v, state_before[k][key]), key
    opt.step(closure_for(model, opt, *data[3]))  # 4th step: a decision
    assert opt.history[-1]["signals"]["skipped"] == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_epoch_interval_and_policy_checkpoint(tmp_path):
    model = make_model()
    opt = scripted(model.parameters(), ["lr:keep", "lr:halve"], lr=0.1, interval="epoch")
    data = make_data(3)
    run_steps(model, opt, data)
    assert len(opt.history) == 1 and opt.lr == 0.1  # no decision inside an epoch
    assert opt.epoch_end(val_loss=1.2, val_acc=0.5) == "lr:halve"
    assert opt.lr == 0.05 and len(opt.history) == 2

    trained = QLearningRateOptimizer(model.parameters(), policy="dqn", interval=1, seed=2)
    run_steps(model, trained, make_data(10))
    trained.policy.save(tmp_path / "policy.pt")
    loaded = QLearningRateOptimizer(model.parameters(), policy=str(tmp_path / "policy.pt"), interval=1)
    assert not loaded.policy.training  # loaded policies are frozen
    for a, b in zip(loaded.policy.q_net.parameters(), trained.policy.q_net.parameters()):
        assert torch.equal(a, b)
