"""A distribution of cheap training tasks for meta-training rlopt's policies.

One *task* is one short supervised training run (an *episode* for the policy)::

    cfg  = TaskDistribution().sample(generator)     # data, model, batch size, lr, noise, budget
    task = build_task(cfg)                           # tensors and a freshly initialised model
    run_episode(task, optimizer)                     # epochs of closure steps + epoch_end(val)

Data sources:

* ``"teacher"``: random teacher-network classification. Inputs ``x ~ N(0, I_d)``, labels
  ``argmax(T(x))`` for a random two-layer tanh teacher ``T``. Always available.
* ``"fmnist"``: a small stratified Fashion-MNIST subset shipped inside the package
  (``rlopt/meta/data/fmnist_subset.npz``, 5000 training images), average-pooled to 14x14 to
  stay cheap; another file can be given (``fmnist_path``, or ``$RLOPT_FMNIST_SUBSET``). Where
  none is found, those tasks fall back to teacher tasks (:meth:`TaskDistribution.describe` says
  which happened).

Models are MLPs (any data) or small CNNs (images), with varied width and depth. Label noise
replaces a fraction of the *training* labels with uniformly random classes; validation labels
stay clean. Everything is seeded from the task's own seed with local generators, so a task is
reproducible and the global torch RNG is never consumed.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from ..control.base import ControlledOptimizer

__all__ = ["TaskConfig", "TaskDistribution", "Task", "build_task", "run_episode", "fmnist_subset_path"]

_FMNIST_MEAN, _FMNIST_STD = 0.286, 0.353


def fmnist_subset_path() -> Optional[Path]:
    """The embedded Fashion-MNIST subset, or None where this install does not have it."""
    env = os.environ.get("RLOPT_FMNIST_SUBSET")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent / "data" / "fmnist_subset.npz")  # shipped in the package
    for path in candidates:
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class TaskConfig:
    """One training task, fully specified (what :meth:`TaskDistribution.sample` returns)."""

    data: str
    """``"teacher"`` or ``"fmnist"``."""
    model: str
    """``"mlp"`` or ``"cnn"`` (images only)."""
    width: int
    """MLP hidden units, or CNN channels of the first block (doubled in the second)."""
    depth: int
    """MLP hidden layers, or CNN conv blocks."""
    batch_size: int
    lr: float
    """Base learning rate given to the optimizer."""
    label_noise: float
    """Fraction of training labels replaced by random classes."""
    epochs: int
    n_train: int
    n_val: int
    interval: Union[str, int]
    """Decision interval of the optimizer: ``"epoch"`` or a number of steps."""
    seed: int
    d_in: int = 16
    """Teacher tasks: input dimension."""
    n_classes: int = 10

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n_train // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def decisions(self) -> int:
        """Decisions the optimizer makes in this task (the first one included)."""
        if self.interval == "epoch":
            return self.epochs + 1
        return math.ceil(self.total_steps / int(self.interval)) + 1

    def short(self) -> str:
        return (f"{self.data}/{self.model}{self.depth}x{self.width} bs{self.batch_size} lr{self.lr:.3g} "
                f"noise{self.label_noise:.2f} {self.epochs}ep interval={self.interval}")


def _choice(options: Sequence[Any], g: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (), generator=g))]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _parse_field(text: str, like: Any) -> Any:
    """``text`` ("a,b,c") typed like the default value ``like`` (a tuple of options or a number)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not isinstance(like, tuple):
        if len(parts) != 1:
            raise ValueError("one value expected")
        return type(like)(parts[0])
    kinds = {type(v) for v in like}
    values: List[Union[int, float, str]] = []
    for t in parts:
        if int in kinds and t.lstrip("-").isdigit():
            values.append(int(t))
        elif float in kinds:
            values.append(float(t))
        elif str in kinds:
            values.append(t)
        else:
            values.append(int(t))
    if not values:
        raise ValueError("no values")
    return tuple(values)


@dataclass
class TaskDistribution:
    """What :meth:`sample` draws from (each field: the options, drawn uniformly)."""

    data: Tuple[str, ...] = ("teacher", "fmnist")
    """Data sources; ``fmnist`` falls back to ``teacher`` where the subset is missing."""
    mlp_width: Tuple[int, ...] = (16, 32, 64)
    mlp_depth: Tuple[int, ...] = (1, 2, 3)
    cnn_width: Tuple[int, ...] = (4, 8)
    cnn_depth: Tuple[int, ...] = (1, 2)
    cnn_share: float = 0.5
    """Probability that an image task uses a CNN rather than an MLP."""
    batch_size: Tuple[int, ...] = (32, 64, 128)
    lr_range: Tuple[float, float] = (0.01, 0.2)
    """Log-uniform range of the base learning rate."""
    label_noise: Tuple[float, ...] = (0.0, 0.0, 0.1, 0.3)
    epochs: Tuple[int, ...] = (3, 4, 5, 6)
    n_train: Tuple[int, ...] = (256, 512, 1024)
    n_val: int = 256
    interval: Tuple[Union[str, int], ...] = ("epoch", 4, 8)
    teacher_d_in: Tuple[int, ...] = (8, 16, 32)
    teacher_classes: Tuple[int, ...] = (3, 5, 10)
    fmnist_path: Optional[str] = field(default=None)
    """The subset file (None: :func:`fmnist_subset_path`)."""

    def __post_init__(self) -> None:
        if len(self.lr_range) != 2 or not 0.0 < self.lr_range[0] <= self.lr_range[1] < math.inf:
            raise ValueError(f"Invalid lr_range: {self.lr_range}")
        smallest = {"mlp_depth": 0, "teacher_classes": 2}  # 0 hidden layers: a linear model
        for name in ("mlp_width", "mlp_depth", "cnn_width", "cnn_depth", "batch_size", "epochs", "n_train",
                     "teacher_d_in", "teacher_classes"):
            values = getattr(self, name)
            if not values or any(not _is_int(v) or v < smallest.get(name, 1) for v in values):
                raise ValueError(f"Invalid {name}: {values}")
        if not _is_int(self.n_val) or self.n_val < 1:
            raise ValueError(f"Invalid n_val: {self.n_val}")
        if not 0.0 <= self.cnn_share <= 1.0:
            raise ValueError(f"Invalid cnn_share: {self.cnn_share}")
        if not self.interval or any(v != "epoch" and (not isinstance(v, int) or v < 1) for v in self.interval):
            raise ValueError(f"Invalid interval: {self.interval}")
        unknown = set(self.data) - {"teacher", "fmnist"}
        if not self.data or unknown:
            raise ValueError(f"Unknown data sources {sorted(unknown)}; expected 'teacher' and/or 'fmnist'")
        if any(not 0.0 <= p < 1.0 for p in self.label_noise):
            raise ValueError(f"Invalid label_noise: {self.label_noise}")

    def resolved_fmnist_path(self) -> Optional[Path]:
        if self.fmnist_path is not None:
            return Path(self.fmnist_path) if Path(self.fmnist_path).is_file() else None
        return fmnist_subset_path()

    def sample(self, g: torch.Generator, seed: int) -> TaskConfig:
        """Draw one task; ``seed`` seeds its data, model and batch order."""
        data = _choice(self.data, g)
        if data == "fmnist" and self.resolved_fmnist_path() is None:
            data = "teacher"
        cnn = data == "fmnist" and float(torch.rand((), generator=g)) < self.cnn_share
        lo, hi = self.lr_range
        lr = math.exp(math.log(lo) + float(torch.rand((), generator=g)) * (math.log(hi) - math.log(lo)))
        return TaskConfig(
            data=data, model="cnn" if cnn else "mlp",
            width=_choice(self.cnn_width if cnn else self.mlp_width, g),
            depth=_choice(self.cnn_depth if cnn else self.mlp_depth, g),
            batch_size=_choice(self.batch_size, g), lr=float(f"{lr:.4g}"),
            label_noise=_choice(self.label_noise, g), epochs=_choice(self.epochs, g),
            n_train=_choice(self.n_train, g), n_val=self.n_val, interval=_choice(self.interval, g), seed=seed,
            d_in=_choice(self.teacher_d_in, g) if data == "teacher" else 196,
            n_classes=_choice(self.teacher_classes, g) if data == "teacher" else 10,
        )

    def with_overrides(self, items: Sequence[str]) -> "TaskDistribution":
        """A copy with fields set from ``"field=v1,v2,..."`` strings (the command line's ``--task``).

        Option fields take a comma-separated list, typed like their defaults (``interval`` takes
        ``epoch`` or integers); ``lr_range`` takes ``lo,hi``; ``cnn_share`` and ``n_val`` one number.
        """
        known = {f.name for f in dataclasses.fields(self)} - {"fmnist_path"}
        defaults = type(self)()
        changes: Dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise ValueError(f"Invalid task override {item!r}: expected FIELD=VALUES with FIELD one of "
                                 f"{sorted(known)}")
            try:
                changes[name] = _parse_field(text, getattr(defaults, name))
            except ValueError as e:
                raise ValueError(f"Invalid task override {item!r}: {e}") from None
        return dataclasses.replace(self, **changes)

    def mean_decisions(self, n: int = 256, seed: int = 0) -> float:
        g = torch.Generator().manual_seed(seed)
        return sum(self.sample(g, 0).decisions for _ in range(n)) / n

    def describe(self) -> Dict[str, Any]:
        """A plain-data description (saved in checkpoints' metadata)."""
        d = dataclasses.asdict(self)
        path = self.resolved_fmnist_path()
        d["fmnist_path"] = None if path is None else path.name
        d["fmnist_available"] = path is not None
        d["note"] = ("teacher: random 2-layer tanh teacher, x ~ N(0, I); fmnist: embedded 5000-image "
                     "Fashion-MNIST subset pooled to 14x14; label noise on training labels only; "
                     "lr log-uniform in lr_range")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class Task:
    config: TaskConfig
    model: nn.Module
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    generator: torch.Generator
    """Batch order."""


_FMNIST_CACHE: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}


def _load_fmnist(path: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    key = os.fspath(path)
    if key not in _FMNIST_CACHE:
        import numpy as np

        with np.load(path) as d:
            x = torch.from_numpy(d["train_x"].astype("float32")) / 255.0
            y = torch.from_numpy(d["train_y"].astype("int64"))
        x = F.avg_pool2d(x, 2)
        _FMNIST_CACHE[key] = ((x - _FMNIST_MEAN) / _FMNIST_STD, y)
    return _FMNIST_CACHE[key]


def _make_model(cfg: TaskConfig, in_shape: Tuple[int, ...]) -> nn.Module:
    if cfg.model == "cnn":
        layers, c_in = [], in_shape[0]
        for i in range(cfg.depth):
            c_out = cfg.width * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        side = in_shape[1] // 2 ** cfg.depth
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, cfg.n_classes))
    d_in, layers = int(torch.Size(in_shape).numel()), [nn.Flatten()]
    for _ in range(cfg.depth):
        layers += [nn.Linear(d_in, cfg.width), nn.ReLU()]
        d_in = cfg.width
    return nn.Sequential(*layers, nn.Linear(d_in, cfg.n_classes))


def build_task(cfg: TaskConfig, fmnist_path: Optional[Path] = None) -> Task:
    """Data and a freshly initialised model for ``cfg`` (seeded by ``cfg.seed``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_val
    if cfg.data == "teacher":
        x = torch.randn(n, cfg.d_in, generator=g)
        w1 = torch.randn(cfg.d_in, 32, generator=g) / math.sqrt(cfg.d_in)
        w2 = torch.randn(32, cfg.n_classes, generator=g) / math.sqrt(32)
        y = (torch.tanh(2.0 * x @ w1) @ w2).argmax(dim=1)
    elif cfg.data == "fmnist":
        path = fmnist_path or fmnist_subset_path()
        if path is None:
            raise FileNotFoundError("The Fashion-MNIST subset is not available (set $RLOPT_FMNIST_SUBSET)")
        all_x, all_y = _load_fmnist(Path(path))
        idx = torch.randperm(len(all_y), generator=g)[:n]
        x, y = all_x[idx], all_y[idx]
    else:
        raise ValueError(f"Unknown data source '{cfg.data}'")
    train_x, train_y = x[:cfg.n_train], y[:cfg.n_train].clone()
    if cfg.label_noise > 0:
        flip = torch.rand(cfg.n_train, generator=g) < cfg.label_noise
        train_y[flip] = torch.randint(cfg.n_classes, (int(flip.sum()),), generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _make_model(cfg, tuple(x.shape[1:]))
    return Task(cfg, model, train_x, train_y, x[cfg.n_train:], y[cfg.n_train:], g)


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, float]:
    out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(dim=1) == y).float().mean())


def run_episode(task: Task, optimizer: ControlledOptimizer) -> Dict[str, Any]:
    """Train ``task.model`` with ``optimizer`` (an rlopt optimizer built on its parameters) for
    the task's budget, calling ``epoch_end`` with validation metrics after every epoch.

    Returns the episode's summary: return (sum of the rewards the policy was paid), number of
    decisions, final validation loss and accuracy, the share of each action, whether the run
    stopped early on non-finite values, and ``val_curve``: ``(val_loss, val_acc)`` after each
    epoch (a non-finite loss reads 1e6).
    """
    cfg, model = task.config, task.model
    bs, diverged, curve = cfg.batch_size, False, []
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(cfg.n_train, generator=task.generator)
            for i in range(cfg.steps_per_epoch):
                idx = order[i * bs:(i + 1) * bs]
                xb, yb = task.train_x[idx], task.train_y[idx]

                def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                    optimizer.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                optimizer.step(closure)
            val_loss, val_acc = _evaluate(model, task.val_x, task.val_y)
            val_loss = val_loss if math.isfinite(val_loss) else 1e6
            curve.append((val_loss, val_acc))
            optimizer.epoch_end(val_loss=val_loss, val_acc=val_acc)
    except RuntimeError as err:  # max_nonfinite_steps reached: the run is over
        if "not finite" not in str(err):
            raise
        diverged = True
    val_loss, val_acc = _evaluate(model, task.val_x, task.val_y)
    rewards = [h["reward"] for h in optimizer.history if h["reward"] is not None]
    names = optimizer.action_names
    counts = [0] * len(names)
    for h in optimizer.history:
        counts[h["action"]] += 1
    return {
        "return": float(sum(rewards)), "decisions": len(optimizer.history), "val_loss": val_loss,
        "val_acc": val_acc, "diverged": diverged, "val_curve": curve,
        "action_share": {a: c / max(1, len(optimizer.history)) for a, c in zip(names, counts)},
    }
