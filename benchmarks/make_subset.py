"""Build the embedded Fashion-MNIST subset ``rlopt/meta/data/fmnist_subset.npz``.

The subset is real Fashion-MNIST data: a stratified, seeded sample of the original release
(``--per-class-train`` images of every class from the 60k training set, ``--per-class-test`` from
the 10k test set), stored as uint8 with ``np.savez_compressed``. It lets the demo, the notebook and
the tests run offline with no download.

Usage (the command that made the shipped file; without ``--out`` it writes to the git-ignored
``benchmarks/runs/fmnist_subset.npz`` instead)::

    python -m benchmarks.make_subset --data-dir data/fashion-mnist \
        --per-class-train 500 --per-class-test 100 --seed 0 --out rlopt/meta/data/fmnist_subset.npz

``--data-dir`` holds the four idx ``.gz`` files of the original release (the files torchvision
downloads into ``FashionMNIST/raw/``).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .cli import REPO_DIR, fail, parser, runs_path
from .data import FMNIST_CLASSES, SUBSET_PATH, _find_idx_dir, _read_fmnist_idx


def per_class_sample(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    idx = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def main(argv=None) -> None:
    ap = parser("make_subset", __doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="folder with the Fashion-MNIST idx .gz files (required)")
    ap.add_argument("--per-class-train", type=int, default=500, help="training images per class")
    ap.add_argument("--per-class-test", type=int, default=100, help="test images per class")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sample")
    ap.add_argument("--out", default=str(runs_path(SUBSET_PATH.name)),
                    help=f"output .npz file (the shipped subset is {SUBSET_PATH.relative_to(REPO_DIR)}; default "
                    "%(default)s)")
    args = ap.parse_args(argv)

    d = _find_idx_dir(Path(args.data_dir))
    if d is None:
        fail(ap, f"no Fashion-MNIST idx files under {args.data_dir}: pass --data-dir with the four idx .gz files")
    full = _read_fmnist_idx(d)
    rng = np.random.default_rng(args.seed)
    tr = per_class_sample(full["train_y"], args.per_class_train, rng)
    te = per_class_sample(full["test_y"], args.per_class_test, rng)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, train_x=full["train_x"][tr], train_y=full["train_y"][tr].astype(np.uint8),
                        test_x=full["test_x"][te], test_y=full["test_y"][te].astype(np.uint8),
                        train_index=tr.astype(np.int32), test_index=te.astype(np.int32),
                        classes=np.asarray(FMNIST_CLASSES))
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    print(f"wrote {out}: {len(tr)} train + {len(te)} test images, {out.stat().st_size / 1e6:.2f} MB, sha256 {sha}")


if __name__ == "__main__":
    main()
