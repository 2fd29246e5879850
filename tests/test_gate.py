"""The gate study's statistics and one instance end to end on a tiny task."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from benchmarks.gate import ARMS, _SamOverSgd, analyse, cv_r2, run_instance, t_interval


def test_t_interval():
    m, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and lo == pytest.approx(2.0 - 4.302653 / math.sqrt(3)) and hi == pytest.approx(4 - lo)
    assert math.isnan(t_interval([1.0])[1])


def test_cv_r2_is_out_of_sample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    groups = [i // 5 for i in range(200)]
    assert cv_r2(x, 3 * x + 0.01 * rng.normal(size=200), groups) > 0.99
    assert cv_r2(x, rng.normal(size=200), groups) < 0.02  # no signal: about zero or below, never fitted noise


def test_sam_over_sgd_is_sam():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    sgd = torch.optim.SGD([w], lr=0.1)
    A = torch.tensor([1.0, 3.0])

    def closure():
        sgd.zero_grad()
        loss = 0.5 * (A * w * w).sum()
        loss.backward()
        return loss

    g = A * w.detach()
    e = 0.05 * g / g.norm()
    expected = w.detach() - 0.1 * A * (w.detach() + e)
    _SamOverSgd(sgd, 0.05).step(closure)
    assert torch.allclose(w.detach(), expected)


def _row(task, seed, accs, windows):
    arms = {
        a: {"val_acc": acc, "val_loss": 1.0 - acc, "budget_used": 0.3, "sam_share": 0.3} for a, acc in zip(ARMS, accs)
    }
    return {
        "key": f"{task}/{seed}",
        "task": task,
        "seed": seed,
        "config": {"label_noise": 0.2 * (task % 2)},
        "short": "t",
        "arms": arms,
        "windows": windows,
        "seconds": 1.0,
    }


def test_analyse_reads_paired_differences_and_the_verdict():
    rng = np.random.default_rng(1)
    rows = []
    for t in range(6):
        for s in range(2):
            wins = [
                {"gain_loss": 0.1 * sh + 0.001 * rng.normal(), "gain_acc": 0.0, "sharpness": sh, "progress": p}
                for sh, p in zip(rng.uniform(1, 2, 4), (0.2, 0.4, 0.6, 0.8))
            ]
            rows.append(_row(t, s, [0.5, 0.52 + 0.001 * t, 0.515, 0.505], wins))
    s = analyse(rows, folds=3)
    c = s["comparisons"]["SAM - SGD"]["val_acc"]
    assert c["n"] == 6 and c["lo"] > 0 and c["mean"] == pytest.approx(2.25, abs=0.01)
    assert s["comparisons"]["SAM-late - random (same budget)"]["val_acc"]["mean"] == pytest.approx(1.0)
    assert s["windows"]["cv_r2"]["sharpness"] > 0.9 and s["verdict"]["passes"]


@pytest.mark.slow
def test_one_instance_end_to_end():
    from rlopt.meta.tasks import TaskDistribution

    dist = TaskDistribution.preset(
        "resnet", data=("fmnist",), resnet_width=(4,), resnet_n_train=(128,), resnet_epochs=(4,), n_val=64
    )
    cfg = dist.sample(torch.Generator().manual_seed(0), 0)
    r = run_instance(
        {
            "key": "0/0",
            "task": 0,
            "config": dataclasses.asdict(cfg),
            "budget": 0.3,
            "interval": 1,
            "fracs": [0.25, 0.5],
            "window_frac": 0.25,
            "rho": 0.05,
            "cifar10": None,
        }
    )
    assert set(r["arms"]) == set(ARMS) and len(r["windows"]) == 2
    assert r["arms"]["sam-late"]["budget_used"] <= 0.3 + 1e-9 and r["arms"]["random"]["budget_used"] <= 0.3 + 1e-9
    assert all(math.isfinite(w["sharpness"]) and math.isfinite(w["gain_loss"]) for w in r["windows"])
