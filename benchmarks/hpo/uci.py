"""The REINFORCE seed's experiment, done exhaustively: every configuration of its 10^4 grid trained once.

Grid (as in the seed): learning rate and weight decay in {1e-5, 3e-5, ..., 1e-1, 3e-1}, batch size
8..4096 in powers of 2, hidden units 2..20 step 2. Model: one hidden layer (ReLU), Adam (weight decay
as L2 added to the gradient, like ``torch.optim.Adam(weight_decay=...)``), ``epochs`` epochs.
Data: winequality-red (regression: residual sugar from the other 11 columns; inputs and target
standardised with training statistics; MSE reported in the target's own units) and UCI letter
recognition (26-way classification; cross-entropy). One fixed 0.7/0.1/0.2 split (``split_seed``),
never reshuffled; ``seed`` sets the initial weights and the minibatch order.

All 1,000 (lr, weight decay, hidden) configurations of one batch size train at once as stacked
weights: the hidden layer is 20 wide and a configuration with fewer units masks the rest (a masked
unit has zero output and receives zero gradient, so the network is exactly the narrower one; its
output layer's initial scale uses the active width as fan-in). All configurations of a batch size
see the same minibatch order. The result (validation loss after every epoch, test metric after the
last) is the oracle table the searches are replayed against.
"""

from __future__ import annotations

import csv
import itertools
import math
import os
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

RATES = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
BATCHES = [2**k for k in range(3, 13)]
HIDDEN = list(range(2, 21, 2))
#: the grid's parameter order (index tuples in the tables follow it)
GRID = {"lr": RATES, "weight_decay": RATES, "batch_size": BATCHES, "hidden": HIDDEN}

FILES = {"wine": "winequality-red.csv", "letter": "letter-recognition.csv"}
# where users who are online get the files (the data sets' home at the UCI repository)
SOURCES = {
    "wine": "https://archive.ics.uci.edu/ml/machine-learning-databases/wine-quality/winequality-red.csv",
    "letter": "https://archive.ics.uci.edu/ml/machine-learning-databases/letter-recognition/letter-recognition.data",
}


def load_uci(task: str, data_dir: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Features (float32) and target (float32 for wine, int64 class for letter) of a UCI task.

    Reads ``<data_dir>/<file>`` (comma- or semicolon-separated, with or without a header, the
    letter class first); with ``download=True`` a missing file is fetched from the UCI repository."""
    path = os.path.join(data_dir, FILES[task])
    if not os.path.isfile(path):
        if not download:
            raise FileNotFoundError(
                f"{path} not found: pass --data-dir pointing at a folder with {FILES[task]}, or --download"
            )
        os.makedirs(data_dir, exist_ok=True)
        urllib.request.urlretrieve(SOURCES[task], path)
    with open(path, newline="") as f:
        text = f.read()
    delim = ";" if text.count(";") > text.count(",") else ","
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delim) if r]
    if task == "wine":
        if not _is_number(rows[0][0]):
            rows = rows[1:]
        a = np.asarray(rows, dtype=np.float32)
        y = a[:, 3].copy()  # residual sugar
        x = np.delete(a, 3, axis=1)
        return x, y
    if not _is_number(rows[0][1]) or rows[0][0] == "Letter":
        rows = rows[1:]
    y = np.asarray([ord(r[0]) - ord("A") for r in rows], dtype=np.int64)
    x = np.asarray([r[1:] for r in rows], dtype=np.float32)
    return x, y


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


@dataclass
class Split:
    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    regression: bool
    target_scale: float  # standard deviation of the training target (regression)


def make_split(x: np.ndarray, y: np.ndarray, regression: bool, split_seed: int = 0) -> Split:
    """One fixed 0.7/0.1/0.2 split; inputs (and a regression target) standardised on the training part."""
    n = len(x)
    perm = np.random.default_rng(split_seed).permutation(n)
    n_tr, n_va = int(round(0.7 * n)), int(round(0.1 * n))
    parts = {"train": perm[:n_tr], "val": perm[n_tr : n_tr + n_va], "test": perm[n_tr + n_va :]}
    mu, sd = x[parts["train"]].mean(0), x[parts["train"]].std(0) + 1e-8
    xs = {k: torch.from_numpy((x[i] - mu) / sd).float() for k, i in parts.items()}
    scale = 1.0
    if regression:
        ym, ys = float(y[parts["train"]].mean()), float(y[parts["train"]].std())
        ys_ = {k: torch.from_numpy((y[i] - ym) / ys).float() for k, i in parts.items()}
        scale = ys
    else:
        ys_ = {k: torch.from_numpy(y[i]).long() for k, i in parts.items()}
    return Split(xs, ys_, regression, scale)


def _loss(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    """Per-configuration mean loss: ``out`` (C, B, o) -> (C,)."""
    if regression:
        return ((out[..., 0] - y.view(1, -1)) ** 2).mean(1)
    c, b, o = out.shape
    ce = torch.nn.functional.cross_entropy(out.reshape(c * b, o), y.repeat(c), reduction="none")
    return ce.view(c, b).mean(1)


def init_stack(c: int, d: int, o: int, hidden: torch.Tensor, width: int, g: torch.Generator):
    """Initial stacked weights ``[W1 (C, d, H), b1 (C, H), W2 (C, H, o), b2 (C, o)]``, uniform in
    +-1/sqrt(fan_in) as ``nn.Linear`` (fan-in of the output layer: the configuration's hidden units)."""
    b1_ = 1 / math.sqrt(d)
    b2_ = (1 / hidden.float().sqrt()).view(c, 1, 1)
    return [
        (torch.rand(c, d, width, generator=g) * 2 - 1) * b1_,
        (torch.rand(c, width, generator=g) * 2 - 1) * b1_,
        (torch.rand(c, width, o, generator=g) * 2 - 1) * b2_,
        (torch.rand(c, o, generator=g) * 2 - 1) * b2_.view(c, 1),
    ]


def train_stack(
    split: Split,
    lr: torch.Tensor,
    wd: torch.Tensor,
    hidden: torch.Tensor,
    batch_size: int,
    epochs: int,
    seed: int,
    width: int = 20,
    chunk: int = 250,
) -> dict[str, torch.Tensor]:
    """Train C one-hidden-layer MLPs at once (one per entry of ``lr``, ``wd``, ``hidden``).

    Returns ``val`` (C, epochs) validation losses after each epoch and ``test`` (C,) the final test
    loss (MSE in the target's units for regression, cross-entropy for classification)."""
    c = len(lr)
    xtr, ytr = split.x["train"], split.y["train"]
    d = xtr.shape[1]
    o = 1 if split.regression else int(split.y["train"].max()) + 1
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(width).view(1, -1) < hidden.view(-1, 1)).float()  # (C, H)
    params = init_stack(c, d, o, hidden, width, g)
    for p in params:
        p.requires_grad_(True)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    shape = {3: (c, 1, 1), 2: (c, 1)}
    lrs = [lr.view(shape[p.dim()]) for p in params]
    wds = [wd.view(shape[p.dim()]) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def forward(ps, x, sl=slice(None)):
        w1, b1, w2, b2 = (p[sl] for p in ps)
        cc = w1.shape[0]
        h = (x @ w1.permute(1, 0, 2).reshape(d, cc * width)).view(-1, cc, width).transpose(0, 1)
        h = torch.relu(h + b1.unsqueeze(1)) * mask[sl].unsqueeze(1)
        return torch.bmm(h, w2) + b2.unsqueeze(1)

    n = len(xtr)
    step = 0
    val = torch.empty(c, epochs)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            loss = _loss(forward(params, xtr[idx]), ytr[idx], split.regression).sum()
            grads = torch.autograd.grad(loss, params)
            step += 1
            with torch.no_grad():
                for p, gr, mm, vv, a, w in zip(params, grads, m, v, lrs, wds):
                    gr = gr + w * p
                    mm.mul_(beta1).add_(gr, alpha=1 - beta1)
                    vv.mul_(beta2).addcmul_(gr, gr, value=1 - beta2)
                    denom = (vv / (1 - beta2**step)).sqrt_().add_(eps)
                    p.sub_(a * (mm / (1 - beta1**step)) / denom)
        val[:, epoch] = _evaluate(forward, params, split, "val", c, chunk)
    test = _evaluate(forward, params, split, "test", c, chunk)
    if split.regression:  # MSE back in the target's units
        val = val * split.target_scale**2
        test = test * split.target_scale**2
    return {"val": val, "test": test}


@torch.no_grad()
def _evaluate(forward, params, split, part, c, chunk):
    out = torch.empty(c)
    for s in range(0, c, chunk):
        sl = slice(s, min(c, s + chunk))
        out[sl] = _loss(forward(params, split.x[part], sl), split.y[part], split.regression)
    return out


def grid_table(split: Split, epochs: int, seed: int, progress=None) -> dict[str, np.ndarray]:
    """Train the whole 10^4 grid; arrays indexed ``[lr, weight_decay, batch_size, hidden]``."""
    shape = tuple(len(v) for v in GRID.values())
    val = np.full(shape + (epochs,), np.nan, dtype=np.float32)
    test = np.full(shape, np.nan, dtype=np.float32)
    combos = list(itertools.product(range(len(RATES)), range(len(RATES)), range(len(HIDDEN))))
    il, iw, ih = (torch.tensor(t) for t in zip(*combos))
    lr = torch.tensor(RATES)[il]
    wd = torch.tensor(RATES)[iw]
    hid = torch.tensor(HIDDEN)[ih]
    for ib, bs in enumerate(BATCHES):
        res = train_stack(split, lr, wd, hid, bs, epochs, seed=seed * 1000 + ib)
        val[il.numpy(), iw.numpy(), ib, ih.numpy()] = res["val"].numpy()
        test[il.numpy(), iw.numpy(), ib, ih.numpy()] = res["test"].numpy()
        if progress is not None:
            progress.update(1)
    return {"val": val, "test": test}


def table_path(cache_dir: str, task: str, seed: int, epochs: int) -> str:
    return os.path.join(cache_dir, f"uci_{task}_seed{seed}_e{epochs}.npz")


def load_or_build_table(
    task: str, seed: int, epochs: int, data_dir: str, cache_dir: str, download: bool = False, split_seed: int = 0
) -> dict[str, np.ndarray]:
    """The oracle table of one (task, training seed), trained once and cached as ``.npz``."""
    path = table_path(cache_dir, task, seed, epochs)
    if os.path.isfile(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from tqdm import tqdm

    x, y = load_uci(task, data_dir, download)
    split = make_split(x, y, regression=(task == "wine"), split_seed=split_seed)
    with tqdm(total=len(BATCHES), desc=f"grid {task} seed {seed} ({epochs} epochs)", unit="batch size") as bar:
        table = grid_table(split, epochs, seed, progress=bar)
    os.makedirs(cache_dir, exist_ok=True)
    np.savez_compressed(path, **table)
    return table
