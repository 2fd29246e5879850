"""Host cost of ``opt.step()`` alone on the CPU: plain fused SGD against RLSwitchingOptimizer over it.

The gradients are fixed, so nothing but the optimizer step is timed: in each round, 200 steps of each
optimizer in turn, one thread, timed as the CPU time of that thread (what the step costs the host,
and steadier than wall time on a machine shared with other jobs); the figures are medians over the
rounds, the ratios per round then median. To compare two commits, run it with each checkout first on ``PYTHONPATH``:

    PYTHONPATH=/path/to/checkout python benchmarks/scripts/step_host_cost.py
"""

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from rlopt import RLSwitchingOptimizer


def build(kind):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)])
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    if kind == "plain":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)
    return RLSwitchingOptimizer(model.parameters(), choices=["sgd"], policy="constant:sgd", lr=1e-3, interval=kind)


def time_us(opt, steps: int) -> float:
    loss = torch.tensor(1.0)
    t = time.thread_time()
    for _ in range(steps):
        opt.step(lambda: loss)
    return (time.thread_time() - t) / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="step_host_cost.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--rounds", type=int, default=15, help="timed rounds of --steps steps per optimizer")
    ap.add_argument("--steps", type=int, default=200, help="steps per optimizer and round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # a closure that returns a constant loss is fine here
    kinds = ("plain", "epoch", 50)
    opts = {kind: build(kind) for kind in kinds}
    for opt in opts.values():  # warm-up
        time_us(opt, args.steps)
    times = {kind: [] for kind in kinds}
    for _ in range(args.rounds):  # the three in turn in every round: a load change hits all three
        for kind in kinds:
            times[kind].append(time_us(opts[kind], args.steps))
    for kind in kinds:
        name = "plain fused SGD" if kind == "plain" else f"wrapper, interval={kind}"
        ratio = statistics.median(a / b for a, b in zip(times[kind], times["plain"]))
        print(
            f"{name}: median {statistics.median(times[kind]):.1f} us per step "
            f"(median ratio to plain over rounds {ratio:.2f}x)"
        )


if __name__ == "__main__":
    main()
