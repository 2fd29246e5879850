"""Rule-based policies: each does what it says (SAM-late switches on at the step the budget can pay
to the end, every k, random at a share, AE-SAM on a scripted sequence), resolves by name, saves and
loads, and refuses what it cannot read."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_closure, make_data, make_model
from torch.nn import functional as F

from rlopt import RLSwitchingOptimizer
from rlopt.control.budget import BUDGET_FEATURES
from rlopt.control.observation import observation_layout
from rlopt.policies import (
    AdaptiveSamConfig,
    AdaptiveSamPolicy,
    SamEveryConfig,
    SamEveryPolicy,
    SamLateConfig,
    SamLatePolicy,
    ScheduledRandomConfig,
    ScheduledRandomPolicy,
    load_policy,
)

ACTIONS = ("sgd", "sam")
LAYOUT = observation_layout(ACTIONS, BUDGET_FEATURES)
NAMES = LAYOUT["names"]


def obs(**features):
    """An observation vector with the named features set (the rest 0)."""
    v = torch.zeros(len(NAMES))
    for name, value in features.items():
        v[NAMES.index(name)] = value
    return v


def make(cls, config=None, seed=0, layout=LAYOUT):
    return cls(len(layout["names"]), ACTIONS, config, seed=seed, obs_layout=layout)


def train(policy, steps, interval, share=0.3, **kw):
    model = make_model()
    x, y = make_data()
    opt = RLSwitchingOptimizer(
        model.parameters(),
        choices=list(ACTIONS),
        policy=policy,
        interval=interval,
        total_steps=steps,
        compute_budget=share,
        **kw,
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return opt


# ----------------------------------------------------------------------------- SAM-late
@pytest.mark.parametrize("interval,first_sam", [(1, 35), (4, 36), (7, 35)])
def test_sam_late_turns_on_when_the_budget_pays_for_sam_to_the_end(interval, first_sam):
    # 50 steps, budget 0.3: 15 SAM steps; SAM from the first decision with at most 15 steps left
    opt = train("sam-late", 50, interval)
    choices = [(h["step"], h["choice"]) for h in opt.history if not h["final"]]
    assert [s for s, c in choices if c == "sam"][0] == first_sam
    assert all(c == ("sam" if s >= first_sam else "sgd") for s, c in choices)
    assert opt.history[-1]["budget_spent"] == 50 - first_sam  # every SAM step paid, none cut
    assert opt.history[-1]["budget_overridden"] == 0


def test_sam_late_from_a_progress():
    policy = make(SamLatePolicy, SamLateConfig(start=0.75))
    assert [policy.act(obs(progress=2 * t - 1)) for t in (0.0, 0.5, 0.74, 0.75, 1.0)] == [0, 0, 0, 1, 1]


# ----------------------------------------------------------------------------- every k
def test_sam_every_k_and_its_count_survives_a_checkpoint(tmp_path):
    opt = train("sam-every:3", 30, 1, share=1.0)
    assert [h["choice"] for h in opt.history[:9]] == ["sam", "sgd", "sgd"] * 3
    policy = make(SamEveryPolicy, SamEveryConfig(k=4))
    first = [policy.act(obs()) for _ in range(5)]
    policy.save(tmp_path / "p.pt")
    loaded = load_policy(tmp_path / "p.pt")
    assert first == [1, 0, 0, 0, 1]
    assert [loaded.act(obs()) for _ in range(4)] == [policy.act(obs()) for _ in range(4)] == [0, 0, 0, 1]


# ----------------------------------------------------------------------------- SS-SAM
def test_random_at_a_share_within_a_binomial_tolerance_and_deterministic():
    n, p = 4000, 0.3
    policy = make(ScheduledRandomPolicy, ScheduledRandomConfig(share=p), seed=7)
    picks = [policy.act(obs()) for _ in range(n)]
    sd = math.sqrt(n * p * (1 - p))
    assert abs(sum(picks) - n * p) < 5 * sd  # fixed seed: this draw is the same every run
    again = make(ScheduledRandomPolicy, ScheduledRandomConfig(share=p), seed=7)
    assert [again.act(obs()) for _ in range(n)] == picks


@pytest.mark.parametrize(
    "schedule,shape",
    [("constant", lambda t: 1.0), ("linear", lambda t: 2 * t), ("cosine", lambda t: 1 - math.cos(math.pi * t))],
)
def test_schedules(schedule, shape):
    policy = make(ScheduledRandomPolicy, ScheduledRandomConfig(share=0.4, schedule=schedule))
    for t in (0.0, 0.25, 0.5, 1.0):
        torch.testing.assert_close(policy.probability(obs(progress=2 * t - 1)), min(1.0, 0.4 * shape(t)))
    default = make(ScheduledRandomPolicy)  # the budget's share: budget_affordable
    assert default.probability(obs(budget_affordable=0.25)) == 0.25


def test_ss_sam_spends_the_budget_at_random():
    opt = train("ss-sam", 200, 1, share=0.3)
    sam_runs = sum(h["choice"] == "sam" for h in opt.history if not h["final"])
    assert opt.history[-1]["budget_used"] <= 0.3
    assert 40 <= sam_runs <= 60  # about 0.3 * 200 = 60 are affordable; a few draws fall short


# ----------------------------------------------------------------------------- AE-SAM
def _level(x):
    """grad_norm_level for a squared norm x (relative to the first interval's)."""
    return math.tanh(0.5 * math.log(x))


def test_ae_sam_on_a_scripted_sequence():
    policy = make(AdaptiveSamPolicy, AdaptiveSamConfig(threshold=1.0, decay=0.9))
    xs = [1.0, 1.0, 1.0, 9.0, 1.0, 6.0, 2.0]
    acts = [policy.act(obs(grad_norm_level=_level(x))) for x in xs]
    # d0: no statistics -> sgd (m=1, v=0); d1, d2: 1 is not above 1 + 0; d3: 9 > 1 -> sam, then
    # m=1.8, v=0.9*(0.1*64)=5.76 (std 2.4); d4: 1 < 4.2 -> sgd, m=1.72, v=5.76*0.9+0.9*0.1*0.64=5.2416;
    # d5: 6 > 1.72 + 2.289 -> sam, m=2.148, v=0.9*(5.2416+0.1*18.3184)=6.3661; d6: 2 < 2.148 + 2.523 -> sgd
    assert acts == [0, 0, 0, 1, 0, 1, 0]
    torch.testing.assert_close(policy.mean, 2.148 + 0.1 * (2.0 - 2.148), rtol=1e-5, atol=0)  # float32 features
    restored = make(AdaptiveSamPolicy, AdaptiveSamConfig(threshold=1.0, decay=0.9))
    restored.load_state_dict(policy.state_dict())
    assert [restored.act(obs(grad_norm_level=_level(x))) for x in (9.0, 1.0)] == [
        policy.act(obs(grad_norm_level=_level(x))) for x in (9.0, 1.0)
    ]


def test_ae_sam_threshold_schedule():
    policy = make(AdaptiveSamPolicy, AdaptiveSamConfig(threshold=1.0, threshold_end=-1.0))
    assert policy.threshold(obs(progress=-1.0)) == 1.0
    assert policy.threshold(obs(progress=1.0)) == -1.0


def test_ae_sam_runs_in_an_optimizer_without_a_budget():
    model = make_model()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=list(ACTIONS), policy="ae-sam:-1", interval=1, signal_every=1
    )
    closure = make_closure(model, opt, *make_data())
    for _ in range(12):
        opt.step(closure)
    assert {h["choice"] for h in opt.history} == {"sgd", "sam"}


# ----------------------------------------------------------------------------- names and errors
@pytest.mark.parametrize(
    "name,cls,config",
    [
        ("sam-late", SamLatePolicy, SamLateConfig()),
        ("sam-late:0.7", SamLatePolicy, SamLateConfig(start=0.7)),
        ("sam-every:4", SamEveryPolicy, SamEveryConfig(k=4)),
        ("ss-sam", ScheduledRandomPolicy, ScheduledRandomConfig()),
        ("ss-sam:0.2", ScheduledRandomPolicy, ScheduledRandomConfig(share=0.2)),
        ("ae-sam", AdaptiveSamPolicy, AdaptiveSamConfig()),
        ("ae-sam:0.5", AdaptiveSamPolicy, AdaptiveSamConfig(threshold=0.5)),
    ],
)
def test_names_resolve(name, cls, config):
    opt = RLSwitchingOptimizer(
        make_model().parameters(), choices=list(ACTIONS), policy=name, total_steps=10, compute_budget=0.3
    )
    assert type(opt.policy) is cls and opt.policy.config == config and not opt.policy.training
    by_config = RLSwitchingOptimizer(
        make_model().parameters(), choices=list(ACTIONS), policy=config, total_steps=10, compute_budget=0.3
    )
    assert type(by_config.policy) is cls


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(policy="sam-late"), "compute_budget"),
        (dict(policy="ss-sam"), "compute_budget"),
        (dict(policy="sam-every"), "needs k"),
        (dict(policy="sam-every:x"), "must be an int"),
        (dict(policy="sam-every:0"), "Invalid sam-every k"),
        (dict(policy="ss-sam:2"), "Invalid ss-sam share"),
        (dict(policy="sam-late:1.5"), "Invalid sam-late start"),
        (dict(policy="sam-late:0.5", choices=["sgd", "adam"]), "'sam' is not among"),
        (dict(policy=ScheduledRandomConfig(share=0.5, schedule="step")), "Unknown ss-sam schedule"),
        (dict(policy=AdaptiveSamConfig(decay=1.0)), "Invalid ae-sam decay"),
    ],
)
def test_bad_rules(kwargs, msg):
    kwargs = {"choices": list(ACTIONS), **kwargs}
    with pytest.raises(ValueError, match=msg):
        RLSwitchingOptimizer(make_model().parameters(), **kwargs)


def test_bad_rule_state_is_refused_and_changes_nothing():
    policy = make(AdaptiveSamPolicy)
    policy.act(obs(grad_norm_level=0.3))
    good = policy.state_dict()
    with pytest.raises(ValueError, match="variance"):
        policy.load_state_dict({**good, "var": -1.0})
    assert policy.state_dict()["mean"] == good["mean"]
    every = make(SamEveryPolicy)
    with pytest.raises(ValueError, match="decision count"):
        every.load_state_dict({**every.state_dict(), "decisions": -2})
