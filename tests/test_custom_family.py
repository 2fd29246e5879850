"""Any torch optimizer as a choice family (``rlopt.choices.register_family``): the extension point
for a learned update rule."""

import copy

import pytest
import torch
import torch.nn.functional as F

from rlopt import RLSwitchingOptimizer
from rlopt.control.choices import FAMILIES, register_family, resolve_choices

pytestmark = pytest.mark.filterwarnings("ignore:Choice .* runs without fused kernels:RuntimeWarning")


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr * sign(grad + wd * p): a stand-in for any user optimizer (no fused kernels)."""

    def __init__(self, params, lr=0.01, weight_decay=0.0, foreach=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad + group["weight_decay"] * p), alpha=-group["lr"])


@pytest.fixture
def signsgd():
    register_family("signsgd", SignSGD, lr_scale=0.1)
    yield
    del FAMILIES["signsgd"]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_registered_family_runs_like_the_optimizer_itself(signsgd):
    x, y = torch.randn(5, 16, 6), torch.randint(0, 3, (5, 16))
    a, b = _model(), _model()
    with pytest.warns(RuntimeWarning, match="without fused kernels"):
        opt = RLSwitchingOptimizer(
            a.parameters(), choices={"s": {"family": "signsgd", "weight_decay": 0.01}}, policy="constant:s", lr=0.5
        )
    ref = SignSGD(b.parameters(), lr=0.05, weight_decay=0.01)  # lr * lr_scale
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for xb, yb in zip(x, y):
        for m, o, s in ((a, opt, sched), (b, ref, ref_sched)):
            o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            o.step()
            s.step()
    # bit for bit: the same optimizer class steps both; lr 0.5 * lr_scale 0.1 and StepLR's halvings
    # give the reference's 0.05, 0.025, ... exactly (a product by 0.5 is exact)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    restored = RLSwitchingOptimizer(
        _model().parameters(), choices={"s": {"family": "signsgd"}}, policy="constant:s", lr=0.5
    )
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.inner_optimizers["s"].param_groups[0]["weight_decay"] == 0.01


@pytest.mark.filterwarnings("ignore:None of the last")  # steps without a closure: no loss, on purpose
def test_switching_between_sgd_and_a_registered_family(signsgd):
    model = _model()
    opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "signsgd"], policy="random", interval=2, lr=0.1)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    first = F.cross_entropy(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert {h["choice"] for h in opt.history} == {"sgd", "signsgd"}
    assert F.cross_entropy(model(x), y).item() < first


@pytest.mark.parametrize(
    "args,kwargs,err,msg",
    [
        (("sgd", SignSGD), {}, ValueError, "exists already"),
        (("x", torch.nn.Linear), {}, TypeError, "Optimizer subclass"),
        (("", SignSGD), {}, TypeError, "non-empty string"),
        (("x", SignSGD), {"follows_momentum": True}, ValueError, "follows_momentum needs"),
        (("x", SignSGD), {"cost": 0}, ValueError, "Invalid cost"),
        (("x", SignSGD), {"lr_scale": -1}, ValueError, "Invalid lr_scale"),
        (("x", torch.optim.LBFGS), {}, ValueError, "needs a closure"),
    ],
)
def test_bad_registrations(args, kwargs, err, msg):
    before = dict(FAMILIES)
    with pytest.raises(err, match=msg):
        register_family(*args, **kwargs)
    assert FAMILIES == before


@pytest.fixture
def rmsprop():
    register_family("rmsprop", torch.optim.RMSprop)  # momentum and a bool flag (centered) of its own
    yield
    del FAMILIES["rmsprop"]


CHOICE_ERRORS = [  # resolve_choices, the check behind every optimizer's choices (and lr_control's base)
    ([("sgd", 3)], TypeError, "The options of choice 'sgd' must be a dict, got 3"),
    ({"s": "fast"}, TypeError, "The options of choice 's' must be a dict"),
    ([("sgd", {"momentum": 1.5})], ValueError, r"Invalid momentum value: 1.5 \(choice 'sgd'\)"),
    ([("sgd", {"momentum": 1.0})], ValueError, "Invalid momentum value: 1.0"),
    ([("sam", {"momentum": -0.5})], ValueError, r"Invalid momentum value: -0.5 \(choice 'sam'\)"),
    ([("sgd", {"momentum": float("nan")})], ValueError, "Invalid momentum value: nan"),
    ([("sgd", {"momentum": "0.9"})], TypeError, "Invalid momentum value: '0.9'"),
    ([("sgd", {"nesterov": "yes"})], TypeError, "nesterov for choice 'sgd' must be a bool"),
    ([("sgd", {"weight_decay": float("nan")})], ValueError, r"Invalid weight_decay value.*\(choice 'sgd'\)"),
    ([("sgd", {"weight_decay": "1e-4"})], TypeError, r"Invalid weight_decay value.*\(choice 'sgd'\)"),
    ([("sam", {"rho": float("inf")})], ValueError, "Invalid rho for choice 'sam'"),
    ([("sam", {"adaptive": "no"})], TypeError, "adaptive for choice 'sam' must be a bool"),
    ([("adam", {"betas": (0.9, 1.5)})], ValueError, "Invalid options for choice 'adam'.*beta"),
    ([("adam", {"eps": -1.0})], ValueError, "Invalid eps for choice 'adam'"),
    ([("adam", {"lr": "0.001"})], TypeError, "Invalid learning rate for choice 'adam'"),
    # a registered family: its own bool flags are checked too; its momentum need only be >= 0
    ([("rmsprop", {"centered": "no"})], TypeError, "centered for choice 'rmsprop' must be a bool"),
    ([("rmsprop", {"momentum": -0.1})], ValueError, "Invalid momentum value: -0.1"),
]


@pytest.mark.parametrize(
    "choices,err,msg", CHOICE_ERRORS, ids=[f"{i}-{e[2][:30]}" for i, e in enumerate(CHOICE_ERRORS)]
)
def test_bad_choice_options(choices, err, msg, rmsprop):
    with pytest.raises(err, match=msg):
        resolve_choices(choices, 0.1)


def test_momentum_of_a_registered_family_is_its_own(rmsprop):
    (spec,) = resolve_choices([("rmsprop", {"momentum": 1.5, "centered": True})], 0.1)
    assert spec.hparams == {"momentum": 1.5, "centered": True}


def test_unknown_option_of_a_registered_family(signsgd):
    with pytest.raises(TypeError, match="Unknown option"):
        RLSwitchingOptimizer(_model().parameters(), choices={"s": {"family": "signsgd", "momentum": 0.9}})


def test_a_registered_family_is_never_trusted_to_skip_fused(signsgd):
    # rlopt cannot know whether a user class's fused step honours found_inf: asking is an error,
    # and by default it runs with the host check
    with pytest.raises(ValueError, match="does not run family 'signsgd' fused"):
        RLSwitchingOptimizer(_model().parameters(), choices={"s": {"family": "signsgd", "fused": True}})
    model = _model()
    opt = RLSwitchingOptimizer(model.parameters(), choices={"s": {"family": "signsgd"}}, policy="constant:s")
    before = [p.clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(torch.full((2, 6), float("nan"))).sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # skipped


def test_checkpoint_of_another_family_under_the_same_name_is_refused(signsgd):
    a = RLSwitchingOptimizer(
        _model().parameters(), choices={"s": {"family": "signsgd"}, "t": {"family": "sgd"}}, policy="constant:s"
    )
    b = RLSwitchingOptimizer(
        _model().parameters(), choices={"s": {"family": "adam"}, "t": {"family": "sgd"}}, policy="constant:s"
    )
    with pytest.raises(ValueError, match="families"):
        b.load_state_dict(a.state_dict())
