"""Image-classification data for the benchmarks: Fashion-MNIST and CIFAR-10 as uint8 tensors.

Sources, tried in this order by :func:`load_dataset`:

1. ``data_dir`` (or ``$RLOPT_DATA_DIR``), which may hold any of
   - the torchvision layout: ``FashionMNIST/raw/*-ubyte.gz`` or ``cifar-10-batches-py/``;
   - the four Fashion-MNIST idx ``.gz`` files directly (``train-images-idx3-ubyte.gz``, ...);
   - an ImageFolder tree ``train/<class>/*.{png,jpg}`` and ``test/<class>/*`` (for example the
     CIFAR-10 JPEG copy, extracted), or such a tree inside a ``.tar``/``.tar.gz`` file
     (``data_dir`` may be the archive itself, or a folder holding ``cifar10-jpeg.tar.gz``).
2. ``download=True``: torchvision downloads the data set into ``data_dir`` (default: the git-ignored
   ``data/`` folder of this repository, whatever the working directory).
3. ``name="fmnist-subset"``: the small stratified Fashion-MNIST subset shipped in this repository
   (``rlopt/meta/data/fmnist_subset.npz``, made by ``python -m benchmarks.make_subset``).

Decoded arrays are cached once as uint8 ``.npz`` under ``cache_dir`` (default
``$RLOPT_CACHE_DIR`` or ``~/.cache/rlopt/datasets``), keyed by data set and source path.

A validation split is held out from the training set, stratified by class and seeded: policies
are rewarded on validation, the test set is only reported.

Example:
    >>> ds = load_dataset("fashion-mnist", data_dir="data/fashion-mnist")
    >>> ds.train_x.shape, ds.train_x.dtype, ds.val_x.shape, ds.test_x.shape
    (torch.Size([54000, 1, 28, 28]), torch.uint8, torch.Size([6000, 1, 28, 28]), torch.Size([10000, 1, 28, 28]))
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import rlopt.meta.tasks

__all__ = [
    "ImageDataset",
    "load_dataset",
    "DATASETS",
    "read_idx",
    "read_image_folder",
    "stratified_split",
    "stratified_subset",
    "normalize",
    "augment_crop_flip",
    "PAD_MODES",
    "iterate_batches",
    "symmetric_label_noise",
    "SUBSET_PATH",
    "DEFAULT_DATA_DIR",
    "MissingDataError",
]

SUBSET_PATH = Path(rlopt.meta.tasks.__file__).resolve().parent / "data" / "fmnist_subset.npz"  # shipped in rlopt
#: where data is looked for without ``data_dir`` or ``$RLOPT_DATA_DIR``: ``data/`` at the repository root
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1] / "data"


class MissingDataError(FileNotFoundError):
    """No copy of data set ``name`` under ``root`` (and no download asked for). Command-line tools
    catch it and name their own flags (``--data-dir``, ``--download``) instead."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, Path(root)
        super().__init__(
            f"No {name} data under {root}: expected the torchvision layout, idx .gz files, "
            f"train/ and test/ image folders or an image tar; pass data_dir=... or download=True"
        )


FMNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}

#: canonical name -> (aliases, classes, channels, image side)
DATASETS: dict[str, tuple[tuple[str, ...], list[str], int, int]] = {
    "fashion-mnist": (("fashion-mnist", "fashion_mnist", "fashionmnist", "fmnist"), FMNIST_CLASSES, 1, 28),
    "cifar10": (("cifar10", "cifar-10", "cifar_10"), CIFAR10_CLASSES, 3, 32),
    "fmnist-subset": (("fmnist-subset", "fashion-mnist-subset", "embedded"), FMNIST_CLASSES, 1, 28),
}


def _canonical(name: str) -> str:
    key = name.lower().strip()
    for canon, (aliases, *_rest) in DATASETS.items():
        if key in aliases:
            return canon
    raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}")


@dataclass
class ImageDataset:
    """Train / validation / test splits as uint8 ``(N, C, H, W)`` images and int64 labels (CPU)."""

    name: str
    classes: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str
    #: per-channel mean and std of the training split, in [0, 1] units
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def summary(self) -> str:
        return (
            f"{self.name}: train {len(self.train_y)}, val {len(self.val_y)}, test {len(self.test_y)}, "
            f"{self.in_channels}x{self.image_size}x{self.image_size}, {self.num_classes} classes "
            f"(source: {self.source})"
        )


# --------------------------------------------------------------------------------------- readers
def read_idx(path: os.PathLike) -> np.ndarray:
    """Read an idx file (``.gz`` or plain), as in the MNIST / Fashion-MNIST releases, as uint8."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} bytes of data, found {arr.size}")
    return arr.reshape(shape).copy()


def _find_idx_dir(root: Path) -> Optional[Path]:
    for cand in (root, root / "FashionMNIST" / "raw", root / "fashion-mnist", root / "raw"):
        if all((cand / f).is_file() or (cand / f[:-3]).is_file() for f in FMNIST_FILES.values()):
            return cand
    return None


def _read_fmnist_idx(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for key, fname in FMNIST_FILES.items():
        path = d / fname if (d / fname).is_file() else d / fname[:-3]
        arr = read_idx(path)
        out[key] = arr[:, None] if key.endswith("_x") else arr.astype(np.int64)
    return out


def _read_cifar_batches(d: Path) -> dict[str, np.ndarray]:
    def load(f):
        with open(d / f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        return np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(entry["labels"])

    tr = [load(f"data_batch_{i}") for i in range(1, 6)]
    te_x, te_y = load("test_batch")
    return {
        "train_x": np.concatenate([t[0] for t in tr]),
        "train_y": np.concatenate([t[1] for t in tr]).astype(np.int64),
        "test_x": te_x,
        "test_y": te_y.astype(np.int64),
    }


_IMG_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _decode(data: bytes, channels: int) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def read_image_folder(
    root: os.PathLike, channels: int = 3, classes: Optional[Sequence[str]] = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode ``root/<class>/<image>`` into uint8 ``(N, C, H, W)`` and int64 labels.

    Classes are the sorted sub-folder names (as torchvision's ``ImageFolder``) unless given."""
    root = Path(root)
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if classes is None else list(classes)
    xs, ys = [], []
    for label, cname in enumerate(names):
        for f in sorted((root / cname).iterdir()):
            if f.suffix.lower() in _IMG_EXT:
                xs.append(_decode(f.read_bytes(), channels))
                ys.append(label)
    if not xs:
        raise FileNotFoundError(f"no images under {root}/<class>/")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), names


def _read_image_tar(path: Path, channels: int) -> dict[str, np.ndarray]:
    """An ImageFolder tree (``[prefix/]{train,test}/<class>/<image>``) inside a tar archive."""
    items: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if not m.isfile() or not m.name.lower().endswith(_IMG_EXT):
                continue
            parts = Path(m.name).parts
            if len(parts) < 3 or parts[-3] not in items:
                continue
            items[parts[-3]].append((parts[-2], m.name, tar.extractfile(m).read()))
    if not items["train"] or not items["test"]:
        raise FileNotFoundError(f"{path}: no train/<class>/ and test/<class>/ images inside")
    classes = sorted({c for c, _, _ in items["train"]})
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {}
    for split, entries in items.items():
        entries.sort(key=lambda e: e[1])
        out[f"{split}_x"] = np.stack([_decode(b, channels) for _, _, b in entries])
        out[f"{split}_y"] = np.asarray([index[c] for c, _, _ in entries], dtype=np.int64)
    out["classes"] = np.asarray(classes)
    return out


def _read_folder_splits(root: Path, channels: int) -> dict[str, np.ndarray]:
    tr_x, tr_y, classes = read_image_folder(root / "train", channels)
    te_x, te_y, _ = read_image_folder(root / "test", channels, classes)
    return {"train_x": tr_x, "train_y": tr_y, "test_x": te_x, "test_y": te_y, "classes": np.asarray(classes)}


def _locate(name: str, root: Path, channels: int):
    """Return (reader, description, source path) for the first layout found under ``root``, or None."""
    if root.is_file() and (root.suffix in (".tar", ".gz", ".tgz")):
        return (lambda: _read_image_tar(root, channels)), f"image tar {root}", root
    if not root.is_dir():
        return None
    if name == "fashion-mnist":
        d = _find_idx_dir(root)
        if d is not None:
            return (lambda: _read_fmnist_idx(d)), f"idx files in {d}", d
    if name == "cifar10":
        for cand in (root / "cifar-10-batches-py", root):
            if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
                return (lambda c=cand: _read_cifar_batches(c)), f"torchvision pickles in {cand}", cand
    prefixes = [root] + [root / p for p in ({"cifar10": ("cifar10", "cifar10-jpeg", "CIFAR-10")}.get(name, ()))]
    prefixes += [p for p in sorted(root.iterdir()) if p.is_dir()]
    for cand in prefixes:
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return (lambda c=cand: _read_folder_splits(c, channels)), f"image folders in {cand}", cand
    for pattern in ({"cifar10": "cifar10*.tar*"}.get(name, "fashion*mnist*.tar*"),):
        hits = sorted(root.glob(pattern))
        if hits:
            return (lambda h=hits[0]: _read_image_tar(h, channels)), f"image tar {hits[0]}", hits[0]
    return None


def _download(name: str, root: Path) -> None:
    import torchvision

    cls = {"fashion-mnist": torchvision.datasets.FashionMNIST, "cifar10": torchvision.datasets.CIFAR10}[name]
    for train in (True, False):
        cls(str(root), train=train, download=True)


# ---------------------------------------------------------------------------------- splitting
def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(keep, held_out)``: ``round(fraction * n_c)`` of each class ``c`` held out, seeded."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"Invalid val_fraction: {fraction}")
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        held.append(idx[:k])
        keep.append(idx[k:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``n`` samples, the same share of every class."""
    if n >= len(labels):
        return np.arange(len(labels))
    _, sub = stratified_split(labels, n / len(labels), seed)
    return sub


# ---------------------------------------------------------------------------------------- API
def _cache_path(cache_dir: Path, name: str, source: str) -> Path:
    key = hashlib.sha1(source.encode()).hexdigest()[:10]
    return cache_dir / f"{name}-{key}.npz"


def load_dataset(
    name: str,
    data_dir: Optional[os.PathLike] = None,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: Optional[os.PathLike] = None,
    max_train: Optional[int] = None,
    max_test: Optional[int] = None,
) -> ImageDataset:
    """Load ``name`` ("fashion-mnist", "cifar10" or "fmnist-subset") as uint8 tensors.

    Args:
        name: data set; aliases such as "fmnist", "cifar-10" are accepted.
        data_dir: folder (or archive) holding the data in one of the layouts in the module
            docstring; default ``$RLOPT_DATA_DIR`` or :data:`DEFAULT_DATA_DIR`. Ignored for "fmnist-subset".
        download: let torchvision download into ``data_dir`` when nothing is found there.
        val_fraction: share of each class of the training set held out for validation.
        seed: seed of the validation split (and of the ``max_*`` subsets).
        cache_dir: where decoded arrays are cached (default ``$RLOPT_CACHE_DIR`` or
            ``~/.cache/rlopt/datasets``).
        max_train, max_test: keep a stratified subset of at most this many training (before the
            validation split) / test images: for smoke tests.

    Returns:
        :class:`ImageDataset` with disjoint train / val splits and the untouched test split.
    """
    canon = _canonical(name)
    _aliases, default_classes, channels, _side = DATASETS[canon]
    if canon == "fmnist-subset":
        if not SUBSET_PATH.is_file():
            raise FileNotFoundError(f"{SUBSET_PATH} missing: run python -m benchmarks.make_subset")
        with np.load(SUBSET_PATH) as z:
            arrays = {k: z[k] for k in z.files}
        source = f"embedded subset {SUBSET_PATH.name}"
    else:
        root = Path(
            data_dir if data_dir is not None else os.environ.get("RLOPT_DATA_DIR", DEFAULT_DATA_DIR)
        ).expanduser()
        cache = Path(
            cache_dir if cache_dir is not None else os.environ.get("RLOPT_CACHE_DIR", "~/.cache/rlopt/datasets")
        ).expanduser()
        found = _locate(canon, root, channels)
        if found is None and download:
            root.mkdir(parents=True, exist_ok=True)
            _download(canon, root)
            found = _locate(canon, root, channels)
        if found is None:
            raise MissingDataError(canon, root)
        reader, source, src_path = found
        cpath = _cache_path(cache, canon, str(src_path.resolve()))
        if cpath.is_file():
            with np.load(cpath) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            arrays = reader()
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_name(f"{cpath.name}.{os.getpid()}.tmp.npz")  # processes may build it at once
            np.savez(tmp, **arrays)
            os.replace(tmp, cpath)
        source = f"{source} (cache {cpath})"
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else list(default_classes)
    tr_x, tr_y, te_x, te_y = arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"]
    if max_train is not None:
        sub = stratified_subset(tr_y, max_train, seed)
        tr_x, tr_y = tr_x[sub], tr_y[sub]
    if max_test is not None:
        sub = stratified_subset(te_y, max_test, seed)
        te_x, te_y = te_x[sub], te_y[sub]
    keep, held = stratified_split(tr_y, val_fraction, seed)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    train_x = t(tr_x[keep])
    flat = train_x.float().div_(255).transpose(0, 1).reshape(train_x.shape[1], -1)
    return ImageDataset(
        name=canon,
        classes=classes,
        train_x=train_x,
        train_y=t(tr_y[keep]).long(),
        val_x=t(tr_x[held]),
        val_y=t(tr_y[held]).long(),
        test_x=t(te_x),
        test_y=t(te_y).long(),
        source=source,
        mean=tuple(flat.mean(1).tolist()),
        std=tuple(flat.std(1).clamp_min(1e-3).tolist()),
    )


def symmetric_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric label noise: ``round(fraction * n)`` labels, drawn without replacement, each
    replaced by one of the *other* ``num_classes - 1`` classes chosen uniformly, so that
    ``fraction`` is exactly the share of wrong labels. (The convention that draws the new label
    from all classes, the old one included, leaves ``fraction * (K - 1) / K`` of them wrong.)

    Seeded by ``seed`` alone (a numpy generator of its own; the global RNGs are not touched):
    the same labels, fraction and seed give the same noisy labels on every machine.

    Returns ``(noisy labels, indices changed)``; ``labels`` itself is left as it is.
    """
    if isinstance(fraction, bool) or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"Invalid label noise: {fraction!r} (a fraction in [0, 1])")
    if num_classes < 2:
        raise ValueError(f"Invalid num_classes for label noise: {num_classes} (at least 2)")
    n = len(labels)
    k = int(round(float(fraction) * n))
    rng = np.random.default_rng([int(seed), 0x1AB31])  # a stream of its own, apart from the split's
    idx = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)
    shift = rng.integers(1, num_classes, size=k)  # 1..K-1: never the label it replaces
    noisy = labels.clone()
    if k:
        it = torch.from_numpy(idx).long()
        noisy[it] = (labels[it] + torch.from_numpy(shift).to(labels.dtype)) % num_classes
    return noisy, torch.from_numpy(idx).long()


# ------------------------------------------------------------------- device-side batching
def normalize(
    x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = False
) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 normalised; ``mean``/``std`` are ``(1, C, 1, 1)`` on the device."""
    x = x_uint8.float().div_(255).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


PAD_MODES = ("zeros", "reflect")


_GRIDS: dict[tuple[int, int, int, str], tuple[torch.Tensor, ...]] = {}


def _crop_grid(n: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Index tensors of a batched crop, made once per shape and device: images ``(n, 1, 1)``,
    rows ``(h, 1)``, columns ``(w,)`` and the columns reversed."""
    key = (n, h, w, str(device))
    if key not in _GRIDS:
        if len(_GRIDS) > 16:  # a few batch shapes per run; never grow without bound
            _GRIDS.clear()
        cols = torch.arange(w, device=device)
        _GRIDS[key] = (
            torch.arange(n, device=device).view(n, 1, 1),
            torch.arange(h, device=device).view(h, 1),
            cols,
            cols.flip(0),
        )
    return _GRIDS[key]


def augment_crop_flip(
    x: torch.Tensor,
    pad: int = 4,
    flip: bool = True,
    generator: Optional[torch.Generator] = None,
    pad_mode: str = "zeros",
) -> torch.Tensor:
    """Random crop with padding ``pad`` and random horizontal flip, batched on ``x``'s device.

    ``pad_mode``: ``"zeros"`` pads with black pixels (torchvision's ``RandomCrop`` default, before
    normalisation); ``"reflect"`` mirrors the border without repeating it (as airbench does).
    One gather for the whole batch, the flip folded into its column indices: no Python loop over
    images, no host sync, and few operations, because an eager training step is largely bound by
    the host launching them. Random draws, in this order: row offsets, column offsets, flips."""
    if pad_mode not in PAD_MODES:
        raise ValueError(f"Unknown pad_mode {pad_mode!r}; expected one of {PAD_MODES}")
    n, c, h, w = x.shape
    dev = x.device
    if pad <= 0:
        if flip:
            mask = torch.rand(n, device=dev, generator=generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x
    xp = F.pad(x, (pad, pad, pad, pad), mode="constant" if pad_mode == "zeros" else pad_mode)
    dy = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=dev, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1, 1), device=dev, generator=generator)
    batch, rows, cols, reversed_cols = _crop_grid(n, h, w, dev)
    if flip:  # a flipped crop reads its columns right to left
        mask = torch.rand(n, device=dev, generator=generator) < 0.5
        cols = torch.where(mask.view(n, 1, 1), reversed_cols, cols)
    # (n, h, w, c): rows and columns picked per image, channels last; then viewed as (n, c, h, w)
    return xp.permute(0, 2, 3, 1)[batch, dy + rows, dx + cols].permute(0, 3, 1, 2)


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches of tensors that already live on the training device (no DataLoader)."""
    n = len(y)
    order = torch.randperm(n, device=x.device, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        if order is None:
            yield x[i : i + batch_size], y[i : i + batch_size]
        else:
            idx = order[i : i + batch_size]
            yield x[idx], y[idx]
