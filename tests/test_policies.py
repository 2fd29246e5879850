"""Policies: GAE, buffers, DQN target network and epsilon schedule, truncation bootstraps,
determinism, RNG hygiene, checkpoints and their compatibility checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import assert_tree_equal, make_closure, make_data, make_model, roundtrip

import rlopt
from rlopt import RLSwitchingOptimizer
from rlopt.control.observation import observation_layout
from rlopt.policies import (
    ConstantConfig,
    ConstantPolicy,
    DQNConfig,
    DQNPolicy,
    PPOConfig,
    PPOPolicy,
    RandomConfig,
    RandomPolicy,
    ReplayBuffer,
    RolloutBuffer,
    compute_gae,
    load_policy,
)

ACTIONS = ("sgd", "sam", "adam")
LAYOUT = observation_layout(ACTIONS)
OBS_DIM = len(LAYOUT["names"])


def _obs_stream(n, seed=0, dim=OBS_DIM):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(dim, generator=g) * 2 - 1 for _ in range(n)]


def _drive(policy, n=12, seed=0):
    """Act/observe like an optimizer does; returns the actions."""
    obs = _obs_stream(n + 1, seed)
    actions = [policy.act(obs[0])]
    for k in range(1, n + 1):
        policy.observe(float(k % 3) - 1.0, obs[k], truncated=(k == n))
        actions.append(policy.act(obs[k]))
    return actions


SMALL = {
    "dqn": lambda seed=0, **kw: DQNPolicy(
        OBS_DIM,
        ACTIONS,
        DQNConfig(
            **{"hidden": 16, "learning_starts": 2, "batch_size": 4, "target_update": 3, "train_frequency": 1, **kw}
        ),
        seed=seed,
        obs_layout=LAYOUT,
    ),
    "ppo": lambda seed=0, **kw: PPOPolicy(
        OBS_DIM,
        ACTIONS,
        PPOConfig(**{"hidden": 16, "rollout_len": 3, "update_epochs": 2, **kw}),
        seed=seed,
        obs_layout=LAYOUT,
    ),
    "random": lambda seed=0, **kw: RandomPolicy(OBS_DIM, ACTIONS, RandomConfig(**kw), seed=seed, obs_layout=LAYOUT),
    "constant": lambda seed=0, **kw: ConstantPolicy(
        OBS_DIM, ACTIONS, ConstantConfig(**{"action": "sam", **kw}), seed=seed, obs_layout=LAYOUT
    ),
}


# --------------------------------------------------------------------------------------- GAE
def test_compute_gae_hand_computed_with_done_in_the_middle():
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([0.5, 1.0, 1.5])
    dones = torch.tensor([0.0, 1.0, 0.0])
    gamma, lam, last_value = 0.9, 0.8, 2.0
    adv, ret = compute_gae(rewards, values, dones, last_value, gamma, lam)
    # t=2: delta = 3 + 0.9*2.0 - 1.5 = 3.3                 A2 = 3.3
    # t=1: done -> delta = 2 - 1.0 = 1.0, no carry         A1 = 1.0
    # t=0: delta = 1 + 0.9*1.0 - 0.5 = 1.4, + 0.9*0.8*A1   A0 = 2.12
    torch.testing.assert_close(adv, torch.tensor([2.12, 1.0, 3.3]))
    torch.testing.assert_close(ret, torch.tensor([2.62, 2.0, 4.8]))


def test_compute_gae_lambda_one_is_discounted_return_minus_value():
    rewards = torch.tensor([1.0, -1.0, 0.5, 2.0])
    values = torch.tensor([0.3, 0.2, -0.1, 0.4])
    adv, ret = compute_gae(rewards, values, torch.zeros(4), 1.5, 0.9, 1.0)
    expected = [sum(0.9 ** (j - t) * float(rewards[j]) for j in range(t, 4)) + 0.9 ** (4 - t) * 1.5 for t in range(4)]
    torch.testing.assert_close(ret, torch.tensor(expected))
    torch.testing.assert_close(adv, torch.tensor(expected) - values)


# ------------------------------------------------------------------------------------ buffers
def test_replay_buffer_wraps_around_and_round_trips():
    buf = ReplayBuffer(3, 2)
    for i in range(5):
        buf.add(torch.full((2,), float(i)), i % 2, float(i), torch.full((2,), i + 0.5), i == 4)
    assert len(buf) == 3 and buf.pos == 2
    # slots hold transitions 3, 4, 2: the two oldest (0, 1) were overwritten first
    assert buf.reward.tolist() == [3.0, 4.0, 2.0]
    assert buf.obs[:, 0].tolist() == [3.0, 4.0, 2.0]
    assert buf.terminal.tolist() == [0.0, 1.0, 0.0]
    batch = buf.sample(10, torch.Generator().manual_seed(0))
    assert sorted(batch.reward.tolist()) == [2.0, 3.0, 4.0]  # without replacement, capped at len
    other = ReplayBuffer(3, 2)
    other.load_state_dict(roundtrip(buf.state_dict()))
    assert other.pos == 2 and len(other) == 3 and torch.equal(other.obs, buf.obs)
    other.add(torch.zeros(2), 0, 9.0, torch.zeros(2), False)
    assert other.reward.tolist() == [3.0, 4.0, 9.0]
    with pytest.raises(ValueError):
        ReplayBuffer(2, 2).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="position 2"):  # a wrapped ring cannot continue in a larger one
        ReplayBuffer(4, 2).load_state_dict(buf.state_dict())


def test_rollout_buffer_full_and_reset():
    buf = RolloutBuffer(2, 3)
    buf.add(torch.zeros(3), 1, -0.5, 0.1, 1.0, False)
    buf.add(torch.ones(3), 2, -0.7, 0.2, 2.0, True)
    assert buf.full()
    with pytest.raises(RuntimeError, match="full"):
        buf.add(torch.zeros(3), 0, 0.0, 0.0, 0.0, False)
    buf.reset()
    assert not buf.full()


# -------------------------------------------------------------------------------------- DQN
def test_target_network_copied_exactly_every_target_update_updates():
    policy = SMALL["dqn"](learning_starts=1, batch_size=2, target_update=3, lr=1e-2)
    initial = {k: v.clone() for k, v in policy.target_net.state_dict().items()}
    obs = _obs_stream(8)
    policy.act(obs[0])
    snapshot = initial
    for k in range(1, 8):
        policy.observe(1.0, obs[k])
        policy.act(obs[k])
        assert policy.n_updates == k
        online = policy.q_net.state_dict()
        target = policy.target_net.state_dict()
        if k % 3 == 0:
            assert all(torch.equal(target[n], online[n]) for n in online)
            snapshot = {n: v.clone() for n, v in online.items()}
        else:
            assert all(torch.equal(target[n], snapshot[n]) for n in target)
            assert not all(torch.equal(target[n], online[n]) for n in online)  # online moved on


def test_epsilon_endpoints_and_decay():
    c = dict(epsilon_start=0.8, epsilon_end=0.1, epsilon_decay=0.5)
    policy = SMALL["dqn"](**c)
    assert policy.epsilon == 0.8
    obs = _obs_stream(10)
    policy.act(obs[0])
    assert policy.epsilon == pytest.approx(0.4)
    policy.act(obs[1])
    assert policy.epsilon == pytest.approx(0.2)
    for o in obs[2:]:
        policy.act(o)
    assert policy.epsilon == 0.1  # the floor, exactly, and it stays there


def test_epsilon_decays_faster_with_confident_q_values():
    obs = _obs_stream(5)
    plain = SMALL["dqn"](epsilon_decay=0.9)
    fast = SMALL["dqn"](epsilon_decay=0.9, epsilon_var_coef=50.0)
    eps = 1.0
    for o in obs:
        var = float(fast.q_values(o).var(unbiased=False))
        assert var > 0
        plain.act(o)
        fast.act(o)
        eps = max(0.05, eps * math.exp(math.log(0.9) - 50.0 * var))
        assert fast.epsilon == pytest.approx(eps)
    assert fast.epsilon < plain.epsilon == pytest.approx(0.9**5)


def test_dqn_truncation_is_not_terminal():
    policy = SMALL["dqn"](learning_starts=100)
    obs = _obs_stream(4)
    policy.act(obs[0])
    policy.observe(1.0, obs[1], truncated=True)
    policy.act(obs[1])
    policy.observe(2.0, obs[2], terminal=True)
    assert policy.buffer.terminal[:2].tolist() == [0.0, 1.0]
    assert torch.equal(policy.buffer.next_obs[0], obs[1])


def test_frozen_dqn_is_greedy_and_stores_nothing():
    policy = SMALL["dqn"]().eval()
    for o in _obs_stream(5):
        assert policy.act(o) == int(policy.q_values(o).argmax())
        policy.observe(1.0, o)
    assert len(policy.buffer) == 0 and policy.epsilon == 1.0


# -------------------------------------------------------------------------------------- PPO
def test_ppo_truncation_bootstraps_the_value():
    policy = SMALL["ppo"](rollout_len=4, gamma=0.9)
    obs = _obs_stream(3)
    policy.act(obs[0])
    policy.observe(1.0, obs[1])
    policy.act(obs[1])
    policy.observe(1.0, obs[2], truncated=True)
    r = policy.rollout.reward
    assert r[0].item() == pytest.approx(1.0)  # ordinary step: no bootstrap in the reward
    assert r[1].item() == pytest.approx(1.0 + 0.9 * policy.value(obs[2]), rel=1e-6)
    assert policy.rollout.done[:2].tolist() == [0.0, 1.0]
    assert policy.value(obs[2]) != 0.0


def test_ppo_terminal_does_not_bootstrap_and_updates_after_rollout():
    policy = SMALL["ppo"](rollout_len=2)
    obs = _obs_stream(3)
    actor = {k: v.clone() for k, v in policy.actor.state_dict().items()}
    policy.act(obs[0])
    assert policy.observe(0.5, obs[1]) == {}
    policy.act(obs[1])
    info = policy.observe(0.5, obs[2], terminal=True)
    assert policy.n_updates == 1 and policy.rollout.pos == 0
    assert {"pg_loss", "v_loss", "entropy", "approx_kl", "clipfrac"} <= set(info)
    assert not all(torch.equal(actor[k], v) for k, v in policy.actor.state_dict().items())


def test_frozen_ppo_takes_most_probable_action():
    policy = SMALL["ppo"]().eval()
    for o in _obs_stream(5):
        assert policy.act(o) == int(policy.probabilities(o).argmax())


# ------------------------------------------------------------------------ generic over kinds
@pytest.mark.parametrize("kind", sorted(SMALL))
def test_same_seed_same_actions(kind):
    a, b = _drive(SMALL[kind](seed=7)), _drive(SMALL[kind](seed=7))
    assert a == b
    if kind == "random":
        assert _drive(SMALL[kind](seed=8)) != a
        assert len(set(a)) > 1


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_policy_does_not_touch_global_rng(kind):
    before = torch.get_rng_state()
    policy = SMALL[kind]()
    _drive(policy, n=9)
    assert torch.equal(before, torch.get_rng_state())
    if kind in ("dqn", "ppo"):
        assert policy.n_updates > 0  # the learning code ran too


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_state_dict_round_trip_continues_identically(kind):
    p1 = SMALL[kind]()
    _drive(p1, n=5)
    p2 = SMALL[kind](seed=99)  # different init: everything must come from the state
    p2.load_state_dict(roundtrip(p1.state_dict()))
    assert _drive(p1, n=7, seed=3) == _drive(p2, n=7, seed=3)
    assert_tree_equal(p1.state_dict(), p2.state_dict())


def _other_buffer(kind):  # another rollout_len / replay capacity: the networks fit, the buffer does not
    return SMALL[kind](seed=1, **({"rollout_len": 5} if kind == "ppo" else {"buffer_size": 2}))


def _tampered(kind, edit):
    def make():
        state = _drive_and_state(SMALL[kind](seed=1))
        edit(state)
        return state

    return make


def _drive_and_state(policy):
    _drive(policy, n=5)
    return copy.deepcopy(policy.state_dict())


def _bad_adam_moment(state):
    entry = next(iter(state["optimizer"]["state"].values()))
    entry["exp_avg"] = torch.zeros(1)


BAD_POLICY_STATES = {  # name: kind -> a state that the small policy of that kind must refuse whole
    "other buffer size": lambda kind: _drive_and_state(_other_buffer(kind)),
    "other hidden size": lambda kind: _drive_and_state(SMALL[kind](seed=1, hidden=8)),
    "bad Adam moment": lambda kind: _tampered(kind, _bad_adam_moment)(),
    "bad rng": lambda kind: _tampered(kind, lambda s: s.update(rng=s["rng"][:-1]))(),
    "missing counter": lambda kind: _tampered(kind, lambda s: s.pop("n_updates"))(),
    "non-bool training": lambda kind: _tampered(kind, lambda s: s.update(training="no"))(),
}


@pytest.mark.parametrize("bad", sorted(BAD_POLICY_STATES))
@pytest.mark.parametrize("kind", ["dqn", "ppo"])
def test_failed_policy_load_changes_nothing(kind, bad):
    """A state that does not fit is refused before anything is loaded: every tensor of the
    policy's state_dict, its RNG state and its buffers stay as they were, and it acts on as if
    the load had not been tried."""
    policy = SMALL[kind]()
    _drive(policy, n=5)  # non-trivial networks, Adam moments, buffer contents, pending decision
    untouched = copy.deepcopy(policy)
    before = copy.deepcopy(policy.state_dict())
    buffer = policy.buffer if kind == "dqn" else policy.rollout
    raw = {k: v.clone() for k, v in vars(buffer).items() if isinstance(v, torch.Tensor)}
    rng = policy.generator.get_state()
    state = BAD_POLICY_STATES[bad](kind)
    with pytest.raises(ValueError):
        policy.load_state_dict(state)
    assert_tree_equal(before, policy.state_dict())
    assert torch.equal(policy.generator.get_state(), rng)
    assert all(torch.equal(getattr(buffer, k), v) for k, v in raw.items())
    assert _drive(policy, n=6, seed=4) == _drive(untouched, n=6, seed=4)
    assert_tree_equal(policy.state_dict(), untouched.state_dict())


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_save_load_round_trip_frozen_by_default(kind, tmp_path):
    policy = SMALL[kind]()
    _drive(policy, n=7)
    path = tmp_path / f"{kind}.pt"
    policy.save(path, note="test")
    for loaded in (load_policy(path), rlopt.load_policy(str(path))):
        assert type(loaded) is type(policy) and loaded.training is False
        assert loaded.metadata["note"] == "test" and "rlopt_version" in loaded.metadata
        assert loaded.action_names == policy.action_names and loaded.obs_layout == LAYOUT
        original = copy.deepcopy(policy).eval()  # a fresh copy each time: RandomPolicy's RNG advances
        for o in _obs_stream(8, seed=5):
            assert loaded.act(o) == original.act(o)
    assert rlopt.load_policy(path, train=True).training is True
    # weights_only load works on the raw checkpoint
    assert torch.load(path, weights_only=True)["kind"] == kind


def test_load_policy_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "something/else"}, path)
    with pytest.raises(ValueError, match="not an rlopt policy checkpoint"):
        load_policy(path)


# --------------------------------------------------------------- checkpoints and optimizers
def _saved(tmp_path, choices=ACTIONS, layout=None):
    layout = layout or observation_layout(choices)
    policy = DQNPolicy(len(layout["names"]), choices, DQNConfig(hidden=16), obs_layout=layout)
    path = tmp_path / "policy.pt"
    policy.save(path)
    return path


def test_saved_policy_drives_an_optimizer_frozen(tmp_path):
    path = _saved(tmp_path)
    model = make_model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=list(ACTIONS), policy=str(path), interval=2)
    assert opt.policy.training is False
    x, y = make_data()
    for _ in range(4):
        opt.step(make_closure(model, opt, x, y))
    assert len(opt.history) == 3 and len(opt.policy.buffer) == 0
    opt.policy.save(tmp_path / "again.pt")
    assert isinstance(rlopt.load_policy(tmp_path / "again.pt"), DQNPolicy)
    # train_policy=True fine-tunes a loaded policy
    opt2 = RLSwitchingOptimizer(make_model().parameters(), choices=list(ACTIONS), policy=path, train_policy=True)
    assert opt2.policy.training is True


MISMATCH = [
    ("other-action-set", dict(choices=("sgd", "adam")), "action set"),
    ("other-order", dict(choices=("sam", "sgd", "adam")), "action set"),
    ("other-layout-version", dict(layout={"version": 99, "names": LAYOUT["names"]}), "layout version"),
    ("other-layout-names", dict(layout={"version": 1, "names": list(reversed(LAYOUT["names"]))}), "layout"),
    ("other-obs-dim", dict(layout={"version": 1, "names": LAYOUT["names"] + ["extra"]}), "observation features"),
]


@pytest.mark.parametrize("name,kw,msg", MISMATCH, ids=[m[0] for m in MISMATCH])
def test_mismatched_policy_checkpoint_is_rejected(name, kw, msg, tmp_path):
    path = _saved(tmp_path, **kw)
    with pytest.raises(ValueError, match=msg):
        RLSwitchingOptimizer(make_model().parameters(), choices=list(ACTIONS), policy=path)
    with pytest.raises(ValueError, match=msg):
        RLSwitchingOptimizer(make_model().parameters(), choices=list(ACTIONS), policy=load_policy(path))


POLICY_ERRORS = [
    (lambda: DQNConfig(lr=0.0), ValueError, "Invalid lr"),
    (lambda: DQNConfig(epsilon_decay=1.5), ValueError, "Invalid epsilon_decay"),
    (lambda: DQNConfig(epsilon_start=0.1, epsilon_end=0.5), ValueError, "Invalid epsilon range"),
    (lambda: DQNConfig(gamma=float("nan")), ValueError, "Invalid gamma"),
    (lambda: DQNConfig(target_update=0), ValueError, "Invalid target_update"),
    (lambda: PPOConfig(actor_lr=float("nan")), ValueError, "Invalid actor_lr"),
    (lambda: PPOConfig(gae_lambda=1.5), ValueError, "Invalid gae_lambda"),
    (lambda: PPOConfig(rollout_len=0), ValueError, "Invalid rollout_len"),
    (lambda: RandomPolicy(3, ["a", "b"], RandomConfig(probs=(1.0,))), ValueError, "Invalid action probabilities"),
    (lambda: RandomPolicy(3, ["a", "b"], RandomConfig(probs=(-1.0, 2.0))), ValueError, "Invalid action probabilities"),
    (lambda: ConstantPolicy(3, ["a", "b"], ConstantConfig(action=5)), ValueError, "Invalid action index"),
    (lambda: DQNPolicy(0, ["a"]), ValueError, "Invalid observation size"),
    (lambda: DQNPolicy(3, []), ValueError, "Invalid action names"),
    (lambda: DQNPolicy(3, ["a"]).act(torch.zeros(4)), ValueError, "Observation has 4 features"),
    (lambda: DQNPolicy(3, ["a"], train="no"), TypeError, "Invalid policy training mode: 'no'"),
    (lambda: PPOPolicy(3, ["a"]).train("no"), TypeError, "Invalid policy training mode: 'no'"),
    (lambda: RandomPolicy(3, ["a"]).train(1), TypeError, "Invalid policy training mode: 1"),
    (
        lambda: RLSwitchingOptimizer(make_model().parameters(), choices=["sgd", "adam"], train_policy="no"),
        TypeError,
        "Invalid policy training mode: 'no'",
    ),
    (lambda: DQNPolicy(3, ["a"]).load_state_dict([]), TypeError, "must be a dict"),
]


@pytest.mark.parametrize("make,err,msg", POLICY_ERRORS, ids=[f"{i}-{e[2]}" for i, e in enumerate(POLICY_ERRORS)])
def test_policy_bad_inputs(make, err, msg):
    with pytest.raises(err, match=msg):
        make()


def test_train_mode_unchanged_by_a_refused_flag():
    policy = SMALL["ppo"]().eval()
    with pytest.raises(TypeError):
        policy.train("yes")
    assert policy.training is False


def test_random_policy_probabilities_are_followed():
    policy = RandomPolicy(OBS_DIM, ACTIONS, RandomConfig(probs=(0.0, 1.0, 0.0)), obs_layout=LAYOUT)
    assert {policy.act(o) for o in _obs_stream(20)} == {1}
