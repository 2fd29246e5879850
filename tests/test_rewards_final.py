"""The end-of-run reward against a paired SAM-late run at the same compute budget."""

from __future__ import annotations

import math

import pytest
import torch

from rlopt.control.observation import Signals
from rlopt.meta.tasks import TaskDistribution, build_task, run_episode
from rlopt.meta.train_policy import _final_reward, _make_optimizer, main, train_policy
from rlopt.rewards import FinalReward, RewardContext, sharpness_potential


def _ctx(final=False, before=None, **kw):
    return RewardContext(now=Signals(**kw), before=before, action="sgd", final=final)


def test_credit_only_at_the_end_against_the_reference():
    r = FinalReward(reference=(0.5, 0.8))
    assert r(_ctx(val_acc=0.9, val_loss=0.1, val_fresh=True, steps=10)) == 0.0  # a swing mid-run earns nothing
    end = r(_ctx(final=True, val_acc=0.82, val_loss=0.4, val_fresh=True, steps=10))
    assert end == pytest.approx(10 * 0.02 + math.log(0.5 / 0.4))
    assert r(_ctx(final=True, val_acc=0.8, val_loss=0.5, val_fresh=True, steps=10)) == pytest.approx(0.0)
    assert r(_ctx(final=True, val_acc=0.9, val_loss=0.5, val_fresh=False, steps=10)) == 0.0  # not measured
    assert r(_ctx(steps=10, skipped=5)) == pytest.approx(-0.5)


@pytest.mark.parametrize("ref", [(0.0, 0.5), (math.nan, 0.5), (1.0,)])
def test_invalid_reference(ref):
    with pytest.raises(ValueError, match="reference"):
        FinalReward(reference=ref)


def test_shaping_telescopes_to_minus_the_first_potential():
    states = [Signals(steps=1) for _ in range(5)]
    for i, s in enumerate(states):
        s.sharpness = 1.0 + 0.3 * i  # what the observation's sharpness field carries
    phi = sharpness_potential(2.0)
    r = FinalReward(reference=(1.0, 0.5), potential=phi)
    total = sum(
        r(RewardContext(now=s, before=states[i - 1] if i else None, action="sgd", final=i == 4))
        for i, s in enumerate(states)
    )
    assert total == pytest.approx(0.0)  # Phi(s_final) = 0 and Phi(before the first) = 0: shaping sums to 0
    assert phi(Signals()) == 0.0 and phi(states[1]) == pytest.approx(-0.6)


def _tiny():
    dist = TaskDistribution(data=("teacher",), epochs=(3,), n_train=(256,), interval=(1,))  # 12 steps, SAM on 3
    return dist.sample(torch.Generator().manual_seed(0), 5)


def test_the_reference_itself_earns_zero_and_sgd_earns_the_difference():
    cfg = _tiny()
    fn = _final_reward(cfg, None, ("sgd", "sam"), 0, None, budget=0.3)
    task = build_task(cfg)
    same = run_episode(
        task, _make_optimizer("switching", task, ("sgd", "sam"), "sam-late", 0, fn, budget=0.3, train=False)
    )
    assert (
        same["action_share"]["sam"] > 0
        and same["return"] == 0.0
        and (same["val_loss"], same["val_acc"]) == pytest.approx(fn.reference)
    )
    task = build_task(cfg)
    fn2 = _final_reward(cfg, None, ("sgd", "sam"), 0, None, budget=0.3)
    sgd = run_episode(
        task, _make_optimizer("switching", task, ("sgd", "sam"), "constant:sgd", 0, fn2, budget=0.3, train=False)
    )
    expected = 10 * (sgd["val_acc"] - fn2.reference[1]) + math.log(fn2.reference[0] / sgd["val_loss"])
    assert sgd["return"] == pytest.approx(expected) and expected != 0.0


def test_train_policy_with_the_final_reward_and_a_budget(tmp_path):
    dist = TaskDistribution(data=("teacher",), epochs=(2,), n_train=(128,), interval=("epoch",))
    res = train_policy(
        "switching",
        ("sgd", "sam"),
        "ppo",
        2,
        0,
        tmp_path / "p.pt",
        distribution=dist,
        progress=False,
        reward="final",
        budget=0.15,
    )
    assert res.metadata["compute_budget"] == 0.15 and res.metadata["reference"] == "sam-late"
    assert len(res.metadata["reference_val_acc"]) == 2
    with pytest.raises(ValueError, match="needs kind='switching' and a budget"):
        train_policy("switching", ("sgd", "sam"), episodes=1, distribution=dist, progress=False, reward="final")


def test_cli_final_reward_needs_a_budget(capsys):
    with pytest.raises(SystemExit):
        main(["--reward", "final", "--out", "x.pt"])
    assert "--reward final needs --budget" in capsys.readouterr().err
