"""Operations one ``opt.step()`` dispatches on the overhead benchmark's ResNet-18, without training.

Counts with :class:`benchmarks.overhead.CountOps` around 400 calls of ``opt.step()`` on fixed
gradients (after 20 uncounted ones), for the plain fused SGD and the two wrapper configurations
of ``benchmarks/overhead.py``. ``--fold-every N`` sets the tracker's window fold as a GPU run
would use it; it lets a checkout whose CPU path folds at every step (before commit 790a870) be
counted on its GPU path. ``--training-step`` counts instead one whole step of the benchmarks'
training loop with plain fused SGD (augmentation, normalisation, forward, loss, backward, step) and
its parts, on a batch of 4. Run from the root of the checkout to count:

    PYTHONPATH=. python benchmarks/scripts/count_step_ops.py [--fold-every 8 | --training-step]
"""

import argparse

import torch
import torch.nn.functional as F

from benchmarks.cli import HelpFormatter
from benchmarks.overhead import CountOps, build, make_case


def training_step() -> None:
    from benchmarks.data import augment_crop_flip, normalize

    model, _, _ = make_case("resnet18", torch.device("cpu"), 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (4,))
    mean, std, gen = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), torch.Generator().manual_seed(0)

    def step():
        xin = normalize(augment_crop_flip(x, 4, True, gen), mean, std)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(xin).float(), y).backward()
        opt.step()

    parts = {
        "whole step": step,
        "augmentation": lambda: augment_crop_flip(x, 4, True, gen),
        "normalisation": lambda: normalize(x, mean, std),
        "forward": lambda: model(normalize(x, mean, std)),
    }
    step()  # the optimizer's state and the crop grids exist before counting
    for name, fn in parts.items():
        with CountOps() as count:
            fn()
        n = count.per_step(1)
        print(f"{name}: {n['all']:.0f} operations, {n['not_views']:.0f} not views")


ap = argparse.ArgumentParser(
    prog="count_step_ops.py", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
)
ap.add_argument(
    "--fold-every", type=int, default=0, help="tracker fold interval; 0 keeps the checkout's own (default: 0)"
)
ap.add_argument(
    "--training-step",
    action="store_true",
    help="count one step of the benchmarks' training loop instead of opt.step() alone",
)
args = ap.parse_args()
if args.training_step:
    training_step()
    raise SystemExit
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
