"""Host work per ordinary step.

On a GPU a ResNet-sized training step is often bound by the host launching kernels, so every
operation the wrapper adds to a step shows in the step time (issue 2's overhead bars). Wall
clocks are too noisy for CI; the number of operations torch dispatches per step is exact.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from benchmarks.overhead import VIEW_OPS, CountOps
from rlopt import RLSwitchingOptimizer

SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def _params(n=8):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


# steps without a closure on purpose: the count is of the bare step
pytestmark = pytest.mark.filterwarnings("ignore:None of the last")


def _ops_per_step(opt, steps=320):
    for _ in range(40):  # past the first fold and probe
        opt.step()
    with CountOps() as count:
        for _ in range(steps):
            opt.step()
    return {k: v / steps for k, v in count.ops.items()}


@pytest.mark.parametrize("interval", ["epoch", 50])
def test_wrapper_adds_few_operations_per_step(interval):
    plain = _ops_per_step(torch.optim.SGD(_params(), **SGD, fused=True))
    opt = RLSwitchingOptimizer(
        _params(),
        choices={"sgd": dict(nesterov=True, weight_decay=5e-4)},
        policy="constant:sgd",
        interval=interval,
        lr=0.1,
        momentum=0.9,
    )
    wrapped = _ops_per_step(opt)
    views = VIEW_OPS
    extra = sum(wrapped.values()) - sum(plain.values())
    extra_kernels = extra - sum(wrapped.get(v, 0) for v in views) + sum(plain.get(v, 0) for v in views)
    # Measured when written: 4.8 (interval epoch) and 5.6 (every 50 steps, decisions included)
    # operations per step that are not views: the non-finite check, the CPU's exact read of the
    # skip flag, and the gradient probe and window fold shared out over the steps. The code before
    # (692b0e5) added 30 on the CPU, where it folded at every step, and 13 on its GPU path.
    assert wrapped["aten._fused_sgd_.default"] == 1.0
    assert wrapped["aten._amp_foreach_non_finite_check_and_unscale_.default"] == 1.0
    bound = 5.0 if interval == "epoch" else 6.0
    assert extra_kernels <= bound, sorted(wrapped.items(), key=lambda kv: -kv[1])[:12]
    assert extra <= bound + 3.0, sorted(wrapped.items(), key=lambda kv: -kv[1])[:12]
    # one profiler range per user step, as for the plain optimizer: the inner step is called bare
    assert (
        wrapped["profiler._record_function_enter_new.default"]
        == plain["profiler._record_function_enter_new.default"]
        == 1.0
    )


def test_global_step_hooks_see_one_call_per_user_step():
    calls = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(type(opt).__name__))
    try:
        model = torch.nn.Linear(3, 2)
        opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="constant:adam")
        for _ in range(3):
            opt.zero_grad()
            model(torch.ones(4, 3)).sum().backward()
            opt.step()
    finally:
        handle.remove()
    assert calls == ["RLSwitchingOptimizer"] * 3
