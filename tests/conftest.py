"""Small shared fixtures and helpers for the rlopt core tests.

Everything is tiny (a 4-8-3 MLP on 16 samples) and seeded with local generators, so the
whole suite runs in seconds on a CPU and never depends on the global torch RNG.
"""

from __future__ import annotations

import io
import math
import os
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

# Tiny tensors: intra-op threads only add synchronisation (50x slower on a busy 2-core machine).
torch.set_num_threads(1)

#: Shifts every seed of make_model / make_data. CI runs the numerics tests a second time with
#: another value (and another CPU kernel path): a bit-exact assertion must hold on any data, not
#: only on the inputs one machine happened to draw.
SEED_OFFSET = int(os.environ.get("RLOPT_TEST_SEED_OFFSET", "0"))


def make_model(seed: int = 0, d_in: int = 4, hidden: int = 8, d_out: int = 3) -> nn.Module:
    """A tiny MLP initialised from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + SEED_OFFSET)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def make_data(seed: int = 0, n: int = 16, d_in: int = 4, n_classes: int = 3):
    g = torch.Generator().manual_seed(seed + SEED_OFFSET)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y


def two_groups(model: nn.Module, **second):
    """Param groups: the first layer with its own lr/weight decay, the second with ``second``."""
    return [
        {"params": list(model[0].parameters()), "lr": 0.05, "weight_decay": 1e-3},
        {"params": list(model[2].parameters()), **second},
    ]


def make_closure(model: nn.Module, opt, x, y, loss_fn=None):
    loss_fn = loss_fn or (lambda out, t: F.cross_entropy(out, t))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return closure


def roundtrip(obj):
    """torch.save -> torch.load(weights_only=True), through memory."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def normalize(obj):
    """Nested structure with NaN made comparable (NaN != NaN breaks dict equality)."""
    if isinstance(obj, dict):
        return {k: normalize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [normalize(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if isinstance(obj, torch.Tensor):
        return ("tensor", obj.tolist())
    return obj


def assert_state_equal(a, b, exact: bool = True, rtol: float = 1e-5, atol: float = 1e-7):
    """Compare two optimizer ``state`` mappings (param -> dict of tensors/numbers) value by value."""
    assert len(a) == len(b)
    for sa, sb in zip(a.values(), b.values()):
        assert set(sa) == set(sb), (set(sa), set(sb))
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                if exact:
                    assert torch.equal(va, vb), key
                else:
                    torch.testing.assert_close(va, vb, rtol=rtol, atol=atol, msg=key)
            else:
                assert va == vb, key


@pytest.fixture
def data():
    return make_data()


# The autouse checks below apply to the core test modules, whose tests never use the global RNG.
_STRICT_MODULES = {"test_sam", "test_switching", "test_policies", "test_features"}


@pytest.fixture(autouse=True)
def _no_global_rng_use(request):
    """Every test leaves the global torch RNG where it found it (rlopt must not consume it)."""
    before = torch.get_rng_state()
    yield
    if request.module.__name__.rsplit(".", 1)[-1] in _STRICT_MODULES:
        assert torch.equal(before, torch.get_rng_state()), "the global torch RNG was consumed"


@pytest.fixture(autouse=True)
def _fused_warnings_are_errors(request):
    """On CPU every built-in choice has fused kernels: a 'runs without fused kernels' warning
    means rlopt fell back silently. Tests that force fused=False catch it explicitly."""
    if request.module.__name__.rsplit(".", 1)[-1] not in _STRICT_MODULES:
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*runs without fused kernels.*")
        yield


def assert_tree_equal(a, b, path="root"):
    """Exact recursive equality of nested dicts/lists/tensors (NaN equals NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b) or (
            a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        ), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)
