"""The meta-training task distribution of the learned rule: small deterministic problems.

A :class:`Task` is a loss over a list of parameter tensors, written functionally so that a
population of optimizers can run on it at once under ``torch.func.vmap``::

    task = sample_task("mlp", seed=3, data=fmnist)   # or TaskDistribution(...).sample(generator)
    params = task.init()                               # list of tensors, seeded by the task
    loss = task.loss(params)                           # full batch: the same data at every step

Families (``FAMILIES``); the first four are the meta-training families, the rest are held out:

* ``quadratic``: ``0.5 (x - x*)^T A (x - x*) / d`` with a random rotation, eigenvalues
  log-uniform over a random condition number in [1, 1e3] and a random overall scale, d in 10..40.
* ``rosenbrock``: the chained Rosenbrock function in 2..6 dimensions, ``b`` in [10, 100].
* ``logistic``: logistic regression on 256 Gaussian points labelled by a noisy random hyperplane.
* ``mlp``: a one-hidden-layer ReLU MLP (16 or 32 units) on 256 images of the Fashion-MNIST subset
  (average-pooled to 14x14), or, without data, on a random-teacher classification problem.
* held out: ``mlp_deep`` (three tanh hidden layers, same data) and ``cnn`` (two strided 3x3
  convolutions, global average pooling, a linear head; 14x14 images or teacher images).

The library does not know where data lives: pass the images as ``data`` (see
:func:`load_fmnist`), or leave it ``None`` for the synthetic teacher. Weight-rescaling
augmentation (:class:`Rescaled`) multiplies each parameter tensor by a random factor ``c`` and
evaluates the loss at ``w / c``: the same problem in other units, so a rule cannot rely on one
parameter scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.nn import functional as F

__all__ = [
    "Task",
    "Rescaled",
    "FAMILIES",
    "TRAIN_FAMILIES",
    "HELDOUT_FAMILIES",
    "sample_task",
    "TaskDistribution",
    "load_fmnist",
]

TRAIN_FAMILIES = ("quadratic", "rosenbrock", "logistic", "mlp")
HELDOUT_FAMILIES = ("mlp_deep", "cnn")
FAMILIES = TRAIN_FAMILIES + HELDOUT_FAMILIES
Data = Optional[tuple[torch.Tensor, torch.Tensor]]  # (images, labels) as load_fmnist returns them; None: a teacher


@dataclass
class Task:
    """A deterministic loss over a list of parameter tensors, with its seeded initial point."""

    name: str
    family: str
    init_params: list[torch.Tensor]
    loss_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor]

    def init(self) -> list[torch.Tensor]:
        return [p.clone() for p in self.init_params]

    def loss(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.loss_fn(params)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.init_params)


def Rescaled(task: Task, generator: torch.Generator, max_factor: float = 10.0) -> Task:
    """Weight-rescaling augmentation: parameter ``i`` is stored as ``c_i w_i`` with ``log c_i``
    uniform in ``[-log max_factor, log max_factor]``; the loss is the original one at ``w_i``."""
    logs = (torch.rand(len(task.init_params), generator=generator) * 2 - 1) * math.log(max_factor)
    scales = [float(math.exp(s)) for s in logs]
    inner = task.loss_fn

    def loss(params: Sequence[torch.Tensor]) -> torch.Tensor:
        return inner([p / c for p, c in zip(params, scales)])

    return Task(task.name + "+rescaled", task.family, [p * c for p, c in zip(task.init_params, scales)], loss)


def load_fmnist(path: str, pool: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images of an ``.npz`` Fashion-MNIST file (``train_x``, ``train_y``) as
    ``(images [N, 1, 28/pool, 28/pool] standardised, labels [N])``; stays on the CPU."""
    import numpy as np

    with np.load(path) as d:
        x = torch.from_numpy(d["train_x"].astype("float32") / 255.0)
        y = torch.from_numpy(d["train_y"].astype("int64"))
    if x.dim() == 3:
        x = x[:, None]
    if pool > 1:
        x = F.avg_pool2d(x, pool)
    x = (x - x.mean()) / x.std()
    return x, y


# --------------------------------------------------------------------------- families
def _quadratic(g: torch.Generator) -> Task:
    d = int(torch.randint(10, 41, (1,), generator=g))
    cond = 10 ** (3 * float(torch.rand(1, generator=g)))
    scale = 10 ** (2 * float(torch.rand(1, generator=g)) - 1)
    eig = scale * cond ** torch.linspace(0, -1, d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    a = (q * eig) @ q.t()
    target = torch.randn(d, generator=g)
    x0 = torch.randn(d, generator=g)

    def loss(params: Sequence[torch.Tensor]) -> torch.Tensor:
        e = params[0] - target
        return 0.5 * (e @ (a @ e)) / d

    return Task(f"quadratic-d{d}", "quadratic", [x0], loss)


def _rosenbrock(g: torch.Generator) -> Task:
    d = int(torch.randint(2, 7, (1,), generator=g))
    b = 10 + 90 * float(torch.rand(1, generator=g))
    x0 = torch.randn(d, generator=g) * 0.5 - 0.5

    def loss(params: Sequence[torch.Tensor]) -> torch.Tensor:
        x = params[0]
        return ((1 - x[:-1]) ** 2 + b * (x[1:] - x[:-1] ** 2) ** 2).sum() / (d - 1)

    return Task(f"rosenbrock-d{d}", "rosenbrock", [x0], loss)


def _logistic(g: torch.Generator) -> Task:
    d = int(torch.randint(10, 51, (1,), generator=g))
    n = 256
    x = torch.randn(n, d, generator=g)
    w_true = torch.randn(d, generator=g)
    y = ((x @ w_true) / math.sqrt(d) + 0.3 * torch.randn(n, generator=g) > 0).float()
    w0 = torch.zeros(d)
    b0 = torch.zeros(1)

    def loss(params: Sequence[torch.Tensor]) -> torch.Tensor:
        w, b = params
        return F.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-3 * (w * w).sum()

    return Task(f"logistic-d{d}", "logistic", [w0, b0], loss)


def _classification_data(g: torch.Generator, data: Data, n: int, image: bool) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` samples: from ``data`` (images, labels) where given, else a random teacher."""
    if data is not None:
        images, labels = data
        idx = torch.randperm(images.shape[0], generator=g)[:n]
        x, y = images[idx], labels[idx]
        return (x if image else x.flatten(1)), y, "fmnist"
    side = 14
    x = torch.randn(n, 1, side, side, generator=g) if image else torch.randn(n, 32, generator=g)
    flat = x.flatten(1)
    w1 = torch.randn(flat.shape[1], 32, generator=g) / math.sqrt(flat.shape[1])
    w2 = torch.randn(32, 10, generator=g) / math.sqrt(32)
    y = (torch.tanh(flat @ w1) @ w2).argmax(1)
    return x, y, "teacher"


def _linear_init(g: torch.Generator, fan_in: int, fan_out: int) -> list[torch.Tensor]:
    w = torch.randn(fan_in, fan_out, generator=g) * math.sqrt(2.0 / fan_in)
    return [w, torch.zeros(fan_out)]


def _mlp(g: torch.Generator, data: Data = None, deep: bool = False) -> Task:
    x, y, src = _classification_data(g, data, 256, image=False)
    width = 16 if deep else int(16 * 2 ** int(torch.randint(0, 2, (1,), generator=g)))
    sizes = [x.shape[1]] + [width] * (3 if deep else 1) + [10]
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        params += _linear_init(g, a, b)
    act = torch.tanh if deep else torch.relu

    def loss(ps: Sequence[torch.Tensor]) -> torch.Tensor:
        h = x
        for i in range(0, len(ps) - 2, 2):
            h = act(h @ ps[i] + ps[i + 1])
        return F.cross_entropy(h @ ps[-2] + ps[-1], y)

    family = "mlp_deep" if deep else "mlp"
    return Task(f"{family}-{src}-w{width}", family, params, loss)


def _cnn(g: torch.Generator, data: Data = None) -> Task:
    x, y, src = _classification_data(g, data, 256, image=True)
    c1, c2 = 8, 16
    params = [
        torch.randn(c1, 1, 3, 3, generator=g) * math.sqrt(2.0 / 9),
        torch.zeros(c1),
        torch.randn(c2, c1, 3, 3, generator=g) * math.sqrt(2.0 / (9 * c1)),
        torch.zeros(c2),
        *_linear_init(g, c2, 10),
    ]

    def loss(ps: Sequence[torch.Tensor]) -> torch.Tensor:
        h = torch.relu(F.conv2d(x, ps[0], ps[1], stride=2, padding=1))
        h = torch.relu(F.conv2d(h, ps[2], ps[3], stride=2, padding=1))
        return F.cross_entropy(h.mean((2, 3)) @ ps[4] + ps[5], y)

    return Task(f"cnn-{src}", "cnn", params, loss)


_BUILDERS: dict[str, Callable[[torch.Generator, Data], Task]] = {
    "quadratic": lambda g, data: _quadratic(g),
    "rosenbrock": lambda g, data: _rosenbrock(g),
    "logistic": lambda g, data: _logistic(g),
    "mlp": lambda g, data: _mlp(g, data),
    "mlp_deep": lambda g, data: _mlp(g, data, deep=True),
    "cnn": lambda g, data: _cnn(g, data),
}


def sample_task(family: str, seed: int, data: Data = None, rescale: float = 1.0) -> Task:
    """The task of ``family`` with this ``seed`` (reproducible; the global RNG is not used).
    ``rescale > 1`` applies weight-rescaling augmentation with factors in ``[1/rescale, rescale]``."""
    if family not in _BUILDERS:
        raise ValueError(f"Unknown task family '{family}'; available: {list(FAMILIES)}")
    g = torch.Generator().manual_seed(int(seed))
    task = _BUILDERS[family](g, data)
    if rescale > 1.0:
        task = Rescaled(task, g, rescale)
    return task


class TaskDistribution:
    """Uniform over ``families``; each draw is a fresh *even* seed (odd seeds are the evaluation's
    held-out tasks), rescaled with probability ``p_rescale``."""

    def __init__(
        self, families: Sequence[str] = TRAIN_FAMILIES, data: Data = None, p_rescale: float = 0.5, rescale: float = 10.0
    ) -> None:
        bad = [f for f in families if f not in _BUILDERS]
        if bad or not families:
            raise ValueError(f"Unknown task families {bad}; available: {list(FAMILIES)}")
        if not 0.0 <= p_rescale <= 1.0:
            raise ValueError(f"Invalid p_rescale: {p_rescale}")
        if not rescale >= 1.0:
            raise ValueError(f"Invalid rescale: {rescale}")
        self.families, self.data, self.p_rescale, self.rescale = tuple(families), data, p_rescale, rescale

    def sample(self, generator: torch.Generator) -> Task:
        family = self.families[int(torch.randint(len(self.families), (1,), generator=generator))]
        seed = 2 * int(torch.randint(2**30, (1,), generator=generator))  # even: odd seeds stay held out
        rescale = self.rescale if float(torch.rand(1, generator=generator)) < self.p_rescale else 1.0
        return sample_task(family, seed, self.data, rescale)
