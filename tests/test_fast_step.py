"""The thin path of an ordinary step: torch's fused SGD kernel called directly must give what
``SGD(fused=True).step()`` gives, bit for bit, and step aside wherever that is not certain."""

from __future__ import annotations

import copy

import pytest
import torch

from rlopt.control.torch_compat import copy_into, fused_sgd_step


def _pair(groups_kw, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 3, 2), (1,)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    groups = [{"params": ps[:2], **groups_kw[0]}, {"params": ps[2:], **groups_kw[-1]}]
    ref_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ref_groups = [{**g, "params": ref_ps[:2] if k == 0 else ref_ps[2:]} for k, g in enumerate(groups)]
    return (torch.optim.SGD(groups, lr=0.1, fused=True), ps), (torch.optim.SGD(ref_groups, lr=0.1, fused=True), ref_ps)


@pytest.mark.parametrize(
    "kw",
    [
        [{"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}],
        [{"momentum": 0.5, "dampening": 0.3}, {"momentum": 0.9, "maximize": True}],
        [{"momentum": 0.0, "weight_decay": 1e-2}],
    ],
)
def test_bit_identical_to_torch_fused_sgd_including_skipped_steps(kw):
    (opt, ps), (ref, ref_ps) = _pair(kw)
    gen = torch.Generator().manual_seed(1)
    taken = 0
    for step in range(12):
        grads = [torch.randn(p.shape, generator=gen) for p in ps]
        bad = step in (4, 7)
        flag = torch.tensor(1.0 if bad else 0.0)
        for p, r, g in zip(ps, ref_ps, grads):
            p.grad, r.grad = g.clone(), g.clone()
        ref.found_inf = flag
        ref.step()
        opt.found_inf = None
        if fused_sgd_step(opt, flag):
            assert step > 0 or kw[0].get("momentum", 0) == 0  # a first step with momentum makes the buffers
            taken += 1
        else:  # what the optimizers do then
            opt.found_inf = flag
            opt.step()
            opt.found_inf = None
        for p, r in zip(ps, ref_ps):
            assert torch.equal(p, r)
        for p, r in zip(ps, ref_ps):
            assert torch.equal(
                opt.state[p].get("momentum_buffer", torch.zeros(0)), ref.state[r].get("momentum_buffer", torch.zeros(0))
            )
    assert taken >= 11  # every step after the first


def test_steps_aside_where_the_result_is_not_certain():
    (opt, ps), _ = _pair([{"momentum": 0.9}])
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    flag = torch.zeros(())
    assert fused_sgd_step(opt, flag)
    ps[1].grad = None  # a parameter without a gradient: torch leaves it out, so do we (by not running)
    assert not fused_sgd_step(opt, flag)
    ps[1].grad = torch.ones_like(ps[1])
    opt.param_groups[0]["lr"] = torch.tensor(0.1)  # a tensor lr
    assert not fused_sgd_step(opt, flag)
    opt.param_groups[0]["lr"] = 0.1
    handle = opt.register_step_pre_hook(lambda *a: None)  # a hooked step
    assert not fused_sgd_step(opt, flag)
    handle.remove()
    original = torch.optim.SGD.step
    try:  # a step patched on the class
        torch.optim.SGD.step = lambda self, closure=None: None
        assert not fused_sgd_step(opt, flag)
    finally:
        torch.optim.SGD.step = original
    assert fused_sgd_step(opt, flag)
    sub = type("MySGD", (torch.optim.SGD,), {})(ps, lr=0.1, momentum=0.9, fused=True)
    sub.step()
    assert not fused_sgd_step(sub, flag)  # a subclass may change the step


def test_reloaded_state_is_used_not_the_old_buffers():
    (opt, ps), (ref, ref_ps) = _pair([{"momentum": 0.9}])
    for p, r in zip(ps, ref_ps):
        p.grad, r.grad = torch.ones_like(p), torch.ones_like(r)
    opt.step(), ref.step()
    flag = torch.zeros(())
    assert fused_sgd_step(opt, flag)
    ref.step()
    old = [opt.state[p]["momentum_buffer"] for p in ps]
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # new state entries, new buffers
    for buf in old:
        buf.fill_(123.0)  # the old buffers must no longer be read
    assert fused_sgd_step(opt, flag)
    ref.step()
    for p, r in zip(ps, ref_ps):
        assert torch.equal(p, r)


def test_copy_into_copies_across_dtypes():
    dst = [torch.empty(3), torch.empty(2, 2)]
    src = [torch.arange(3, dtype=torch.float16), torch.ones(2, 2, dtype=torch.bfloat16)]
    copy_into(dst, src)
    assert torch.equal(dst[0], torch.arange(3.0)) and torch.equal(dst[1], torch.ones(2, 2))
