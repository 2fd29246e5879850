"""Pretrained policies: the shipped registry, loading by name and path, mismatch errors,
frozen-by-default, determinism, and meta-training end to end on a tiny task distribution."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch
from conftest import make_closure, make_data, make_model

import rlopt
from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer
from rlopt.meta.tasks import TaskDistribution, build_task
from rlopt.meta.train_policy import main, train_policy
from rlopt.policies import DQNPolicy, PPOPolicy, load_policy
from rlopt.registry import pretrained_info, pretrained_path

SHIPPED = {
    "switch-sgd-sam": ("sgd", "sam"),
    "switch-sgd-sam-adam": ("sgd", "sam", "adam"),
    "lr-dqn": ("lr:keep", "lr:halve", "lr:reset"),
}

# A distribution small enough for a test: 64 training samples, 2 epochs, teacher data only.
TINY = TaskDistribution(
    data=("teacher",),
    mlp_width=(8,),
    mlp_depth=(1,),
    batch_size=(32,),
    epochs=(2,),
    n_train=(64,),
    n_val=32,
    interval=("epoch", 1),
    teacher_d_in=(4,),
    teacher_classes=(3,),
)


def _weights(policy):
    nets = [policy.actor, policy.critic] if isinstance(policy, PPOPolicy) else [policy.q_net, policy.target_net]
    return [t.clone() for net in nets for t in net.state_dict().values()]


def _run(opt, model, steps=12, epochs=2):
    x, y = make_data()
    closure = make_closure(model, opt, x, y)
    for _ in range(epochs):
        for _ in range(steps // epochs):
            opt.step(closure)
        opt.epoch_end(val_loss=1.0, val_acc=0.5)


# ------------------------------------------------------------------ registry
def test_list_policies_has_the_shipped_names():
    listed = rlopt.list_policies()
    assert set(SHIPPED) <= set(listed)
    for name in SHIPPED:
        assert isinstance(listed[name], str) and listed[name]
        info = pretrained_info(name)
        assert info["command"].startswith("python -m rlopt.meta.train_policy ")
        assert f"--out rlopt/registry/{name}.pt" in info["command"]
        assert info["episodes"] >= 1 and info["train_time_s"] > 0
        assert os.path.getsize(pretrained_path(name)) < 200_000


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_load_by_name_and_by_path(name):
    by_name = rlopt.load_policy(name)
    by_path = rlopt.load_policy(pretrained_path(name))
    assert tuple(by_name.action_names) == SHIPPED[name]
    assert by_name.describe() == by_path.describe()
    for a, b in zip(_weights(by_name), _weights(by_path)):
        assert torch.equal(a, b)
    meta = by_name.metadata
    assert meta["action_names"] == list(SHIPPED[name])
    assert meta["obs_layout_version"] == by_name.obs_layout["version"]
    assert len(meta["returns"]) == meta["episodes"] == pretrained_info(name)["episodes"]
    for key in ("task_distribution", "seed", "rlopt_version", "command"):
        assert key in meta


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="available"):
        rlopt.load_policy("no-such-policy")
    with pytest.raises(ValueError, match="Unknown policy"):
        RLSwitchingOptimizer(make_model().parameters(), choices=["sgd", "sam"], policy="no-such-policy")


@pytest.mark.parametrize("name", ["switch-sgd-sam", "switch-sgd-sam-adam"])
def test_switching_optimizer_takes_a_name(name):
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=list(SHIPPED[name]), policy=name, interval=2, lr=0.05)
    assert not opt.policy.training
    _run(opt, model)
    assert opt.choice in SHIPPED[name]
    assert all(h["choice"] in SHIPPED[name] for h in opt.history)


def test_lr_optimizer_takes_a_name():
    model = make_model()
    opt = QLearningRateOptimizer(model.parameters(), base="sgd", lr=0.05, policy="lr-dqn", interval=2)
    assert isinstance(opt.policy, DQNPolicy) and not opt.policy.training
    _run(opt, model)
    assert 0.05 * 2**-10 <= opt.lr <= 0.05


# ------------------------------------------------------------------ mismatches
def test_action_set_mismatch_raises():
    model = make_model()
    with pytest.raises(ValueError, match="action set"):
        RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam", "adam"], policy="switch-sgd-sam")
    with pytest.raises(ValueError, match="action set"):
        RLSwitchingOptimizer(
            model.parameters(), choices=["sgd", "sam"], policy=rlopt.load_policy("switch-sgd-sam-adam")
        )
    with pytest.raises(ValueError, match="action set"):
        QLearningRateOptimizer(model.parameters(), control=("lr", "weight_decay"), weight_decay=1e-4, policy="lr-dqn")


@pytest.mark.parametrize("tamper", ["rename", "version"])
def test_tampered_observation_layout_raises(tmp_path, tamper):
    ckpt = torch.load(pretrained_path("switch-sgd-sam"), weights_only=True)
    if tamper == "rename":
        ckpt["obs_layout"]["names"][0] = "something_else"
    else:
        ckpt["obs_layout"]["version"] = ckpt["obs_layout"]["version"] + 1
    path = tmp_path / "tampered.pt"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="observation layout"):
        RLSwitchingOptimizer(make_model().parameters(), choices=["sgd", "sam"], policy=str(path))
    with pytest.raises(ValueError, match="observation layout"):
        RLSwitchingOptimizer(make_model().parameters(), choices=["sgd", "sam"], policy=load_policy(path))


# ------------------------------------------------------------------ frozen, fine-tuning, determinism
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_frozen_by_default(name):
    policy = rlopt.load_policy(name)
    assert not policy.training
    before = _weights(policy)
    model = make_model()
    if name == "lr-dqn":
        opt = QLearningRateOptimizer(model.parameters(), lr=0.05, policy=policy, interval=1)
    else:
        opt = RLSwitchingOptimizer(model.parameters(), choices=list(SHIPPED[name]), policy=policy, interval=1)
    _run(opt, model, steps=20)
    assert not opt.policy.training
    assert all(h["policy"] == {} for h in opt.history)  # no update ran
    for a, b in zip(before, _weights(policy)):
        assert torch.equal(a, b)


def test_train_true_fine_tunes():
    policy = rlopt.load_policy("switch-sgd-sam", train=True)
    assert policy.training
    before = _weights(policy)
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy=policy, interval=1)
    _run(opt, model, steps=2 * policy.config.rollout_len + 2)
    assert policy.n_updates >= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, _weights(policy)))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_loaded_policy_is_deterministic(name):
    a, b = rlopt.load_policy(name), rlopt.load_policy(name)
    g = torch.Generator().manual_seed(0)
    obs = torch.rand(64, a.obs_dim, generator=g) * 2 - 1
    acts_a = [a.act(o) for o in obs]
    assert acts_a == [b.act(o) for o in obs]
    assert acts_a == [a.act(o) for o in obs]  # acting does not change a frozen policy


# ------------------------------------------------------------------ tasks and meta-training
def test_tasks_are_reproducible_and_noise_only_on_training_labels():
    cfg = TINY.sample(torch.Generator().manual_seed(1), seed=5)
    t1, t2 = build_task(cfg), build_task(cfg)
    assert torch.equal(t1.train_x, t2.train_x) and torch.equal(t1.val_y, t2.val_y)
    for p, q in zip(t1.model.parameters(), t2.model.parameters()):
        assert torch.equal(p, q)
    noisy = build_task(dataclasses.replace(cfg, label_noise=0.5))
    assert torch.equal(noisy.val_y, t1.val_y) and torch.equal(noisy.train_x, t1.train_x)
    assert not torch.equal(noisy.train_y, t1.train_y)


def test_fmnist_tasks_fall_back_to_teacher_without_the_file(tmp_path):
    dist = TaskDistribution(data=("fmnist",), fmnist_path=str(tmp_path / "missing.npz"))
    cfg = dist.sample(torch.Generator().manual_seed(0), seed=0)
    assert cfg.data == "teacher"
    assert dist.describe()["fmnist_available"] is False


@pytest.mark.parametrize("kind,algo", [("switching", "ppo"), ("switching", "dqn"), ("lr", "dqn")])
def test_meta_training_end_to_end(tmp_path, kind, algo):
    out = tmp_path / "policy.pt"
    result = train_policy(
        kind=kind,
        choices=("sgd", "sam"),
        algo=algo,
        episodes=2,
        seed=3,
        out=out,
        distribution=TINY,
        progress=False,
        register="tiny test policy",
        threads=None,
    )
    assert len(result.returns) == 2 and all(isinstance(r, float) for r in result.returns)
    policy = load_policy(out)
    assert not policy.training and policy.kind == algo
    meta = policy.metadata
    assert meta["action_names"] == list(policy.action_names) == list(result.policy.action_names)
    assert meta["obs_layout"] == policy.obs_layout and meta["obs_layout_version"] == policy.obs_layout["version"]
    assert meta["returns"] == [round(r, 4) for r in result.returns]
    assert meta["seed"] == 3 and meta["episodes"] == 2 and meta["rlopt_version"] == rlopt.__version__
    assert meta["task_distribution"]["data"] == ["teacher"]
    assert meta["command"].startswith("python -m rlopt.meta.train_policy --kind " + kind)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["policy"]["description"] == "tiny test policy" and index["policy"]["episodes"] == 2
    # the checkpoint drives a fresh optimizer of the same kind
    model = make_model()
    if kind == "lr":
        opt = QLearningRateOptimizer(model.parameters(), lr=0.05, policy=str(out), interval=2)
    else:
        opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy=str(out), interval=2)
    _run(opt, model)


def test_meta_training_is_seeded():
    a = train_policy(episodes=2, seed=1, distribution=TINY, progress=False, threads=None)
    b = train_policy(episodes=2, seed=1, distribution=TINY, progress=False, threads=None)
    assert a.returns == b.returns
    for x, y in zip(_weights(a.policy), _weights(b.policy)):
        assert torch.equal(x, y)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli.pt"
    main(
        [
            "--kind",
            "switching",
            "--choices",
            "sgd,adam",
            "--episodes",
            "1",
            "--data",
            "teacher",
            "--out",
            str(out),
            "--no-progress",
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert "1 episodes" in capsys.readouterr().out
    policy = load_policy(out)
    assert policy.action_names == ("sgd", "adam")
    assert policy.metadata["command"] == (
        f"python -m rlopt.meta.train_policy --kind switching --choices sgd,adam "
        f"--episodes 1 --data teacher --out {out} --no-progress --quiet --threads 1"
    )


def test_invalid_arguments():
    with pytest.raises(ValueError, match="kind"):
        train_policy(kind="other", episodes=1, progress=False)
    with pytest.raises(ValueError, match="algo"):
        train_policy(algo="a2c", episodes=1, progress=False)
    with pytest.raises(ValueError, match="episodes"):
        train_policy(episodes=0, progress=False)
    with pytest.raises(ValueError, match="data"):
        TaskDistribution(data=("imagenet",))


def test_task_overrides_from_the_command_line(tmp_path):
    dist = TaskDistribution().with_overrides(
        ["epochs=20,30", "label_noise=0.2,0.4", "interval=epoch,8", "lr_range=0.02,0.1", "cnn_share=0.7", "n-train=256"]
    )
    assert (dist.epochs, dist.label_noise, dist.interval) == ((20, 30), (0.2, 0.4), ("epoch", 8))
    assert (dist.lr_range, dist.cnn_share, dist.n_train) == ((0.02, 0.1), 0.7, (256,))
    assert dist.mlp_width == TaskDistribution().mlp_width  # the rest stays
    for bad, match in [
        ("epochs=", "no values"),
        ("width=3", "FIELD one of"),
        ("epochs=a", "invalid literal"),
        ("epochs=0", "Invalid epochs"),
        ("cnn_share=0.1,0.2", "one value"),
        ("lr_range=0.2,0.1", "Invalid lr_range"),
        ("interval=soon", "Invalid interval"),
        ("label_noise=1.5", "Invalid label_noise"),
    ]:
        with pytest.raises(ValueError, match=match):
            TaskDistribution().with_overrides([bad])
    out = tmp_path / "cli.pt"
    main(
        [
            "--episodes",
            "1",
            "--data",
            "teacher",
            "--task",
            "epochs=2",
            "--task",
            "n_train=64",
            "--out",
            str(out),
            "--no-progress",
            "--quiet",
            "--threads",
            "1",
        ]
    )
    meta = load_policy(out).metadata
    assert meta["task_distribution"]["epochs"] == [2] and meta["task_distribution"]["n_train"] == [64]
    assert "--task epochs=2 --task n_train=64" in meta["command"]
    with pytest.raises(SystemExit):
        main(["--episodes", "1", "--task", "epochs=0"])


@pytest.mark.parametrize("interval", ["epoch", 1, 2, 3])
def test_paired_reward_pays_nothing_for_matching_the_reference(interval):
    """An SGD-only run of the task paid relative to an SGD-only reference of the same task (same
    weights, batch order) earns exactly nothing, whether decisions fall on epoch ends or not (2
    steps per epoch here); SAM throughout earns its accuracy and loss over the reference's,
    telescoped, plus the final bonus."""
    from rlopt.meta.tasks import run_episode
    from rlopt.meta.train_policy import _make_optimizer, _reference_reward
    from rlopt.rewards import BaselineReward

    cfg = dataclasses.replace(TINY.sample(torch.Generator().manual_seed(0), seed=5), interval=interval, epochs=3)
    assert cfg.steps_per_epoch == 2
    reward = _reference_reward(cfg, None, ("sgd", "sam"), seed=0)
    assert len(reward.reference) == 3
    task = build_task(cfg)
    opt = _make_optimizer("switching", task, ("sgd", "sam"), "constant:sgd", 0, reward)
    out = run_episode(task, opt)
    assert out["val_curve"] == reward.reference
    paid = [h["reward"] for h in opt.history if h["reward"] is not None]
    assert len(paid) >= 2 and paid == [0.0] * len(paid)
    assert any(h["signals"]["val_fresh"] for h in opt.history)
    if interval != "epoch":
        return

    no_charge = BaselineReward(reference=reward.reference, cost=0.0)
    task = build_task(cfg)
    opt = _make_optimizer("switching", task, ("sgd", "sam"), "constant:sam", 0, no_charge)
    out = run_episode(task, opt)
    (l1, a1), (lE, aE) = out["val_curve"][0], out["val_curve"][-1]
    (r1, q1), (rE, qE) = reward.reference[0], reward.reference[-1]
    expected = 10 * ((aE - qE) - (a1 - q1)) + (math.log(l1 / lE) - math.log(r1 / rE)) + 10 * (aE - qE)
    assert out["return"] == pytest.approx(expected, abs=1e-9)
    assert out["val_curve"] != reward.reference  # SAM did train differently


def test_baseline_reward_checks_its_reference_and_reads_epochs_from_progress():
    from rlopt.control.observation import Signals
    from rlopt.rewards import BaselineReward, RewardContext

    for bad in ([], [(0.0, 0.5)], [(1.0, float("nan"))], [(1.0,)]):
        with pytest.raises(ValueError, match="reference"):
            BaselineReward(reference=bad)
    r = BaselineReward(reference=[(2.0, 0.2), (1.0, 0.5), (0.5, 0.6), (0.25, 0.9)], cost=0, skipped=0)
    assert r._epoch(Signals()) is None and r._epoch(Signals(val_epoch=1)) == 0
    assert r._epoch(Signals(val_epoch=2)) == 1 and r._epoch(Signals(val_epoch=9)) == 3
    before = Signals(val_acc=0.5, val_loss=1.0, val_epoch=1, val_fresh=True)  # 0.3 above the reference
    now = Signals(val_acc=0.7, val_loss=1.0, val_epoch=2, val_fresh=True)  # 0.2 above; loss: ref halved
    assert r(RewardContext(now=now, before=before, action="sam", final=False)) == pytest.approx(
        10 * (0.2 - 0.3) - math.log(2.0)
    )
    last = Signals(val_acc=0.95, val_loss=1.0, val_epoch=4, val_fresh=True)
    assert r(RewardContext(now=last, before=now, action="sam", final=True)) == pytest.approx(
        10 * (0.05 - 0.2) - math.log(4.0) + 10 * 0.05
    )
    # an interval without validation: no un-referenced training-loss term
    stale = Signals(val_acc=0.7, val_loss=1.0, val_epoch=2, loss=0.5)
    assert r(RewardContext(now=stale, before=dataclasses.replace(stale, loss=1.0), action="sgd", final=False)) == 0.0
    # validation given without an epoch count (val_epoch 0): the plain reward's terms
    plain = Signals(val_acc=0.7, val_fresh=True)
    assert r(RewardContext(now=plain, before=Signals(val_acc=0.5), action="sgd", final=False)) == pytest.approx(2.0)


def test_paired_meta_training_records_the_reference(tmp_path):
    result = train_policy(episodes=2, seed=1, distribution=TINY, progress=False, threads=None, reward="paired")
    meta = result.metadata
    assert meta["reward"] == "paired" and len(meta["sgd_val_acc"]) == 2
    assert "--reward paired" in meta["command"]
    with pytest.raises(ValueError, match="paired"):
        train_policy(kind="lr", episodes=1, distribution=TINY, progress=False, threads=None, reward="paired")
    with pytest.raises(ValueError, match="Unknown reward"):
        train_policy(episodes=1, distribution=TINY, progress=False, threads=None, reward="relative")
