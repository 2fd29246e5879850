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

* ``"cifar10"``: a stratified CIFAR-10 subset (4000 training, 1000 test images at 32x32),
  average-pooled to 16x16 by default. Too large to ship: ``python -m benchmarks.make_subset
  --dataset cifar10 ...`` writes it into the checkout's git-ignored ``data/meta/`` folder, where
  it is looked for (or give ``cifar10_path``, or ``$RLOPT_CIFAR10_SUBSET``). Where it is not
  found, those tasks fall back to Fashion-MNIST (then to teacher tasks), and
  :meth:`TaskDistribution.describe` says so.

Models are MLPs (any data), small CNNs (images), with varied width and depth, or batch-norm
ResNets (images; ``resnet_share``): a 3x3 stem, three stages of ``depth`` basic blocks at
``width``, ``2 width`` and ``4 width`` channels (strides 1, 2, 2), global average pooling. ResNet
tasks train as real runs do: random crops with padding (and horizontal flips on CIFAR-10), weight
decay, a linear warm-up then a cosine decay of the learning rate to zero, and validation on the
held-out test split. Label noise replaces a fraction of the *training* labels with uniformly
random classes; validation labels stay clean. Everything is seeded from the task's own seed with
local generators, so a task is reproducible and the global torch RNG is never consumed.

Two presets (:meth:`TaskDistribution.preset`): ``"classic"`` (the default fields: the teacher,
MLP and CNN tasks the first shipped policies were trained on, sampled exactly as before) and
``"resnet"`` (ResNets on CIFAR-10 and Fashion-MNIST with the real-training recipe, label noise
0-40% and small training sets, where SAM's gain is large).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from ..control.base import ControlledOptimizer

__all__ = [
    "TaskConfig",
    "TaskDistribution",
    "Task",
    "build_task",
    "run_episode",
    "fmnist_subset_path",
    "cifar10_subset_path",
    "lr_factor",
    "PRESETS",
]

_FMNIST_MEAN, _FMNIST_STD = 0.286, 0.353
_CIFAR_MEAN, _CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR_FILE = Path("data") / "meta" / "cifar10_subset.npz"


def fmnist_subset_path() -> Optional[Path]:
    """The embedded Fashion-MNIST subset, or None where this install does not have it."""
    env = os.environ.get("RLOPT_FMNIST_SUBSET")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parent / "data" / "fmnist_subset.npz")  # shipped in the package
    for path in candidates:
        if path.is_file():
            return path
    return None


def cifar10_subset_path() -> Optional[Path]:
    """The local CIFAR-10 subset (``$RLOPT_CIFAR10_SUBSET``, else ``data/meta/cifar10_subset.npz``
    under the current folder or the checkout holding this package), or None where there is none."""
    env = os.environ.get("RLOPT_CIFAR10_SUBSET")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / _CIFAR_FILE, Path(__file__).resolve().parents[2] / _CIFAR_FILE]
    for path in candidates:
        if path.is_file():
            return path
    return None


def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """The learning rate of ``step`` (0-based) of ``total``, relative to the base: 1 for
    ``"constant"``; for ``"warmup-cosine"`` a linear rise over the first ``round(warmup * total)``
    steps (``(step + 1) / w``), then ``(1 + cos(pi * k / n)) / 2`` over the ``n`` remaining steps
    (``k = 0 .. n - 1``), which reaches zero after the last."""
    if schedule == "constant":
        return 1.0
    if schedule != "warmup-cosine":
        raise ValueError(f"Unknown schedule '{schedule}'; expected 'constant' or 'warmup-cosine'")
    w = int(round(warmup * total))
    if step < w:
        return (step + 1) / w
    n = max(1, total - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - w, n) / n))


@dataclass(frozen=True)
class TaskConfig:
    """One training task, fully specified (what :meth:`TaskDistribution.sample` returns)."""

    data: str
    """``"teacher"``, ``"fmnist"`` or ``"cifar10"``."""
    model: str
    """``"mlp"``, ``"cnn"`` or ``"resnet"`` (images only)."""
    width: int
    """MLP hidden units, CNN channels of the first block (doubled in the second), or ResNet
    channels of the first stage."""
    depth: int
    """MLP hidden layers, CNN conv blocks, or ResNet basic blocks per stage."""
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
    weight_decay: float = 0.0
    """Given to the optimizer (0: the optimizer's default)."""
    schedule: str = "constant"
    """Learning-rate schedule over the run's steps: ``"constant"`` or ``"warmup-cosine"`` (:func:`lr_factor`)."""
    warmup: float = 0.0
    """Share of the steps in the linear warm-up (``"warmup-cosine"``)."""
    augment: bool = False
    """Random crops with padding (and horizontal flips on CIFAR-10) of every training batch."""
    image_size: int = 0
    """CIFAR-10: side of the (average-pooled) images, 16 or 32 (0: the source's default)."""
    val_split: str = "train"
    """Where the validation images come from: ``"train"`` (held out of the training pool, as the
    first tasks did) or ``"test"`` (the subset's test split)."""

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
        extra = ""
        if self.model == "resnet" or self.weight_decay or self.schedule != "constant" or self.augment:
            extra = (
                f" n{self.n_train} wd{self.weight_decay:g} {self.schedule}"
                + (" aug" if self.augment else "")
                + (f" {self.image_size}px" if self.image_size else "")
            )
        return (
            f"{self.data}/{self.model}{self.depth}x{self.width} bs{self.batch_size} lr{self.lr:.3g} "
            f"noise{self.label_noise:.2f} {self.epochs}ep interval={self.interval}{extra}"
        )


def _choice(options: Sequence[Any], g: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (), generator=g))]


def _pick(options: Sequence[Any], g: torch.Generator) -> Any:
    """:func:`_choice` that draws nothing when there is one option (new fields keep the draws of
    the classic distribution unchanged)."""
    return options[0] if len(options) == 1 else _choice(options, g)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _parse_field(text: str, like: Any) -> Any:
    """``text`` ("a,b,c") typed like the default value ``like`` (a tuple of options or a number)."""
    parts = [t.strip() for t in text.split(",") if t.strip()]
    if not isinstance(like, tuple):
        if len(parts) != 1:
            raise ValueError("one value expected")
        if isinstance(like, bool):
            if parts[0].lower() not in ("0", "1", "true", "false"):
                raise ValueError("0 or 1 expected")
            return parts[0].lower() in ("1", "true")
        return type(like)(parts[0])
    kinds = {type(v) for v in like}
    values: list[Union[int, float, str]] = []
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

    data: tuple[str, ...] = ("teacher", "fmnist")
    """Data sources (``teacher``, ``fmnist``, ``cifar10``); ``cifar10`` falls back to ``fmnist`` and
    ``fmnist`` to ``teacher`` where their subsets are missing."""
    mlp_width: tuple[int, ...] = (16, 32, 64)
    mlp_depth: tuple[int, ...] = (1, 2, 3)
    cnn_width: tuple[int, ...] = (4, 8)
    cnn_depth: tuple[int, ...] = (1, 2)
    cnn_share: float = 0.5
    """Probability that an image task uses a CNN rather than an MLP."""
    batch_size: tuple[int, ...] = (32, 64, 128)
    lr_range: tuple[float, float] = (0.01, 0.2)
    """Log-uniform range of the base learning rate."""
    label_noise: tuple[float, ...] = (0.0, 0.0, 0.1, 0.3)
    epochs: tuple[int, ...] = (3, 4, 5, 6)
    n_train: tuple[int, ...] = (256, 512, 1024)
    n_val: int = 256
    interval: tuple[Union[str, int], ...] = ("epoch", 4, 8)
    teacher_d_in: tuple[int, ...] = (8, 16, 32)
    teacher_classes: tuple[int, ...] = (3, 5, 10)
    fmnist_path: Optional[str] = field(default=None)
    """The subset file (None: :func:`fmnist_subset_path`)."""
    resnet_share: float = 0.0
    """Probability that an image task is a batch-norm ResNet trained with the real-training
    recipe (the fields below); the rest are CNNs (``cnn_share``) or MLPs."""
    resnet_width: tuple[int, ...] = (8, 16)
    """Channels of the first stage (32 works too, at about 4x the cost of 16)."""
    resnet_depth: tuple[int, ...] = (1,)
    """Basic blocks per stage (three stages; 2 costs about 1.7x)."""
    resnet_batch_size: tuple[int, ...] = (64,)
    resnet_lr_range: tuple[float, float] = (0.05, 0.2)
    resnet_epochs: tuple[int, ...] = (12, 16)
    resnet_n_train: tuple[int, ...] = (500, 1000, 2000)
    """Training images (small sets: SAM's gain is larger there)."""
    weight_decay: tuple[float, ...] = (5e-4,)
    """ResNet tasks' weight decay."""
    warmup: float = 0.1
    """ResNet tasks: share of the steps in the warm-up (then cosine to zero)."""
    augment: bool = True
    """ResNet tasks: random crops with padding (and flips on CIFAR-10)."""
    image_size: tuple[int, ...] = (16,)
    """CIFAR-10 image side (16 or 32)."""
    cifar10_path: Optional[str] = field(default=None)
    """The CIFAR-10 subset file (None: :func:`cifar10_subset_path`)."""

    def __post_init__(self) -> None:
        smallest = {"mlp_depth": 0, "teacher_classes": 2}  # 0 hidden layers: a linear model
        for name in (
            "mlp_width",
            "mlp_depth",
            "cnn_width",
            "cnn_depth",
            "batch_size",
            "epochs",
            "n_train",
            "teacher_d_in",
            "teacher_classes",
            "resnet_width",
            "resnet_depth",
            "resnet_batch_size",
            "resnet_epochs",
            "resnet_n_train",
        ):
            values = getattr(self, name)
            if not values or any(not _is_int(v) or v < smallest.get(name, 1) for v in values):
                raise ValueError(f"Invalid {name}: {values}")
        if not _is_int(self.n_val) or self.n_val < 1:
            raise ValueError(f"Invalid n_val: {self.n_val}")
        for name in ("cnn_share", "resnet_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Invalid {name}: {getattr(self, name)}")
        for name in ("lr_range", "resnet_lr_range"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0.0 < lo_hi[0] <= lo_hi[1] < math.inf:
                raise ValueError(f"Invalid {name}: {lo_hi}")
        if not self.weight_decay or any(not 0.0 <= w < math.inf for w in self.weight_decay):
            raise ValueError(f"Invalid weight_decay: {self.weight_decay}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"Invalid warmup: {self.warmup}")
        if not self.image_size or any(v not in (16, 32) for v in self.image_size):
            raise ValueError(f"Invalid image_size: {self.image_size} (16 or 32)")
        if not self.interval or any(v != "epoch" and (not isinstance(v, int) or v < 1) for v in self.interval):
            raise ValueError(f"Invalid interval: {self.interval}")
        unknown = set(self.data) - {"teacher", "fmnist", "cifar10"}
        if not self.data or unknown:
            raise ValueError(f"Unknown data sources {sorted(unknown)}; expected 'teacher', 'fmnist' and/or 'cifar10'")
        if any(not 0.0 <= p < 1.0 for p in self.label_noise):
            raise ValueError(f"Invalid label_noise: {self.label_noise}")

    def resolved_fmnist_path(self) -> Optional[Path]:
        if self.fmnist_path is not None:
            return Path(self.fmnist_path) if Path(self.fmnist_path).is_file() else None
        return fmnist_subset_path()

    def resolved_cifar10_path(self) -> Optional[Path]:
        if self.cifar10_path is not None:
            return Path(self.cifar10_path) if Path(self.cifar10_path).is_file() else None
        return cifar10_subset_path()

    @classmethod
    def preset(cls, name: str, **changes: Any) -> TaskDistribution:
        """The distribution named ``name`` in :data:`PRESETS`, with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"Unknown task preset '{name}'; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})

    def sample(self, g: torch.Generator, seed: int) -> TaskConfig:
        """Draw one task; ``seed`` seeds its data, model and batch order."""
        data = _choice(self.data, g)
        if data == "cifar10" and self.resolved_cifar10_path() is None:
            data = "fmnist"
        if data == "fmnist" and self.resolved_fmnist_path() is None:
            data = "teacher"
        if (
            data != "teacher"
            and self.resnet_share > 0
            and (self.resnet_share >= 1 or float(torch.rand((), generator=g)) < self.resnet_share)
        ):
            return self._sample_resnet(data, g, seed)
        if data == "cifar10":  # not a ResNet: the CIFAR-10 tasks are ResNet tasks only
            data = "fmnist" if self.resolved_fmnist_path() is not None else "teacher"
        cnn = data == "fmnist" and float(torch.rand((), generator=g)) < self.cnn_share
        lo, hi = self.lr_range
        lr = math.exp(math.log(lo) + float(torch.rand((), generator=g)) * (math.log(hi) - math.log(lo)))
        return TaskConfig(
            data=data,
            model="cnn" if cnn else "mlp",
            width=_choice(self.cnn_width if cnn else self.mlp_width, g),
            depth=_choice(self.cnn_depth if cnn else self.mlp_depth, g),
            batch_size=_choice(self.batch_size, g),
            lr=float(f"{lr:.4g}"),
            label_noise=_choice(self.label_noise, g),
            epochs=_choice(self.epochs, g),
            n_train=_choice(self.n_train, g),
            n_val=self.n_val,
            interval=_choice(self.interval, g),
            seed=seed,
            d_in=_choice(self.teacher_d_in, g) if data == "teacher" else 196,
            n_classes=_choice(self.teacher_classes, g) if data == "teacher" else 10,
        )

    def _sample_resnet(self, data: str, g: torch.Generator, seed: int) -> TaskConfig:
        lo, hi = self.resnet_lr_range
        lr = math.exp(math.log(lo) + float(torch.rand((), generator=g)) * (math.log(hi) - math.log(lo)))
        return TaskConfig(
            data=data,
            model="resnet",
            width=_pick(self.resnet_width, g),
            depth=_pick(self.resnet_depth, g),
            batch_size=_pick(self.resnet_batch_size, g),
            lr=float(f"{lr:.4g}"),
            label_noise=_pick(self.label_noise, g),
            epochs=_pick(self.resnet_epochs, g),
            n_train=_pick(self.resnet_n_train, g),
            n_val=min(self.n_val, 1000),
            interval=_pick(self.interval, g),
            seed=seed,
            d_in=3 * 16 * 16 if data == "cifar10" else 196,
            n_classes=10,
            weight_decay=_pick(self.weight_decay, g),
            schedule="warmup-cosine",
            warmup=self.warmup,
            augment=self.augment,
            image_size=_pick(self.image_size, g) if data == "cifar10" else 0,
            val_split="test",
        )

    def with_overrides(self, items: Sequence[str]) -> TaskDistribution:
        """A copy with fields set from ``"field=v1,v2,..."`` strings (the command line's ``--task``).

        Option fields take a comma-separated list, typed like their defaults (``interval`` takes
        ``epoch`` or integers); ``lr_range`` takes ``lo,hi``; ``cnn_share``, ``resnet_share``,
        ``warmup``, ``augment`` (0/1) and ``n_val`` one number.
        """
        known = {f.name for f in dataclasses.fields(self)} - {"fmnist_path", "cifar10_path"}
        defaults = type(self)()
        changes: dict[str, Any] = {}
        for item in items:
            name, sep, text = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in known:
                raise ValueError(
                    f"Invalid task override {item!r}: expected FIELD=VALUES with FIELD one of {sorted(known)}"
                )
            try:
                changes[name] = _parse_field(text, getattr(defaults, name))
            except ValueError as e:
                raise ValueError(f"Invalid task override {item!r}: {e}") from None
        return dataclasses.replace(self, **changes)

    def mean_decisions(self, n: int = 256, seed: int = 0) -> float:
        g = torch.Generator().manual_seed(seed)
        return sum(self.sample(g, 0).decisions for _ in range(n)) / n

    def describe(self) -> dict[str, Any]:
        """A plain-data description (saved in checkpoints' metadata)."""
        d = dataclasses.asdict(self)
        path = self.resolved_fmnist_path()
        d["fmnist_path"] = None if path is None else path.name
        d["fmnist_available"] = path is not None
        cifar = self.resolved_cifar10_path()
        d["cifar10_path"] = None if cifar is None else cifar.name
        d["cifar10_available"] = cifar is not None
        d["note"] = (
            "teacher: random 2-layer tanh teacher, x ~ N(0, I); fmnist: embedded 5000-image "
            "Fashion-MNIST subset pooled to 14x14; label noise on training labels only; "
            "lr log-uniform in lr_range"
        )
        if self.resnet_share > 0:
            d["note"] += (
                "; resnet tasks: batch-norm ResNets (3 stages), crops with padding (+ flips on "
                "cifar10), weight decay, linear warm-up then cosine to zero, lr log-uniform in "
                "resnet_lr_range, validation on the test split; cifar10: local 4000/1000-image "
                "subset pooled to image_size"
                + (
                    ""
                    if cifar is not None or "cifar10" not in self.data
                    else " (not found: cifar10 tasks fell back to fmnist)"
                )
            )
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
    """Batch order and augmentation."""
    order: Optional[torch.Tensor] = None
    """The current epoch's permutation of the training set (set by :func:`train_steps`)."""


_FMNIST_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_IMAGE_CACHE: dict[tuple[str, int], dict[str, torch.Tensor]] = {}


def _load_fmnist(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    key = os.fspath(path)
    if key not in _FMNIST_CACHE:
        import numpy as np

        with np.load(path) as d:
            x = torch.from_numpy(d["train_x"].astype("float32")) / 255.0
            y = torch.from_numpy(d["train_y"].astype("int64"))
        x = F.avg_pool2d(x, 2)
        _FMNIST_CACHE[key] = ((x - _FMNIST_MEAN) / _FMNIST_STD, y)
    return _FMNIST_CACHE[key]


def _load_splits(data: str, path: Path, image_size: int) -> dict[str, torch.Tensor]:
    """Both splits of a subset file, normalised float ``(N, C, H, W)``: Fashion-MNIST pooled to
    14x14, CIFAR-10 to ``image_size`` (16 or 32)."""
    key = (os.fspath(path), image_size)
    if key not in _IMAGE_CACHE:
        import numpy as np

        out = {}
        with np.load(path) as d:
            for split in ("train", "test"):
                x = torch.from_numpy(d[f"{split}_x"].astype("float32")) / 255.0
                if x.dim() == 3:
                    x = x.unsqueeze(1)
                if data == "fmnist":
                    x = (F.avg_pool2d(x, 2) - _FMNIST_MEAN) / _FMNIST_STD
                else:
                    if image_size and x.shape[-1] != image_size:
                        x = F.avg_pool2d(x, x.shape[-1] // image_size)
                    x = (x - torch.tensor(_CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(_CIFAR_STD).view(1, 3, 1, 1)
                out[f"{split}_x"] = x.contiguous()
                out[f"{split}_y"] = torch.from_numpy(d[f"{split}_y"].astype("int64"))
        _IMAGE_CACHE[key] = out
    return _IMAGE_CACHE[key]


class _Block(nn.Module):
    """A basic residual block: two 3x3 convolutions with batch norm, a 1x1 projection where the
    shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(c_in: int, width: int, blocks: int, n_classes: int) -> nn.Module:
    layers = [nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    c = width
    for stage in range(3):
        c_out = width * 2**stage
        for b in range(blocks):
            layers.append(_Block(c, c_out, 2 if stage > 0 and b == 0 else 1))
            c = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, n_classes))


def _make_model(cfg: TaskConfig, in_shape: tuple[int, ...]) -> nn.Module:
    if cfg.model == "resnet":
        return _resnet(in_shape[0], cfg.width, cfg.depth, cfg.n_classes)
    if cfg.model == "cnn":
        layers, c_in = [], in_shape[0]
        for i in range(cfg.depth):
            c_out = cfg.width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        side = in_shape[1] // 2**cfg.depth
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, cfg.n_classes))
    d_in, layers = int(torch.Size(in_shape).numel()), [nn.Flatten()]
    for _ in range(cfg.depth):
        layers += [nn.Linear(d_in, cfg.width), nn.ReLU()]
        d_in = cfg.width
    return nn.Sequential(*layers, nn.Linear(d_in, cfg.n_classes))


def _subset_file(cfg: TaskConfig, fmnist_path: Optional[Path], cifar10_path: Optional[Path]) -> Path:
    if cfg.data == "cifar10":
        path = cifar10_path or cifar10_subset_path()
        if path is None:
            raise FileNotFoundError(
                "The CIFAR-10 subset is not available: build it with `python -m "
                "benchmarks.make_subset --dataset cifar10 --data-dir ...` or set "
                "$RLOPT_CIFAR10_SUBSET"
            )
        return Path(path)
    path = fmnist_path or fmnist_subset_path()
    if path is None:
        raise FileNotFoundError("The Fashion-MNIST subset is not available (set $RLOPT_FMNIST_SUBSET)")
    return Path(path)


def build_task(cfg: TaskConfig, fmnist_path: Optional[Path] = None, cifar10_path: Optional[Path] = None) -> Task:
    """Data and a freshly initialised model for ``cfg`` (seeded by ``cfg.seed``)."""
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_val
    if cfg.data not in ("teacher", "fmnist", "cifar10"):
        raise ValueError(f"Unknown data source '{cfg.data}'")
    if cfg.val_split == "test":
        if cfg.data == "teacher":
            raise ValueError("val_split='test' needs an image data source")
        d = _load_splits(cfg.data, _subset_file(cfg, fmnist_path, cifar10_path), cfg.image_size)
        if cfg.n_train > len(d["train_y"]) or cfg.n_val > len(d["test_y"]):
            raise ValueError(
                f"The {cfg.data} subset has {len(d['train_y'])} training and {len(d['test_y'])} test "
                f"images; the task asks for {cfg.n_train} and {cfg.n_val}"
            )
        tr = torch.randperm(len(d["train_y"]), generator=g)[: cfg.n_train]
        va = torch.randperm(len(d["test_y"]), generator=g)[: cfg.n_val]
        x = torch.cat([d["train_x"][tr], d["test_x"][va]])
        y = torch.cat([d["train_y"][tr], d["test_y"][va]])
    elif cfg.val_split != "train":
        raise ValueError(f"Invalid val_split '{cfg.val_split}'; expected 'train' or 'test'")
    elif cfg.data == "teacher":
        x = torch.randn(n, cfg.d_in, generator=g)
        w1 = torch.randn(cfg.d_in, 32, generator=g) / math.sqrt(cfg.d_in)
        w2 = torch.randn(32, cfg.n_classes, generator=g) / math.sqrt(32)
        y = (torch.tanh(2.0 * x @ w1) @ w2).argmax(dim=1)
    elif cfg.data == "fmnist":
        all_x, all_y = _load_fmnist(_subset_file(cfg, fmnist_path, cifar10_path))
        idx = torch.randperm(len(all_y), generator=g)[:n]
        x, y = all_x[idx], all_y[idx]
    else:
        d = _load_splits(cfg.data, _subset_file(cfg, fmnist_path, cifar10_path), cfg.image_size)
        idx = torch.randperm(len(d["train_y"]), generator=g)[:n]
        x, y = d["train_x"][idx], d["train_y"][idx]
    train_x, train_y = x[: cfg.n_train], y[: cfg.n_train].clone()
    if cfg.label_noise > 0:
        flip = torch.rand(cfg.n_train, generator=g) < cfg.label_noise
        train_y[flip] = torch.randint(cfg.n_classes, (int(flip.sum()),), generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = _make_model(cfg, tuple(x.shape[1:]))
    return Task(cfg, model, train_x, train_y, x[cfg.n_train :], y[cfg.n_train :], g)


def augment_batch(x: torch.Tensor, g: torch.Generator, pad: int, flip: bool) -> torch.Tensor:
    """Random crops of ``x`` (N, C, H, W) after zero padding by ``pad``, and random horizontal
    flips, drawn from ``g``."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(2 * pad + 1, (n, 1), generator=g)
    dx = torch.randint(2 * pad + 1, (n, 1), generator=g)
    rows = (torch.arange(h).unsqueeze(0) + dy)[:, None, :, None]
    cols = torch.arange(w).unsqueeze(0) + dx
    if flip:
        mirror = torch.rand(n, generator=g) < 0.5
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    cols = cols[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


@torch.no_grad()
def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])
    finally:
        model.train(was_training)
    return float(F.cross_entropy(out, y)), float((out.argmax(dim=1) == y).float().mean())


def train_steps(
    task: Task,
    optimizer: ControlledOptimizer,
    steps: range,
    on_epoch_end: Optional[Callable[[int, float, float], None]] = None,
) -> None:
    """Run the task's training steps ``steps`` (0-based indices into its whole run) with
    ``optimizer``: its batches in order (one permutation per epoch, drawn from ``task.generator``
    at the epoch's first step), its augmentation and its learning-rate schedule (the base lr of
    ``cfg.lr`` times :func:`lr_factor`, set in every param group). After an epoch's last step, ``on_epoch_end(epoch,
    val_loss, val_acc)`` is called with the validation metrics. Two copies of a task (same
    generator state) given the same range see the same batches, so runs can branch from a
    checkpoint and stay paired."""
    cfg, model = task.config, task.model
    bs, spe = cfg.batch_size, cfg.steps_per_epoch
    model.train()
    for step in steps:
        epoch, i = divmod(step, spe)
        if i == 0 or task.order is None:
            task.order = torch.randperm(cfg.n_train, generator=task.generator)
        idx = task.order[i * bs : (i + 1) * bs]
        xb, yb = task.train_x[idx], task.train_y[idx]
        if cfg.augment:
            xb = augment_batch(xb, task.generator, pad=2 if xb.shape[-1] <= 16 else 4, flip=cfg.data == "cifar10")
        if cfg.schedule != "constant":
            lr = cfg.lr * lr_factor(cfg.schedule, step, cfg.total_steps, cfg.warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr

        def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        optimizer.step(closure)
        if i == spe - 1 and on_epoch_end is not None:
            val_loss, val_acc = _evaluate(model, task.val_x, task.val_y)
            on_epoch_end(epoch, val_loss, val_acc)


def run_episode(task: Task, optimizer: ControlledOptimizer) -> dict[str, Any]:
    """Train ``task.model`` with ``optimizer`` (an rlopt optimizer built on its parameters) for
    the task's budget (:func:`train_steps`: its batches, augmentation and learning-rate
    schedule), calling ``epoch_end`` with validation metrics after every epoch.

    Returns the episode's summary: return (sum of the rewards the policy was paid), number of
    decisions, final validation loss and accuracy, the share of each action, whether the run
    stopped early on non-finite values, and ``val_curve``: ``(val_loss, val_acc)`` after each
    epoch (a non-finite loss reads 1e6).
    """
    cfg, model = task.config, task.model
    diverged, curve = False, []

    def epoch_end(epoch: int, val_loss: float, val_acc: float) -> None:
        val_loss = val_loss if math.isfinite(val_loss) else 1e6
        curve.append((val_loss, val_acc))
        optimizer.epoch_end(val_loss=val_loss, val_acc=val_acc)

    try:
        train_steps(task, optimizer, range(cfg.total_steps), epoch_end)
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
        "return": float(sum(rewards)),
        "decisions": len(optimizer.history),
        "val_loss": val_loss,
        "val_acc": val_acc,
        "diverged": diverged,
        "val_curve": curve,
        "action_share": {a: c / max(1, len(optimizer.history)) for a, c in zip(names, counts)},
    }


#: Named task distributions (:meth:`TaskDistribution.preset`): field values over the defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "classic": {},
    "resnet": dict(
        data=("cifar10", "fmnist"), resnet_share=1.0, label_noise=(0.0, 0.2, 0.4), interval=("epoch",), n_val=1000
    ),
}
