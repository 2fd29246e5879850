"""Build the meta-training data subsets: Fashion-MNIST (shipped) and CIFAR-10 (local only).

Both are real data: a stratified, seeded sample of the original release (``--per-class-train``
images of every class from the training set, ``--per-class-test`` from the test set), stored as
uint8 ``(N, C, H, W)`` with ``np.savez_compressed``.

* ``--dataset fashion-mnist`` (default) makes the subset shipped inside the package,
  ``rlopt/meta/data/fmnist_subset.npz``, so the demo, the notebook and the tests run offline with
  no download. ``--data-dir`` holds the four idx ``.gz`` files of the original release (the files
  torchvision downloads into ``FashionMNIST/raw/``).
* ``--dataset cifar10`` makes the CIFAR-10 subset of the ResNet meta-training tasks
  (:mod:`rlopt.meta.tasks`). It is too large to ship in the package: it is written into the
  git-ignored ``data/meta/`` folder of the checkout, where the tasks look for it (or give its path
  with ``$RLOPT_CIFAR10_SUBSET`` or ``TaskDistribution(cifar10_path=...)``). ``--data-dir`` is
  an ImageFolder tar (``{train,test}/<class>/<image>``, e.g. ``cifar10-jpeg.tar.gz``) or a folder
  holding one; only the sampled images are decoded.

Usage (the commands that made the files; without ``--out`` the Fashion-MNIST subset goes to the
git-ignored ``benchmarks/runs/fmnist_subset.npz``)::

    python -m benchmarks.make_subset --data-dir data/fashion-mnist \
        --per-class-train 500 --per-class-test 100 --seed 0 --out rlopt/meta/data/fmnist_subset.npz
    python -m benchmarks.make_subset --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg.tar.gz \
        --per-class-train 400 --per-class-test 100 --seed 0      # -> data/meta/cifar10_subset.npz
"""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np

from .cli import REPO_DIR, fail, parser, runs_path
from .data import FMNIST_CLASSES, SUBSET_PATH, _decode, _find_idx_dir, _read_fmnist_idx

#: where ``--dataset cifar10`` writes by default (git-ignored; :func:`rlopt.meta.tasks.cifar10_subset_path` looks here)
CIFAR_SUBSET_PATH = REPO_DIR / "data" / "meta" / "cifar10_subset.npz"
_IMG_EXT = (".png", ".jpg", ".jpeg")


def per_class_sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def _find_tar(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        hits = sorted(path.glob("cifar10*.tar*")) or sorted(path.glob("*.tar*"))
        if hits:
            return hits[0]
    raise FileNotFoundError(path)


def read_tar_subset(path: Path, per_class: dict[str, int], seed: int) -> dict[str, np.ndarray]:
    """``per_class[split]`` images of every class of ``split`` ("train"/"test") from an ImageFolder
    tar, sampled with ``seed`` from the sorted member names; only those are decoded."""
    members: dict[str, list[tuple[str, str, bytes]]] = {s: [] for s in per_class}
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            if not m.isfile() or not m.name.lower().endswith(_IMG_EXT):
                continue
            parts = Path(m.name).parts
            if len(parts) >= 3 and parts[-3] in members:
                members[parts[-3]].append((parts[-2], m.name, tar.extractfile(m).read()))
    if not all(members.values()):
        raise FileNotFoundError(f"{path}: no {'/'.join(per_class)}/<class>/ images inside")
    classes = sorted({c for c, _, _ in members["train"]})
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {"classes": np.asarray(classes)}
    for split, entries in members.items():
        entries.sort(key=lambda e: e[1])
        labels = np.asarray([classes.index(c) for c, _, _ in entries])
        pick = per_class_sample(labels, per_class[split], rng)
        out[f"{split}_x"] = np.stack([_decode(entries[i][2], 3) for i in pick])
        out[f"{split}_y"] = labels[pick].astype(np.uint8)
        out[f"{split}_index"] = pick.astype(np.int32)
    return out


def main(argv=None) -> None:
    ap = parser("make_subset", __doc__.splitlines()[0])
    ap.add_argument(
        "--dataset", choices=("fashion-mnist", "cifar10"), default="fashion-mnist", help="which subset to build"
    )
    ap.add_argument(
        "--data-dir",
        required=True,
        help="Fashion-MNIST: folder with the idx .gz files; CIFAR-10: an ImageFolder tar or a folder "
        "holding one (required)",
    )
    ap.add_argument(
        "--per-class-train",
        type=int,
        default=None,
        help="training images per class (default: 500 Fashion-MNIST, 400 CIFAR-10)",
    )
    ap.add_argument("--per-class-test", type=int, default=100, help="test images per class")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument(
        "--out",
        default=None,
        help=f"output .npz file (default: {runs_path(SUBSET_PATH.name).relative_to(REPO_DIR)} for "
        f"Fashion-MNIST, whose shipped subset is {SUBSET_PATH.relative_to(REPO_DIR)}; "
        f"{CIFAR_SUBSET_PATH.relative_to(REPO_DIR)} for CIFAR-10)",
    )
    args = ap.parse_args(argv)

    if args.dataset == "cifar10":
        per_train = 400 if args.per_class_train is None else args.per_class_train
        try:
            src = _find_tar(Path(args.data_dir))
        except FileNotFoundError:
            fail(
                ap,
                f"no CIFAR-10 image tar at {args.data_dir}: pass --data-dir with cifar10-jpeg.tar.gz "
                "or the folder holding it",
            )
        arrays = read_tar_subset(src, {"train": per_train, "test": args.per_class_test}, args.seed)
        out = Path(args.out) if args.out else CIFAR_SUBSET_PATH
    else:
        per_train = 500 if args.per_class_train is None else args.per_class_train
        d = _find_idx_dir(Path(args.data_dir))
        if d is None:
            fail(ap, f"no Fashion-MNIST idx files under {args.data_dir}: pass --data-dir with the four idx .gz files")
        full = _read_fmnist_idx(d)
        rng = np.random.default_rng(args.seed)
        tr = per_class_sample(full["train_y"], per_train, rng)
        te = per_class_sample(full["test_y"], args.per_class_test, rng)
        arrays = dict(
            train_x=full["train_x"][tr],
            train_y=full["train_y"][tr].astype(np.uint8),
            test_x=full["test_x"][te],
            test_y=full["test_y"][te].astype(np.uint8),
            train_index=tr.astype(np.int32),
            test_index=te.astype(np.int32),
            classes=np.asarray(FMNIST_CLASSES),
        )
        out = Path(args.out) if args.out else runs_path(SUBSET_PATH.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    print(
        f"wrote {out}: {len(arrays['train_y'])} train + {len(arrays['test_y'])} test images, "
        f"{out.stat().st_size / 1e6:.2f} MB, sha256 {sha}"
    )


if __name__ == "__main__":
    main()
