"""Host cost of ``opt.step()`` alone on the CPU: plain fused SGD against RLSwitchingOptimizer over it.

The gradients are fixed, so nothing but the optimizer step is timed (median over rounds of 200 steps,
one thread). To compare two commits, run it with each checkout first on ``PYTHONPATH``:

    PYTHONPATH=/path/to/checkout python benchmarks/scripts/step_host_cost.py
"""
import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from rlopt import RLSwitchingOptimizer


def median_us(opt, rounds: int, steps: int = 200) -> float:
    loss = torch.tensor(1.0)
    for _ in range(steps):  # warm-up
        opt.step(lambda: loss)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            opt.step(lambda: loss)
        times.append((time.perf_counter() - t) / steps * 1e6)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(prog="step_host_cost.py", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds of 200 steps per optimizer")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # a closure that returns a constant loss is fine here
    plain = None
    for kind in ("plain", "epoch", 50):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        if kind == "plain":
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                  fused=True)
        else:
            opt = RLSwitchingOptimizer(model.parameters(), choices=["sgd"], policy="constant:sgd", lr=1e-3,
                                       interval=kind)
        name = "plain fused SGD" if kind == "plain" else f"wrapper, interval={kind}"
        us = median_us(opt, args.rounds)
        plain = us if kind == "plain" else plain
        print(f"{name}: median {us:.1f} us per step ({us / plain:.2f}x plain)")


if __name__ == "__main__":
    main()
