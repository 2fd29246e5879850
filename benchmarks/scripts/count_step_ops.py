"""Operations one ``opt.step()`` dispatches on the overhead benchmark's ResNet-18, without training.

Counts with :class:`benchmarks.overhead.CountOps` around 400 calls of ``opt.step()`` on fixed
gradients (after 20 uncounted ones), for the plain fused SGD and the two wrapper configurations
of ``benchmarks/overhead.py``. ``--fold-every N`` sets the tracker's window fold as a GPU run
would use it; it lets a checkout whose CPU path folds at every step (before commit 790a870) be
counted on its GPU path. Run from the root of the checkout to count:

    PYTHONPATH=. python benchmarks/scripts/count_step_ops.py [--fold-every 8]
"""
import argparse

import torch
import torch.nn.functional as F

from benchmarks.overhead import CountOps, build, make_case

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--fold-every", type=int, default=0, help="tracker fold interval (0: the checkout's default)")
args = ap.parse_args()
for name in ["plain", "wrapper, interval=epoch", "wrapper, interval=50"]:
    model, x, y = make_case("resnet18", torch.device("cpu"), 2)
    opt = build(name, model)
    if name != "plain" and args.fold_every:
        opt.tracker._fold_arg = opt.tracker.fold_every = args.fold_every
    F.cross_entropy(model(x), y).backward()
    for _ in range(20):
        opt.step()
    with CountOps() as count:
        for _ in range(400):
            opt.step()
    per_step = count.per_step(400)
    print(f"{name}: {per_step['all']:.1f} operations per step, {per_step['not_views']:.1f} not views")
