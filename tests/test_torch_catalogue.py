"""rlopt's optimizers against torch's own catalogue of optimizer inputs.

Every torch wheel ships ``torch.testing._internal.common_optimizers``: for each optimizer an
``OptimizerInfo`` whose ``optim_inputs_func`` lists the keyword arguments torch tests it with
and whose ``optim_error_inputs_func`` lists inputs that must fail, with the error. For SGD, Adam
and AdamW, rlopt's switching optimizer (a constant policy on that choice) and its learning-rate
optimizer (the ``keep`` action) must step as torch does for every listed input, and raise the
same error type for every listed error input. The catalogue is imported, not copied; a torch
without it (or without its test dependency ``expecttest``) skips this module.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import make_data, make_model

from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer

catalogue = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="this torch has no optimizer catalogue (or lacks expecttest)"
)
INFOS = {
    info.optim_cls.__name__: info
    for info in catalogue.optim_db
    if info.optim_cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
}
FAMILY = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}
_WRAPPER = ("maximize", "foreach", "fused", "differentiable", "capturable")


def _inputs(name):
    return [(name, i.kwargs, i.desc) for i in INFOS[name].optim_inputs_func(device="cpu")]


CASES = [c for name in sorted(INFOS) for c in _inputs(name)]


def _switching(params, name, kwargs):
    """rlopt with a constant policy on ``name``'s family, configured as torch is by ``kwargs``."""
    family = FAMILY[name]
    kw = dict(kwargs)
    lr = kw.pop("lr", INFOS[name].optim_cls([torch.zeros(1, requires_grad=True)]).defaults["lr"])
    wrapper = {k: kw.pop(k) for k in _WRAPPER if k in kw}
    if family == "sgd":
        wrapper["momentum"] = kw.pop("momentum", 0.0)
        wrapper["weight_decay"] = kw.pop("weight_decay", 0.0)
        choice = kw
    else:
        choice = {"lr_scale": 1.0, **kw}
    return RLSwitchingOptimizer(
        params, choices={family: choice}, policy=f"constant:{family}", lr=lr, interval=3, **wrapper
    )


def _lr_control(params, name, kwargs):
    family = FAMILY[name]
    kw = dict(kwargs)
    lr = kw.pop("lr", INFOS[name].optim_cls([torch.zeros(1, requires_grad=True)]).defaults["lr"])
    for key in _WRAPPER:
        kw.pop(key, None)
    momentum = kw.pop("momentum", 0.0)
    if kwargs.get("maximize"):
        kw["maximize"] = True
    return QLearningRateOptimizer(
        params, base=(family, kw), lr=lr, momentum=momentum, policy="constant:lr:keep", interval=3
    )


def _run(model, opt, steps=6):
    x, y = make_data()
    out = []
    for _ in range(steps):

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        out.append(opt.step(closure).detach().clone())
    return out


@pytest.mark.parametrize("build", [_switching, _lr_control], ids=["switching", "lr-control"])
@pytest.mark.parametrize("name,kwargs,desc", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_steps_as_torch_for_every_catalogued_input(build, name, kwargs, desc):
    """Against torch's default kernel (for-loop on the CPU) within float32 tolerances (another
    kernel, other roundings); against torch's fused kernel, which rlopt runs here, bit for bit."""
    m_rl, m_ref, m_fused = make_model(), make_model(), make_model()
    opt = build(list(m_rl.parameters()), name, kwargs)
    ref = INFOS[name].optim_cls(m_ref.parameters(), **kwargs)
    losses, ref_losses = _run(m_rl, opt), _run(m_ref, ref)
    torch.testing.assert_close(losses, ref_losses)
    for p, q in zip(m_rl.parameters(), m_ref.parameters()):
        torch.testing.assert_close(p, q)
    if kwargs.get("foreach") or kwargs.get("differentiable"):
        return
    fused = INFOS[name].optim_cls(m_fused.parameters(), **{**kwargs, "fused": True})
    fused_losses = _run(m_fused, fused)
    assert all(torch.equal(a, b) for a, b in zip(losses, fused_losses))  # the same fused kernel
    for p, q in zip(m_rl.parameters(), m_fused.parameters()):
        assert torch.equal(p, q)


ERRORS = [
    (name, e)
    for name in sorted(INFOS)
    for e in INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    if e.error_on == catalogue.OptimizerErrorEnum.CONSTRUCTION_ERROR
]


@pytest.mark.parametrize("name,error", ERRORS, ids=[f"{n}-{e.optimizer_error_input.desc}" for n, e in ERRORS])
def test_refuses_what_torch_refuses(name, error):
    """Each construction error torch lists for SGD/Adam/AdamW: rlopt raises (or warns) the same
    type, with a message that matches torch's."""
    given = error.optimizer_error_input
    params = given.params if given.params is not None else list(make_model().parameters())
    if error.error_type is UserWarning or issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            _switching(params, name, given.kwargs)
        return
    with pytest.raises(error.error_type) as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _switching(params, name, given.kwargs)
    assert re.search(error.error_regex, str(info.value)), (error.error_regex, str(info.value))


KINDS = {
    "non-contiguous": lambda: torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).t(),
    "complex": lambda: torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(1)),
    "zero-size": lambda: torch.zeros(0, 3),
    "float64": lambda: torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
}


@pytest.mark.parametrize("family", ["sgd", "adam", "adamw", "sam"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_parameters_of_every_kind(kind, family):
    """Non-contiguous views, complex, zero-size and mixed-dtype parameters step as torch steps
    them (with torch's default kernel: rlopt falls back from fused where torch's fused kernels would
    be wrong or refuse, and warns that it does)."""
    base = KINDS[kind]()
    assert kind != "non-contiguous" or not base.is_contiguous()
    target = torch.randn(base.shape, generator=torch.Generator().manual_seed(2)).to(base.dtype)
    extra = torch.randn(3, generator=torch.Generator().manual_seed(3))  # a float32 parameter beside it

    def make():
        return [torch.nn.Parameter(base.clone()), torch.nn.Parameter(extra.clone())]

    def loss_of(params):
        p, q = params
        return (p - target).abs().pow(2).sum() + (q**2).sum()

    ours, theirs = make(), make()
    assert ours[0].stride() == base.stride()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "runs without fused kernels" where it falls back
        opt = RLSwitchingOptimizer(ours, choices=[family], policy=f"constant:{family}", lr=0.1, momentum=0.9)
    if family == "sam":
        from test_sam import ReferenceSAM

        ref = ReferenceSAM(theirs, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    elif family == "sgd":
        ref = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    else:
        ref = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[family](theirs, lr=1e-3)

    def closure_for(o, ps):
        def closure():
            o.zero_grad()
            loss = loss_of(ps)
            loss.backward()
            return loss

        return closure

    for _ in range(4):
        opt.step(closure_for(opt, ours))
        if family == "sam":
            ref.step(closure_for(ref, theirs))
        else:
            closure_for(ref, theirs)()
            ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q)  # float32 tolerances: rlopt's kernel may differ from torch's default
    if base.numel():
        assert not torch.equal(ours[0], base)  # it moved
