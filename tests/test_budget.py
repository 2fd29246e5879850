"""The compute budget of RLSwitchingOptimizer (never exceeded, whatever the policy, at any interval,
across a resume and a copy; its features, history and errors) and the sharpness signal.

The extra compute is counted independently of the optimizer: every closure call is one gradient
evaluation, so closure calls minus steps are the evaluations beyond SGD's.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from conftest import assert_tree_equal, make_data, make_model, normalize, roundtrip
from torch.nn import functional as F

from rlopt import RLSwitchingOptimizer
from rlopt.control.budget import BUDGET_FEATURES
from rlopt.control.sharpness import measure_sharpness, sharpness_estimate

POLICIES = ["random", "ppo", "dqn", "constant:sam", "sam-late", "sam-every:2", "ss-sam", "ss-sam:0.8", "ae-sam:-1"]
EPOCH = 8  # steps per epoch


class Run:
    """A model, an optimizer and a closure that counts its calls."""

    def __init__(self, policy, interval, share, *, total_steps=None, total_epochs=None, seed=0, model_seed=0, **kw):
        self.model = make_model(seed=model_seed)
        self.x, self.y = make_data()
        self.opt = RLSwitchingOptimizer(
            self.model.parameters(),
            choices=["sgd", "sam"],
            policy=policy,
            interval=interval,
            seed=seed,
            total_steps=total_steps,
            total_epochs=total_epochs,
            compute_budget=share,
            **kw,
        )
        self.calls = self.steps = 0

    def closure(self):
        self.calls += 1
        self.opt.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        return loss

    def run(self, n, first=0):
        for k in range(first, first + n):
            self.opt.step(self.closure)
            self.steps += 1
            if (k + 1) % EPOCH == 0:
                self.opt.epoch_end(val_loss=1.0 / (k + 2), val_acc=min(1.0, 0.02 * k))

    @property
    def extra(self):
        return self.calls - self.steps


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "interval,length", [(1, "steps"), (3, "steps"), (3, "epochs"), ("epoch", "steps"), ("epoch", "epochs")]
)
def test_budget_is_never_exceeded(policy, interval, length):
    share, epochs = 0.3, 5
    n = EPOCH * epochs
    run = Run(policy, interval, share, **({"total_steps": n} if length == "steps" else {"total_epochs": epochs}))
    limit = math.floor(share * n + 1e-9)  # SAM costs one evaluation more than SGD
    for k in range(n):
        run.run(1, k)
        assert run.extra <= limit, f"step {k + 1}"
    if policy == "constant:sam":  # a policy that always asks for SAM spends the whole budget, no more
        first_epoch = EPOCH if length == "epochs" else 0  # nothing is spent before the run's length is known
        assert run.extra == min(limit, n - first_epoch)
    last = run.opt.history[-1]
    assert last["step"] == n and last["budget_spent"] == run.extra  # the history records what was spent
    assert all(h["budget_used"] <= share + 1e-12 for h in run.opt.history if not math.isnan(h["budget_used"]))


def test_steps_past_the_run_take_the_cheapest_choice():
    run = Run("constant:sam", 1, 0.25, total_steps=8)
    run.run(20)
    assert run.extra == 2
    assert run.opt.history[-1]["budget_overridden"] == 18


def _side_by_side(runs, n, first):
    for k in range(first, first + n):
        for r in runs:
            r.run(1, k)
        if len(runs) == 2:
            for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
                assert torch.equal(p, q), f"step {k}"


@pytest.mark.parametrize("policy", ["random", "ppo", "sam-late", "ss-sam", "ae-sam:-1", "constant:sam"])
@pytest.mark.parametrize("how", ["checkpoint", "pickle", "deepcopy"])
def test_resume_mid_run_spends_exactly_as_the_uninterrupted_run(policy, how):
    n, cut = 40, 13  # mid-interval
    a = Run(policy, 3, 0.3, total_steps=n, seed=2)
    _side_by_side([a], cut, 0)
    if how == "checkpoint":
        ckpt = roundtrip({"model": a.model.state_dict(), "opt": a.opt.state_dict()})
        b = Run(policy, 3, 0.3, total_steps=n, seed=2, model_seed=1)  # a fresh process: other weights
        b.model.load_state_dict(ckpt["model"])
        b.opt.load_state_dict(ckpt["opt"])
    else:
        b = pickle.loads(pickle.dumps(a)) if how == "pickle" else copy.deepcopy(a)
    b.calls, b.steps = a.calls, a.steps
    _side_by_side([a, b], n - cut + 5, cut)
    assert a.extra == b.extra <= 12
    assert_tree_equal(normalize(a.opt.history), normalize(b.opt.history))
    assert_tree_equal(a.opt.state_dict(), b.opt.state_dict())


@pytest.mark.parametrize("policy", ["random", "constant:sam"])
def test_resume_mid_epoch_with_total_epochs(policy):
    a = Run(policy, 3, 0.3, total_epochs=5, seed=2)
    _side_by_side([a], 13, 0)  # the run's length was fixed at the first epoch_end
    ckpt = roundtrip({"model": a.model.state_dict(), "opt": a.opt.state_dict()})
    b = Run(policy, 3, 0.3, total_epochs=5, seed=2, model_seed=1)
    b.model.load_state_dict(ckpt["model"])
    b.opt.load_state_dict(ckpt["opt"])
    b.calls, b.steps = a.calls, a.steps
    _side_by_side([a, b], 27, 13)
    assert a.extra == b.extra <= 12
    assert_tree_equal(a.opt.state_dict(), b.opt.state_dict())


def test_an_extended_run_spends_the_share_of_its_new_length():
    a = Run("constant:sam", 1, 0.25, total_steps=20)
    a.run(10)
    assert a.extra == 5  # the budget of 20 steps is spent
    b = Run("constant:sam", 1, 0.25, total_steps=40)
    b.opt.load_state_dict(a.opt.state_dict())
    b.calls, b.steps = a.calls, a.steps
    b.run(30, 10)
    assert b.extra == 10


def test_a_step_that_raises_is_not_charged():
    run = Run("constant:sam", 1, 0.5, total_steps=10)
    run.run(3)
    before = run.opt.state_dict()["rlopt"]["extra"]

    def failing():
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader"):
        run.opt.step(failing)
    assert run.opt.state_dict()["rlopt"]["extra"] == before
    run.run(7, 3)
    assert run.extra == 5  # the failed step spent nothing


def test_features_show_the_budget_left_and_the_steps_left():
    n, share = 40, 0.3
    run = Run("constant:sgd", 4, share, total_steps=n)
    run.run(n)
    names = run.opt.observation_layout["names"]
    at = [names.index(f) for f in BUDGET_FEATURES]
    for h in run.opt.history:
        s = h["step"]
        obs = h["observation"]
        expect = [1.0, (n - s) / n, min(1.0, share * n / (n - s)) if s < n else 0.0]
        # float32 observations: compared at float32's resolution
        torch.testing.assert_close(torch.tensor([obs[i] for i in at]), torch.tensor(expect))
        assert h["budget_used"] == 0.0
    spender = Run("constant:sam", 4, share, total_steps=n)
    spender.run(8)
    obs = spender.opt.history[-1]["observation"]
    torch.testing.assert_close(
        torch.tensor([obs[i] for i in at]), torch.tensor([(12 - 8) / 12, 32 / 40, 4 / 32])
    )  # 8 of 12 evaluations spent
    assert spender.opt.history[-1]["budget_used"] == 8 / 40


def test_without_a_budget_the_layout_is_unchanged():
    model = make_model()
    plain = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "sam"], policy="random", total_steps=10)
    assert not set(BUDGET_FEATURES) & set(plain.observation_layout["names"])
    budgeted = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "sam"], policy="random", total_steps=10, compute_budget=0.1
    )
    assert budgeted.observation_layout["names"][:-2] == plain.observation_layout["names"][:-2] + list(BUDGET_FEATURES)


@pytest.mark.parametrize(
    "kwargs,err,msg",
    [
        (dict(compute_budget=-0.1, total_steps=10), ValueError, "Invalid compute_budget: -0.1"),
        (dict(compute_budget=1.5, total_steps=10), ValueError, r"in \[0, 1\]"),
        (dict(compute_budget=float("nan"), total_steps=10), ValueError, "Invalid compute_budget"),
        (dict(compute_budget=True, total_steps=10), TypeError, "must be a number"),
        (dict(compute_budget="0.3", total_steps=10), TypeError, "must be a number"),
        (dict(compute_budget=0.3), ValueError, "needs the run's length"),
        (dict(compute_budget=0.3, choices=["sgd", "adam"], total_steps=10), ValueError, r"in \[0, 0\]"),
    ],
)
def test_bad_budgets(kwargs, err, msg):
    kwargs = {"choices": ["sgd", "sam"], **kwargs}
    with pytest.raises(err, match=msg):
        RLSwitchingOptimizer(make_model().parameters(), policy="random", **kwargs)


def test_checkpoints_with_another_budget_are_refused_and_change_nothing():
    a = Run("random", 2, 0.3, total_steps=20)
    a.run(5)
    sd = a.opt.state_dict()
    # without a budget the observation layout differs too, and the policy check names it first
    for other, msg in [(dict(share=0.2), "budget is 0.3"), (dict(share=None), "obs_dim|this optimizer has none")]:
        b = Run("random", 2, other["share"], total_steps=20)
        b.run(3)
        before = b.opt.state_dict()
        with pytest.raises(ValueError, match=msg):
            b.opt.load_state_dict(sd)
        assert_tree_equal(normalize(b.opt.state_dict()), normalize(before))
    plain = Run("random", 2, None, total_steps=20)
    with pytest.raises(ValueError, match="saved without a compute_budget|obs_dim"):
        a.opt.load_state_dict(plain.opt.state_dict())


# ----------------------------------------------------------------------------- sharpness
def test_sharpness_on_a_quadratic_equals_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, dtype=torch.float64, generator=gen)
    a = m @ m.T + torch.eye(5, dtype=torch.float64)
    w = torch.nn.Parameter(torch.randn(5, dtype=torch.float64, generator=gen))
    rho = 0.1

    def closure():
        w.grad = None
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    w0 = w.detach().clone()
    est = measure_sharpness([w], closure, rho)
    g = a @ w0
    expect = 1 + rho * (g @ a @ g) / (2 * (g @ g) ** 1.5)  # (L(w + e) - L(w)) / (rho |g|) for L = w'Aw / 2
    # float64 throughout, the same quantity by another formula: equal to float64 rounding
    torch.testing.assert_close(est, expect, rtol=1e-10, atol=0)
    assert torch.equal(w.detach(), w0)  # weights restored bit for bit
    closure()  # the gradient one plain closure call leaves at w (autograd's, not a @ w's rounding)
    expected_grad = w.grad.clone()
    w.grad = None
    measure_sharpness([w], closure, rho)
    assert torch.equal(w.grad, expected_grad)  # the gradient at w, as after one closure call


def test_sharpness_estimate_on_a_network_equals_a_direct_computation():
    model = make_model()
    x, y = make_data()
    rho = 0.05

    def closure():
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    params = list(model.parameters())
    est = measure_sharpness(params, closure, rho)
    # direct: the loss at w and at w + rho g / |g| through torch.func, no in-place perturbation
    names = [n for n, _ in model.named_parameters()]
    w = {n: p.detach() for n, p in zip(names, params)}
    loss = F.cross_entropy(torch.func.functional_call(model, w, (x,)), y)
    g = torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)), y))(w)
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    shifted = {n: w[n] + rho * g[n] / norm for n in names}
    direct = (F.cross_entropy(torch.func.functional_call(model, shifted, (x,)), y) - loss) / (rho * norm)
    # the same sums in another order (norm of norms): compared at float32 resolution
    torch.testing.assert_close(est, direct.detach(), rtol=1e-4, atol=1e-6)


def test_sharpness_estimate_is_nan_without_a_gradient_and_refuses_rho_zero():
    assert torch.isnan(sharpness_estimate(torch.tensor(1.0), torch.tensor(1.0), 0.05, torch.tensor(0.0)))
    with pytest.raises(ValueError, match="rho"):
        sharpness_estimate(torch.tensor(1.0), torch.tensor(1.0), 0.0, torch.tensor(1.0))


# ----------------------------------------------------------------------------- DDP
_DDP_WORKER = r"""
import sys
import torch, torch.distributed as dist, torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from rlopt import RLSwitchingOptimizer

rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
results = {}
for policy, interval in [("random", 1), ("ss-sam", 3), ("constant:sam", 2)]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    net = DistributedDataParallel(model)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard, its own policy seed
    x, y = torch.randn(24, 16, 8, generator=gen), torch.randint(0, 3, (24, 16), generator=gen)
    opt = RLSwitchingOptimizer(net.parameters(), choices=["sgd", "sam"], policy=policy, interval=interval,
                               seed=rank, total_steps=24, compute_budget=0.25)
    calls = [0]
    for k in range(24):
        def closure():
            calls[0] += 1
            opt.zero_grad()
            loss = F.cross_entropy(net(x[k]), y[k])
            loss.backward()
            return loss
        opt.step(closure)
    results[policy] = {"extra": calls[0] - 24, "choices": [h["choice"] for h in opt.history],
                       "spent": [h["budget_spent"] for h in opt.history],
                       "params": [p.detach().clone() for p in model.parameters()]}
torch.save(results, out)
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_ranks_count_the_same_budget(tmp_path):
    """Two ranks (DDP over gloo) with other seeds and other data: one action per decision, so one
    count; a rank that ran SAM alone would hang the other's gradient all-reduce."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(_DDP_WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), init, str(outs[r])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for r in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=120)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the ranks did not finish within 120 s")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    r0, r1 = (torch.load(o, weights_only=True) for o in outs)
    for policy in r0:
        a, b = r0[policy], r1[policy]
        assert a["extra"] == b["extra"] <= 6, policy  # 0.25 * 24
        assert a["choices"] == b["choices"] and a["spent"] == b["spent"], policy
        for p, q in zip(a["params"], b["params"]):
            torch.testing.assert_close(p, q, rtol=0, atol=0)  # DDP: equal updates from equal averaged gradients
    assert r0["constant:sam"]["extra"] == 6


# ----------------------------------------------------------------------------- host cost
@pytest.mark.filterwarnings("ignore:None of the last")  # bare steps: the count is of the step alone
def test_the_budget_adds_no_operation_to_a_step():
    """The count is host arithmetic: a budgeted step dispatches exactly the operations of an
    unbudgeted one (no device read, no host sync), also once the budget forces the cheaper choice."""
    from benchmarks.overhead import CountOps

    def ops(share):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(3, 2, generator=gen)) for _ in range(4)]
        for p in params:
            p.grad = torch.randn(3, 2, generator=gen)
        opt = RLSwitchingOptimizer(
            params,
            choices={"sgd": {}, "dear": {"family": "sgd", "cost": 2.0}},
            policy="constant:dear",
            total_steps=200,
            compute_budget=share,
        )
        for _ in range(40):
            opt.step()
        with CountOps() as count:
            for _ in range(100):  # with share 0.5: 60 steps of "dear", then 40 of "sgd"
                opt.step()
        return count.ops, opt

    plain, _ = ops(None)
    budgeted, opt = ops(0.5)
    assert sum(plain.values()) >= 100  # every step was counted
    assert budgeted == plain
    assert opt.state_dict()["rlopt"]["extra"]["spent"] == 100.0
