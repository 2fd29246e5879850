"""rlopt.SAM against a hand-written reference (davda54/sam style), and its edge cases."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import assert_state_equal, make_closure, make_data, make_model, roundtrip, two_groups
from torch import nn

from rlopt import SAM


class ReferenceSAM(torch.optim.Optimizer):
    """The widely copied davda54/sam, reduced to its algorithm (non-adaptive and adaptive)."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()

    def _grad_norm(self):
        return torch.norm(
            torch.stack(
                [
                    ((torch.abs(p) if group["adaptive"] else 1.0) * p.grad).norm(p=2)
                    for group in self.param_groups
                    for p in group["params"]
                    if p.grad is not None
                ]
            ),
            p=2,
        )

    def step(self, closure):
        loss = closure()
        self.first_step()
        closure()
        self.second_step()
        return loss


# One table of configurations: (id, base optimizer, SAM/base kwargs, grouped?)
CONFIGS = [
    ("sgd-momentum", torch.optim.SGD, dict(lr=0.1, momentum=0.9), False),
    ("sgd-nesterov-wd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4), False),
    ("sgd-rho0.2-groups", torch.optim.SGD, dict(lr=0.1, momentum=0.5, rho=0.2), True),
    ("adaptive", torch.optim.SGD, dict(lr=0.1, momentum=0.9, rho=0.5, adaptive=True), False),
    ("adam", torch.optim.Adam, dict(lr=1e-2), False),
    ("adamw-groups", torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), True),
]


def _build(cls, base, kwargs, grouped, seed=0):
    model = make_model(seed)
    params = two_groups(model) if grouped else model.parameters()
    return model, cls(params, base, **kwargs)


@pytest.mark.parametrize("name,base,kwargs,grouped", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference(name, base, kwargs, grouped):
    x, y = make_data()
    m_ref, ref = _build(ReferenceSAM, base, kwargs, grouped)
    m_sam, sam = _build(SAM, base, kwargs, grouped)
    # Bit for bit: both sides run the same operations in the same order. The perturbation is
    # (w^2 * g) * scale (w^2 as torch.pow(w, 2) computes it, w * w); the norm is each tensor's
    # vector norm (rlopt's _foreach_norm runs that kernel per tensor) and then the norm of the
    # stack; the base optimizer is the same class with the same options.
    for _ in range(10):
        l_ref = ref.step(make_closure(m_ref, ref, x, y))
        l_sam = sam.step(make_closure(m_sam, sam, x, y))
        assert torch.equal(l_ref, l_sam)
        for p, q in zip(m_ref.parameters(), m_sam.parameters()):
            assert torch.equal(p, q)
        assert_state_equal(ref.base_optimizer.state, sam.base_optimizer.state, exact=True)
    # The update really happened (the comparison is not vacuous).
    assert not torch.equal(m_sam[0].weight, make_model(0)[0].weight)


def test_phases_equal_step_and_closure_called_twice():
    x, y = make_data()
    m1, s1 = _build(SAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9), False)
    m2, s2 = _build(SAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9), False)
    calls = []
    closure = make_closure(m1, s1, x, y)

    def counting():
        calls.append(1)
        return closure()

    for _ in range(3):
        first = s1.step(counting)
        # the same by hand, through the public phases
        s2.zero_grad()
        loss = nn.functional.cross_entropy(m2(x), y)
        loss.backward()
        s2.first_step(zero_grad=True)
        nn.functional.cross_entropy(m2(x), y).backward()
        s2.second_step(zero_grad=True)
        assert torch.equal(first, loss)  # step returns the first loss
    assert len(calls) == 6
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_restore_is_bit_exact_and_survives_failing_second_pass():
    x, y = make_data()
    model, sam = _build(SAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9, rho=0.3), False)
    before = [p.detach().clone() for p in model.parameters()]
    good = make_closure(model, sam, x, y)
    n = [0]

    def failing():
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt("second pass dies")
        return good()

    with pytest.raises(KeyboardInterrupt):
        sam.step(failing)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    sam.restore()  # nothing is left to restore: a no-op
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_after_an_interrupted_one_equals_a_fresh_one(adaptive):
    """A first_step not followed by restore() is undone before the next one measures anything."""
    x, y = make_data()
    (m1, s1), (m2, s2) = (
        _build(SAM, torch.optim.SGD, dict(lr=0.1, adaptive=adaptive, rho=0.5), False) for _ in range(2)
    )
    for model, sam in ((m1, s1), (m2, s2)):
        make_closure(model, sam, x, y)()
    s1.first_step()  # interrupted: no restore, gradients kept
    s1.first_step()
    s2.first_step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_closure_required():
    model, sam = _build(SAM, torch.optim.SGD, dict(lr=0.1), False)
    with pytest.raises(RuntimeError, match="needs a closure"):
        sam.step()


def test_grad_none_and_zero_size_params():
    x, y = make_data()
    model = make_model()
    model[0].requires_grad_(False)  # frozen layer: grad stays None
    empty = nn.Parameter(torch.zeros(0, 3))
    unused = nn.Parameter(torch.ones(2))  # never receives a gradient
    sam = SAM([*model.parameters(), empty, unused], torch.optim.SGD, lr=0.1, momentum=0.9)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    w = model[2].weight.detach().clone()
    for _ in range(3):
        sam.step(make_closure(model, sam, x, y))
    for p, f in zip(model[0].parameters(), frozen):
        assert torch.equal(p, f) and p.grad is None
    assert torch.equal(unused, torch.ones(2)) and unused.grad is None
    assert empty.shape == (0, 3)
    assert not torch.equal(model[2].weight, w)


@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "pickle"])
def test_checkpoint_keeps_base_state(how):
    """davda54's SAM loses the base optimizer's state in all three; ours must not."""
    x, y = make_data()
    model, sam = _build(SAM, torch.optim.SGD, dict(lr=0.1, momentum=0.9), False)
    for _ in range(3):
        sam.step(make_closure(model, sam, x, y))
    if how == "state_dict":
        model2 = copy.deepcopy(model)
        sam2 = SAM(model2.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        sam2.load_state_dict(roundtrip(sam.state_dict()))
    elif how == "deepcopy":
        model2, sam2 = copy.deepcopy((model, sam))
    else:
        model2, sam2 = pickle.loads(pickle.dumps((model, sam)))
    assert sam2.param_groups is sam2.base_optimizer.param_groups
    assert sam2.param_groups[0]["params"][0] is next(model2.parameters())
    assert sam2.base_optimizer.state[next(model2.parameters())]["momentum_buffer"] is not None
    for _ in range(4):
        sam.step(make_closure(model, sam, x, y))
        sam2.step(make_closure(model2, sam2, x, y))
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, q)


def test_scheduler_reaches_base_and_add_param_group():
    model = make_model()
    sam = SAM(model[0].parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    sam.add_param_group({"params": model[2].parameters(), "lr": 0.02})
    x, y = make_data()
    sam.step(make_closure(model, sam, x, y))
    sched.step()
    assert [g["lr"] for g in sam.base_optimizer.param_groups] == [0.05, 0.01]
    assert sam.base_optimizer.param_groups[1]["rho"] == 0.05  # SAM's defaults fill the new group
    assert len(sam.base_optimizer.state) == 4


ERRORS = [
    (dict(rho=-0.1), ValueError, "Invalid rho"),
    (dict(rho=float("nan")), ValueError, "Invalid rho"),
    (dict(rho=float("inf")), ValueError, "Invalid rho"),
    (dict(base_optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), TypeError, "base_optimizer"),
    (dict(base_optimizer=dict), TypeError, "base_optimizer"),
    (dict(lr=-0.1), ValueError, "Invalid learning rate"),
    (dict(lr=float("nan")), ValueError, "Invalid learning rate"),
    (dict(momentum=-0.5), ValueError, "Invalid momentum"),
    (dict(rho="a"), TypeError, "Invalid rho: a"),
    (dict(rho=None), TypeError, "Invalid rho"),
    (dict(rho=True), TypeError, "Invalid rho"),
    (dict(rho=torch.tensor(float("nan"))), ValueError, "Invalid rho: nan"),
    (dict(rho=torch.tensor(-0.1)), ValueError, "Invalid rho"),
    (dict(rho=torch.tensor([0.05, 0.1])), ValueError, "Invalid rho"),
    (dict(adaptive="no"), TypeError, "adaptive must be a bool"),
    (dict(adaptive=1), TypeError, "adaptive must be a bool"),
    (dict(adaptive=None), TypeError, "adaptive must be a bool"),
    (dict(lr=torch.tensor(float("nan"))), ValueError, "Invalid learning rate"),
]


@pytest.mark.parametrize("kwargs,err,msg", ERRORS, ids=[str(e[0])[:40] for e in ERRORS])
def test_bad_inputs(kwargs, err, msg):
    kwargs = dict(kwargs)
    base = kwargs.pop("base_optimizer", torch.optim.SGD)
    model = make_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(err, match=msg):
        SAM(model.parameters(), base, **{"lr": 0.1, **kwargs})
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_rho_of_any_real_type_is_accepted():
    for rho in (torch.tensor(0.05), 0, 1, np.float32(0.05), np.float64(0.05)):
        sam = SAM(make_model().parameters(), rho=rho, lr=0.1)
        assert sam.param_groups[0]["rho"] is rho and sam.param_groups[0]["adaptive"] is False


@pytest.mark.parametrize("adaptive", [False, True])
def test_first_step_with_found_inf_flag(adaptive):
    """found_inf=0: the same perturbation as without the flag, bit for bit (channels_last conv
    weights and a second dtype included); found_inf=1 or a non-finite gradient: finite weights,
    and with the flag set, w itself."""

    def build():
        with torch.random.fork_rng(devices=[]):  # the tests leave the global RNG alone
            torch.manual_seed(0)
            m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
        m.to(memory_format=torch.channels_last)
        m[2].double()
        return m, SAM(m.parameters(), torch.optim.SGD, adaptive=adaptive, lr=0.1, momentum=0.9)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 6, 6, generator=gen).contiguous(memory_format=torch.channels_last)

    def grads(m):
        m.zero_grad()
        out = m[2](m[1](m[0](x)).double())
        out.square().mean().backward()

    (m1, s1), (m2, s2) = build(), build()
    assert m1[0].weight.is_contiguous(memory_format=torch.channels_last)
    grads(m1), grads(m2)
    s1.first_step()
    s2.first_step(found_inf=torch.zeros(()))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    s1.restore(), s2.restore()
    w = [p.detach().clone() for p in m2.parameters()]
    s2.first_step(found_inf=torch.ones(()))  # a skipped step: the weights stay at w
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), w))
    s2.restore()
    m2[0].weight.grad[0, 0, 0, 0] = float("nan")  # not flagged: finite weights all the same
    m2[2].weight.grad[0, 0] = float("inf")
    s2.first_step(found_inf=torch.zeros(()))
    assert all(bool(torch.isfinite(p).all()) for p in m2.parameters())
    s2.restore()
    assert all(torch.equal(p, q) for p, q in zip(m2.parameters(), w))


def test_sparse_gradients_are_refused_clearly():
    with torch.random.fork_rng(devices=[]):
        emb = nn.Embedding(5, 3, sparse=True)
    sam = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        sam.zero_grad()
        loss = emb(torch.tensor([0, 2])).sum()
        loss.backward()
        return loss

    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="SAM does not support sparse gradients"):
        sam.step(closure)
    assert torch.equal(emb.weight, before)


def test_hooks_run_once_per_step_and_around_the_state_dict():
    model = make_model()
    sam = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    calls = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append(type(o).__name__)),
        sam.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post")),
        sam.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-pre")),
    ]
    try:
        x, y = make_data()
        sam.step(make_closure(model, sam, x, y))
        assert calls == ["SAM"]  # the base SGD's step does not fire the global hooks again
        sam.load_state_dict(sam.state_dict())
        assert calls == ["SAM", "sd-post", "load-pre"]
    finally:
        for h in handles:
            h.remove()
