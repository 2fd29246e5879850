"""Memory over a long run: RSS and ``state_dict`` size of RLSwitchingOptimizer deciding at every
step (``interval=1``) on a tiny model, sampled every ``--every`` steps. With the default
``history_size`` both stay flat once the history is full.

    python benchmarks/scripts/long_run_memory.py --steps 100000 --every 10000
"""

import argparse
import io
import resource
import time
import warnings

import torch
from torch import nn

from rlopt import RLSwitchingOptimizer


def rss_mib() -> float:
    with open("/proc/self/statm") as f:  # Linux: resident pages now (not the peak)
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="long_run_memory.py",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--steps", type=int, default=100_000, help="optimizer steps, one decision each")
    ap.add_argument("--every", type=int, default=10_000, help="steps between samples")
    ap.add_argument("--policy", default="random", help="the policy= argument")
    ap.add_argument("--history-size", type=int, default=1000, help="history_size (-1: keep all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    opt = RLSwitchingOptimizer(
        model.parameters(),
        choices=["sgd", "adam"],
        policy=args.policy,
        interval=1,
        history_size=None if args.history_size < 0 else args.history_size,
    )

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    start = time.perf_counter()
    print("step,rss_mib,state_dict_bytes,history,seconds")
    for step in range(1, args.steps + 1):
        opt.step(closure)
        if step % args.every == 0:
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            print(
                f"{step},{rss_mib():.1f},{buf.tell()},{len(opt.history)},{time.perf_counter() - start:.0f}", flush=True
            )


if __name__ == "__main__":
    main()
