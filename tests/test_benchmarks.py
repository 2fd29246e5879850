"""Tests of the benchmarks package: metrics, data loaders, splits, smoke mode of every method,
the demo and overhead scripts at toy sizes, and the quickstart notebook (executed with nbclient)."""

import gzip
import json
import math
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the repository, not an installed package

from benchmarks.data import augment_crop_flip, iterate_batches, load_dataset, read_idx, stratified_split  # noqa: E402
from benchmarks.train import METHODS, classification_metrics, convergence_epoch, cosine_warmup  # noqa: E402

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ metrics
def test_macro_metrics_hand_case():
    # 3 classes. true: 0 0 0 1 1 2 ; pred: 0 0 1 1 2 2
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    m = classification_metrics(pred, target, 3)
    # per class precision: 2/2, 1/2, 1/2 ; recall: 2/3, 1/2, 1/1
    p = [1.0, 0.5, 0.5]
    r = [2 / 3, 0.5, 1.0]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r)]  # 0.8, 0.5, 2/3
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(sum(p) / 3)
    assert m["recall"] == pytest.approx(sum(r) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    assert m["f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_metrics_class_never_predicted_scores_zero():
    target = torch.tensor([0, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1])  # class 2 never predicted: precision 0 (zero_division=0), recall 0
    m = classification_metrics(pred, target, 3)
    assert m["precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["recall"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["f1"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_convergence_epoch_and_schedule():
    assert convergence_epoch([0.5, 0.80, 0.897, 0.905, 0.90]) == 3  # within 0.5 points of 0.90
    assert convergence_epoch([0.9]) == 1
    f = cosine_warmup(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.0, abs=1e-12)
    assert f(55) == pytest.approx(0.5)


# -------------------------------------------------------------------------------------- data
def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def _tagged_images(n, offset=0):
    """Images whose first two pixels encode a unique id (so splits can be checked by content)."""
    x = np.random.default_rng(offset).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    ids = np.arange(offset, offset + n)
    x[:, 0, 0], x[:, 0, 1] = ids // 256, ids % 256
    return x


def _ids(x):
    return (x[:, 0, 0, 0].long() * 256 + x[:, 0, 0, 1].long()).tolist()


@pytest.fixture
def idx_dir(tmp_path):
    d = tmp_path / "FashionMNIST" / "raw"  # the torchvision layout
    d.mkdir(parents=True)
    _write_idx(d / "train-images-idx3-ubyte.gz", _tagged_images(100))
    _write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(100) % 10)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", _tagged_images(20, offset=1000))
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return tmp_path


def test_read_idx_roundtrip(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00"))
    with pytest.raises(ValueError):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("sub", [".", "FashionMNIST/raw"])
def test_fashion_mnist_idx_loader_and_cache(idx_dir, tmp_path, sub):
    cache = tmp_path / "cache"
    ds = load_dataset(
        "fashion-mnist", data_dir=idx_dir / sub if sub != "." else idx_dir, cache_dir=cache, val_fraction=0.2, seed=0
    )
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape == (80, 1, 28, 28)
    assert ds.val_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (20, 1, 28, 28)
    assert ds.train_y.dtype == torch.int64 and ds.num_classes == 10 and ds.in_channels == 1
    assert torch.bincount(ds.val_y, minlength=10).tolist() == [2] * 10  # stratified
    assert len(list(cache.glob("*.npz"))) == 1
    again = load_dataset("fmnist", data_dir=idx_dir, cache_dir=cache, val_fraction=0.2, seed=0)  # from the cache
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)


def test_validation_split_is_disjoint_from_train(idx_dir, tmp_path):
    ds = load_dataset("fashion-mnist", data_dir=idx_dir, cache_dir=tmp_path / "c", val_fraction=0.3, seed=1)
    tr, va, te = set(_ids(ds.train_x)), set(_ids(ds.val_x)), set(_ids(ds.test_x))
    assert not tr & va and tr | va == set(range(100)) and te == set(range(1000, 1020))
    other = load_dataset("fashion-mnist", data_dir=idx_dir, cache_dir=tmp_path / "c", val_fraction=0.3, seed=2)
    assert set(_ids(other.val_x)) != va  # the split follows the seed
    # and on the real embedded subset
    keep, held = stratified_split(np.arange(1000) % 10, 0.1, seed=0)
    assert not set(keep) & set(held) and len(keep) + len(held) == 1000


def test_missing_data_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_dataset("cifar10", data_dir=tmp_path, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("imagenet", data_dir=tmp_path)


def _image_tree(root, n_per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = {}
    for split in ("train", "test"):
        for cls in ("cat", "airplane"):  # not in sorted order on purpose
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                arr = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.png")
                images[(split, cls, i)] = arr
    return images


def test_image_folder_and_tar_loaders(tmp_path):
    images = _image_tree(tmp_path / "tree")
    ds = load_dataset("cifar10", data_dir=tmp_path / "tree", cache_dir=tmp_path / "c", val_fraction=0.0)
    assert ds.classes == ["airplane", "cat"]
    assert ds.train_x.shape == (6, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32) and len(ds.val_y) == 0
    # PNG is lossless: pixels and labels exactly as written, channel-first
    np.testing.assert_array_equal(ds.test_x[0].permute(1, 2, 0).numpy(), images[("test", "airplane", 0)])
    assert ds.test_y.tolist() == [0, 0, 0, 1, 1, 1]
    tar_path = tmp_path / "cifar10-jpeg.tar.gz"  # the same tree inside an archive, one folder deeper
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname="cifar10")
    from_tar = load_dataset("cifar10", data_dir=tar_path, cache_dir=tmp_path / "c2", val_fraction=0.0)
    assert torch.equal(from_tar.train_x, ds.train_x) and torch.equal(from_tar.test_y, ds.test_y)


def test_embedded_subset():
    ds = load_dataset("fmnist-subset")
    assert ds.train_x.dtype == torch.uint8 and ds.train_x.shape[1:] == (1, 28, 28)
    assert len(ds.train_y) + len(ds.val_y) == 5000 and len(ds.test_y) == 1000
    assert torch.bincount(ds.train_y).tolist() == [450] * 10
    assert (ROOT / "rlopt" / "meta" / "data" / "fmnist_subset.npz").stat().st_size < 4_000_000


def test_augmentation_and_batches():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).reshape(2, 3, 4, 4)
    y = augment_crop_flip(x, pad=0, flip=True, generator=torch.Generator().manual_seed(0))
    for a, b in zip(x, y):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)
    z = augment_crop_flip(x, pad=2, flip=False, generator=torch.Generator().manual_seed(1))
    assert z.shape == x.shape and z.dtype == torch.uint8
    # a crop of the zero-padded image: every non-zero value sits at its original position shifted
    for a, b in zip(x, z):
        pad = torch.nn.functional.pad(a, (2, 2, 2, 2))
        assert any(torch.equal(pad[:, i : i + 4, j : j + 4], b) for i in range(5) for j in range(5))
    labels = torch.arange(10)
    seen = torch.cat(
        [
            yb
            for _, yb in iterate_batches(
                labels, labels, 3, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0)
            )
        ]
    )
    assert len(seen) == 9 and len(set(seen.tolist())) == 9


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_augmentation_matches_a_per_image_reference(pad_mode):
    """The batched crop-and-flip equals cropping and flipping each image by hand with the same
    random draws (row offsets, column offsets, flips, in that order), and leaves the generator where
    those draws leave it: runs seeded before the gather was rewritten draw the same augmentations."""
    n, pad = 37, 3
    x = torch.randint(0, 256, (n, 3, 7, 9), dtype=torch.uint8)
    g = torch.Generator().manual_seed(4)
    ref_g = torch.Generator().manual_seed(4)
    for _ in range(2):
        out = augment_crop_flip(x, pad=pad, flip=True, generator=g, pad_mode=pad_mode)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=ref_g)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=ref_g)
        flips = torch.rand(n, generator=ref_g) < 0.5
        mode = "constant" if pad_mode == "zeros" else pad_mode
        for i in range(n):
            padded = torch.nn.functional.pad(x[i : i + 1].float(), (pad,) * 4, mode=mode)[0].to(torch.uint8)
            crop = padded[:, dy[i] : dy[i] + 7, dx[i] : dx[i] + 9]
            assert torch.equal(out[i], crop.flip(2) if flips[i] else crop)
        assert torch.equal(g.get_state(), ref_g.get_state())
    assert out.is_contiguous(memory_format=torch.channels_last)  # normalize's channels_last copy is free


# ------------------------------------------------------------------------------- end to end
def test_smoke_every_method(tmp_path):
    from benchmarks.table import main

    out = main(["--smoke", "--out", str(tmp_path / "smoke")])
    assert [r["method"] for r in out["rows"]] == list(METHODS)
    for name in ("table.md", "table.csv", "summary.json", "curves.png", "rewards.png", "choices.png"):
        assert (tmp_path / "smoke" / name).is_file(), name
    logs = sorted((tmp_path / "smoke" / "runs").glob("*.json"))
    assert len(logs) == len(METHODS)
    for p in logs:
        run = json.loads(p.read_text())
        cfg = run["config"]
        assert cfg["max_steps_per_epoch"] == 3 and cfg["epochs"] == 2 and cfg["device"] == "cpu"
        assert len(run["epochs"]) == 2 and run["summary"]["steps"] == 6
        assert 0.0 <= run["summary"]["final_test_acc"] <= 1.0
        assert abs(sum(run["summary"]["step_share"].values()) - 1.0) < 1e-9
        if cfg["method"] in (
            "dqn-sgd-sam",
            "ppo-sgd-sam",
            "ppo-sgd-sam-adamw",
            "random-sgd-sam",
            "random-sgd-sam-adam",
        ):
            assert run["decisions"] and any(d["reward"] is not None for d in run["decisions"])
        if cfg["method"] == "sam-every-k":
            assert run["summary"]["step_share"] == {"sgd": 0.5, "sam": 0.5}
            assert run["summary"]["grad_evals"] == 9
        if cfg["method"] == "sam":
            assert run["summary"]["grad_evals"] == 12


def test_run_logs_older_than_a_config_field_stay_reusable(tmp_path):
    """A run log written before a TrainConfig field existed counts as having its default: the main
    tables' logs predate compile_mode and cuda_graph and must still aggregate."""
    import dataclasses

    from benchmarks.table import _reusable
    from benchmarks.train import TrainConfig

    cfg = TrainConfig(method="sgd", out_dir=str(tmp_path))
    saved = dataclasses.asdict(cfg)
    del saved["cuda_graph"], saved["compile_mode"]
    path = tmp_path / f"{cfg.run_name()}.json"
    path.write_text(json.dumps({"config": saved}))
    assert _reusable(cfg) is not None
    assert _reusable(dataclasses.replace(cfg, cuda_graph=True)) is None  # a run without graphs is not one with
    path.write_text(json.dumps({"config": {**saved, "lr": 0.1}}))
    assert _reusable(cfg) is None


def test_table_in_pieces_matches_random_share_and_aggregates(tmp_path):
    """Two processes' worth of --claim runs, then --aggregate-only: random switching gets the SAM
    share of ppo-sgd-sam's run of the same seed; a missing run is listed, not invented."""
    from benchmarks.table import main

    tiny = [
        "--dataset",
        "fmnist-subset",
        "--model",
        "small-cnn",
        "--width",
        "4",
        "--max-train",
        "400",
        "--max-test",
        "100",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--max-steps-per-epoch",
        "4",
        "--interval",
        "2",
        "--device",
        "cpu",
        "--seeds",
        "1",
        "--out",
        str(tmp_path / "t"),
    ]
    first = main(tiny + ["--methods", "sgd", "ppo-sgd-sam", "--claim"])
    assert "rows" not in first and not list((tmp_path / "t" / "runs").glob("*.claim"))
    main(tiny + ["--methods", "random-sgd-sam", "--claim"])
    agg = main(tiny + ["--methods", "sgd", "ppo-sgd-sam", "random-sgd-sam", "sam", "--aggregate-only"])
    assert [r["method"] for r in agg["rows"]] == ["sgd", "ppo-sgd-sam", "random-sgd-sam"]
    assert agg["missing"] == ["fmnist-subset_small-cnn_sam_e2_s0_pad-reflect"]
    ppo, rnd = agg["runs"]["ppo-sgd-sam"][0], agg["runs"]["random-sgd-sam"][0]
    assert rnd["config"]["sam_share"] == round(ppo["summary"]["step_share"].get("sam", 0.0), 4)
    assert "missing runs" in (tmp_path / "t" / "table.md").read_text()
    # the three-way control takes all three step shares of the shipped three-way policy's run
    skipped = main(tiny + ["--methods", "random-sgd-sam-adam"])
    assert skipped["missing"] == ["fmnist-subset_small-cnn_random-sgd-sam-adam_e2_s0_pad-reflect"]
    three = main(tiny + ["--methods", "pre-sgd-sam-adam", "random-sgd-sam-adam"])
    pre, rnd3 = three["runs"]["pre-sgd-sam-adam"][0], three["runs"]["random-sgd-sam-adam"][0]
    shares = pre["summary"]["step_share"]
    assert rnd3["config"]["random_probs"] == ",".join(f"{shares.get(c, 0.0):.4f}" for c in ("sgd", "sam", "adam"))
    assert set(rnd3["summary"]["step_share"]) <= {"sgd", "sam", "adam"}


def test_demo_and_overhead_scripts_run(tmp_path):
    from benchmarks import demo, overhead

    res = demo.main(
        ["--epochs", "1", "--methods", "ppo-sgd-sam-adamw", "sgd", "--out", str(tmp_path / "demo"), "--threads", "1"]
    )
    assert set(res) == {"ppo-sgd-sam-adamw", "sgd"} and (tmp_path / "demo" / "demo.png").is_file()
    r = overhead.main(
        [
            "--cases",
            "mlp",
            "--repeats",
            "2",
            "--block",
            "5",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ovh"),
        ]
    )
    assert set(r[0]["overhead"]) == {"wrapper, interval=epoch", "wrapper, interval=50"}
    assert (tmp_path / "ovh.md").is_file()
    counted = overhead.main(
        [
            "--cases",
            "mlp",
            "--repeats",
            "0",
            "--block",
            "20",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ops"),
        ]
    )[0]
    assert "overhead" not in counted and counted["step_ops"]["plain"]["all"] == 3.0
    assert "not timed" in (tmp_path / "ops.md").read_text()


def test_speed_script_variants_and_repeats(tmp_path):
    """benchmarks.speed: every (variant, method) runs once per round; a row pools the timed epochs of
    its runs and lists each round's median; bars are judged per variant; bad input is refused."""
    from benchmarks import speed
    from benchmarks.train import TrainConfig

    res = speed.main(
        [
            "--dataset",
            "fmnist-subset",
            "--model",
            "small-cnn",
            "--methods",
            "sgd",
            "sam",
            "--variants",
            "eager",
            "--repeats",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--max-steps-per-epoch",
            "2",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "sp"),
        ]
    )
    assert list(res["rows"]) == ["sgd [eager]", "sam [eager]"]
    for row in res["rows"].values():
        assert len(row["all_s"]) == 2 and all(len(s) == 2 for s in row["all_s"])
        timed = [s[1] for s in row["all_s"]]  # epoch 1 of each run is not counted
        assert row["round_medians_s"] == timed and row["median_s"] == pytest.approx(sum(timed) / 2)
    b = res["bars"]
    assert not b["applicable"] and set(b["variants"]) == {"eager"}
    assert b["variants"]["eager"]["sam_ratio"] == pytest.approx(
        res["rows"]["sam [eager]"]["median_s"] / res["rows"]["sgd [eager]"]["median_s"]
    )
    md = (tmp_path / "sp.md").read_text()
    assert "| sam [eager] | 2 |" in md and "2 rounds" in md
    assert json.loads((tmp_path / "sp.json").read_text())["repeats"] == 2
    # a variant sets torch.compile and its mode; None keeps the config's own
    cfg = speed._variant_config(TrainConfig(compile=True, compile_mode="max-autotune"), "sgd", None)
    assert (cfg.compile, cfg.compile_mode) == (True, "max-autotune")
    cfg = speed._variant_config(TrainConfig(), "sam", "reduce-overhead")
    assert (cfg.method, cfg.compile, cfg.compile_mode) == ("sam", True, "reduce-overhead")
    assert speed._variant_config(TrainConfig(), "sgd", "default").compile_mode is None
    assert not speed._variant_config(TrainConfig(compile=True), "sgd", "eager").compile
    cfg = speed._variant_config(TrainConfig(compile=True), "sgd", "cuda-graph")
    assert (cfg.compile, cfg.cuda_graph) == (False, True)
    for bad, msg in (
        ({"repeats": 0}, "Invalid repeats"),
        ({"variants": ["jit"]}, "Unknown variant"),
        ({"methods": ["sg"]}, "Unknown method"),
        ({"variants": ["cuda-graph"]}, "needs a CUDA device"),
    ):
        kw = {"methods": ["sgd"], "base": TrainConfig(dataset="no-such-data"), **bad}
        with pytest.raises(ValueError, match=msg):  # refused before the data set is looked up
            speed.measure(**kw)
    from benchmarks.train import train

    with pytest.raises(ValueError, match="Unknown compile_mode"):
        train(TrainConfig(dataset="no-such-data", compile=True, compile_mode="fast"))
    with pytest.raises(ValueError, match="compile is not"):
        train(TrainConfig(dataset="no-such-data", compile_mode="reduce-overhead"))
    with pytest.raises(ValueError, match="exclude each other"):
        train(TrainConfig(dataset="no-such-data", compile=True, cuda_graph=True))
    with pytest.raises(ValueError, match="cuda_graph needs a CUDA device"):
        train(TrainConfig(dataset="no-such-data", cuda_graph=True, device="cpu"))


def test_speed_script_goes_on_after_a_failing_row(tmp_path, monkeypatch):
    """A row whose run raises is reported and not run again; the other rows are still measured,
    and a row asked for twice runs once per round."""
    from benchmarks import speed

    real_train = speed.train

    def train(cfg, **kw):
        if cfg.method == "sam":
            raise RuntimeError("capture failed")
        return real_train(cfg, **kw)

    monkeypatch.setattr(speed, "train", train)
    res = speed.main(
        [
            "--dataset",
            "fmnist-subset",
            "--model",
            "small-cnn",
            "--methods",
            "sam",
            "sgd",
            "sgd",
            "--repeats",
            "2",
            "--epochs",
            "2",
            "--batch-size",
            "256",
            "--max-steps-per-epoch",
            "1",
            "--threads",
            "1",
            "--out",
            str(tmp_path / "sp"),
        ]
    )
    assert list(res["rows"]) == ["sgd"] and len(res["rows"]["sgd"]["all_s"]) == 2
    assert res["errors"] == {"sam": "RuntimeError: capture failed"}
    assert "**sam failed** (not run again): `RuntimeError: capture failed`" in (tmp_path / "sp.md").read_text()


def test_overhead_paired_statistic_and_pooling(tmp_path):
    from benchmarks import overhead

    # a slow drift between rounds hits both configurations of a round alike: the paired figure sees
    # the wrapper's constant +1%, the ratio of medians does not
    plain = [10.0, 10.0, 10.0, 20.0, 20.0]
    times = {
        "plain": plain,
        "wrapper, interval=epoch": [1.01 * p for p in plain],
        "wrapper, interval=50": [1.01 * p for p in plain[:3]] + [10.1, 10.1],
    }
    pairs = overhead.paired_overheads(times)
    assert pairs["wrapper, interval=epoch"] == pytest.approx([0.01] * 5)
    assert pairs["wrapper, interval=50"][-1] == pytest.approx(-0.495)
    lo, hi = overhead.median_ci([0.01] * 9 + [0.5])
    assert lo == pytest.approx(0.01) and hi <= 0.5
    run = {
        "environment": {"gpu": "X", "device": "cuda", "torch": "2"},
        "results": [
            {
                "case": "resnet18",
                "repeats": 5,
                "all_step_ms": times,
                "median_step_ms": {"plain": 10.0},
                "overhead": {n: 0.0 for n in overhead.BARS},
            }
        ],
    }
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"r{i}.json"))
        (tmp_path / f"r{i}.json").write_text(json.dumps(run))
    overhead.main(["--pool", *paths, "--out", str(tmp_path / "pooled")])
    md = (tmp_path / "pooled.md").read_text()
    assert "| wrapper, interval=epoch | 10 | +1.0% | [+1.0%, +1.0%] | 3% | yes | yes |" in md


def test_sam_payoff_study_runs(tmp_path):
    from benchmarks import sam_payoff

    out = sam_payoff.main(["--tasks", "4", "--variant-tasks", "0", "--out", str(tmp_path / "sp")])
    assert json.loads((tmp_path / "sp.json").read_text())["meta"] == json.loads(json.dumps(out["meta"]))
    assert "| sam_last - sgd |" in (tmp_path / "sp.md").read_text()


def test_quickstart_notebook_executes(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = ROOT / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "epoch 5:" in outputs and "steps per optimizer" in outputs
    assert any(
        "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )


# ------------------------------------------------------------------------------- policy probe
@pytest.mark.parametrize("name", ["switch-sgd-sam", "lr-dqn"])
def test_policy_probe_on_logged_decisions(tmp_path, name):
    import rlopt
    from benchmarks.policy_probe import main as probe_main

    policy = rlopt.load_policy(name)
    dim = policy.describe()["obs_dim"]
    gen = torch.Generator().manual_seed(0)
    obs = (torch.rand(5, dim, generator=gen) * 2 - 1).tolist()
    log = tmp_path / "run.json"
    log.write_text(json.dumps({"decisions": [{"observation": o} for o in obs]}))
    res = probe_main([name, str(log)])
    assert res["decisions"] == 5
    shares = [v["greedy_share"] for v in res["actions"].values()]
    assert sum(shares) == pytest.approx(1.0)
    if res["kind"] == "probabilities":  # checked against the policy itself
        first = policy.probabilities(torch.tensor(obs[0]))
        means = torch.stack([policy.probabilities(torch.tensor(o)) for o in obs]).mean(0)
        assert [v["mean"] for v in res["actions"].values()] == pytest.approx(means.tolist())
        assert all(v["min"] <= p <= v["max"] for v, p in zip(res["actions"].values(), first.tolist()))
    else:
        q = torch.stack([policy.q_values(torch.tensor(o)) for o in obs])
        assert shares == pytest.approx([(q.argmax(1) == i).float().mean().item() for i in range(q.shape[1])])


def test_policy_probe_by_feature(tmp_path):
    import rlopt
    from benchmarks.policy_probe import main as probe_main

    policy = rlopt.load_policy("switch-sgd-sam")
    names = policy.obs_layout["names"]
    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(12, len(names), generator=gen) * 2 - 1
    log = tmp_path / "run.json"
    log.write_text(json.dumps({"decisions": [{"observation": o} for o in obs.tolist()]}))
    by = probe_main(["switch-sgd-sam", str(log), "--by", "progress", "sam"])["by"]
    assert sum(b["decisions"] for b in by["bins"]) == 12
    p_sam = torch.stack([policy.probabilities(o) for o in obs])[:, 1]
    x = obs[:, names.index("progress")]
    assert by["correlation"] == pytest.approx(float(torch.corrcoef(torch.stack([x, p_sam]))[0, 1]), abs=1e-5)
    with pytest.raises(ValueError, match="Unknown feature"):
        probe_main(["switch-sgd-sam", str(log), "--by", "speed", "sam"])


def test_pre_methods_take_a_checkpoint_path(tmp_path):
    import rlopt
    from benchmarks.train import TrainConfig, _Stepper
    from rlopt.meta.tasks import TaskDistribution
    from rlopt.meta.train_policy import train_policy

    path = tmp_path / "candidate.pt"
    train_policy(
        episodes=1,
        out=path,
        progress=False,
        threads=None,
        distribution=TaskDistribution(data=("teacher",), epochs=(1,), n_train=(64,)),
    )
    params = [torch.nn.Parameter(torch.zeros(3))]
    stepper = _Stepper(TrainConfig(method="pre-sgd-sam", pretrained=str(path)), params, steps_per_epoch=4, fused=False)
    expected = rlopt.load_policy(path)
    for a, b in zip(stepper.rl.policy.state_dict()["actor"].values(), expected.state_dict()["actor"].values()):
        assert torch.equal(a, b)
    assert not stepper.rl.policy.training


def test_policy_eval_pairs_policies_with_their_controls(tmp_path):
    from benchmarks import policy_eval

    out = policy_eval.main(
        [
            "switch-sgd-sam",
            "--tasks",
            "2",
            "--data",
            "teacher",
            "--task",
            "epochs=2",
            "--task",
            "n_train=64",
            "--task",
            "mlp_width=8",
            "--task",
            "interval=epoch",
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    s = out["summary"]
    assert set(s) == {"sgd", "sam", "switch-sgd-sam", "random@switch-sgd-sam"}
    assert s["sgd"]["sam_share"] == 0.0 and s["sam"]["sam_share"] == 1.0 and s["sam"]["grad_evals_x_sgd"] == 2.0
    assert s["sgd"]["vs_sgd"]["mean"] == 0.0 and "vs_random_same_share" in s["switch-sgd-sam"]
    for row in out["rows"]:  # a policy that chose SGD throughout ran exactly the sgd arm
        if row["arms"]["switch-sgd-sam"]["sam_share"] == 0.0:
            assert row["arms"]["switch-sgd-sam"]["val_acc"] == row["arms"]["sgd"]["val_acc"]
    assert "| random@switch-sgd-sam |" in (tmp_path / "ev.md").read_text()
    with pytest.raises(SystemExit):
        policy_eval.main(["switch-sgd-sam-adam", "--tasks", "1"])  # three actions: not a sgd/sam policy


def test_welch_difference_and_verdicts_against_best_static():
    """The difference table: Welch's interval worked by hand, and verdicts that the interval decides."""
    from benchmarks.table import compare_to_best_static, welch_diff

    # a: 0.90 ± 0.01, b: 0.88 ± 0.02, three runs each. Var of the means 1e-4/3 and 4e-4/3; Welch df
    # (5e-4/3)^2 / ((1e-4/3)^2/2 + (4e-4/3)^2/2) = 2.94 -> 2, t = 4.303; half-width 4.303 * sqrt(5e-4/3)
    diff, half = welch_diff({"mean": 0.90, "std": 0.01}, {"mean": 0.88, "std": 0.02}, 3, 3)
    assert diff == pytest.approx(0.02) and half == pytest.approx(4.303 * math.sqrt(5e-4 / 3))
    assert math.isnan(welch_diff({"mean": 0.9, "std": math.nan}, {"mean": 0.8, "std": 0.01}, 1, 3)[1])

    def row(method, mean, std, n=3, ge=100.0):
        return {"method": method, "n": n, "final_test_acc": {"mean": mean, "std": std}, "grad_evals": {"mean": ge}}

    rows = [
        row("sgd", 0.900, 0.001),
        row("sam", 0.920, 0.001, ge=200.0),
        row("ppo-sgd-sam", 0.950, 0.001, ge=150.0),
        row("random-sgd-sam", 0.921, 0.02),
        row("pre-sgd-sam", 0.80, 0.001),
        row("dqn-sgd-sam", 0.93, 0.0, n=1),
    ]
    md = "\n".join(compare_to_best_static(rows))
    assert "`sam`" in md  # the best static by mean; ppo's higher mean does not make it "static"
    verdicts = {
        ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[4]
        for ln in md.splitlines()
        if ln.startswith("| ") and not ln.startswith("| method")
    }
    assert verdicts == {
        "sgd": "worse",
        "ppo-sgd-sam": "better",
        "random-sgd-sam": "not separable",
        "pre-sgd-sam": "worse",
        "dqn-sgd-sam": "too few runs",
    }
    assert "| ppo-sgd-sam | 3 | +3.00 |" in md and md.splitlines()[-4].endswith("| 0.75 |")
    assert compare_to_best_static([row("ppo-sgd-sam", 0.9, 0.01)]) == []


def test_control_pairs_report_each_learned_method_against_its_control():
    """The controls section: A - B with the same Welch interval, only for pairs present in the table."""
    from benchmarks.table import compare_pairs, welch_diff

    def row(method, mean, std, n=3):
        return {"method": method, "n": n, "final_test_acc": {"mean": mean, "std": std}}

    rows = [
        row("ppo-sgd-sam", 0.950, 0.001),
        row("random-sgd-sam", 0.921, 0.02),
        row("sgd", 0.90, 0.001),
        row("lr-dqn", 0.80, 0.001),
    ]
    md = compare_pairs(rows, ["ppo-sgd-sam:random-sgd-sam", "lr-dqn:sgd", "dqn-sgd-sam:random-sgd-sam"])
    lines = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| A ")]
    assert len(lines) == 2  # dqn-sgd-sam is not in the table
    diff, half = welch_diff(rows[0]["final_test_acc"], rows[1]["final_test_acc"], 3, 3)
    assert lines[0] == (
        f"| ppo-sgd-sam | random-sgd-sam | {100 * diff:+.2f} | "
        f"[{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}] | not separable |"
    )
    assert lines[1].startswith("| lr-dqn | sgd | -10.00 |") and lines[1].endswith("| B better |")
    assert compare_pairs(rows, ["sam:sgd"]) == []


def test_resnet_init_option():
    """--init pytorch swaps torchvision's conv init (Kaiming-normal, fan-out) for PyTorch's layer
    default; it changes the run name, and bad values are refused."""
    from benchmarks.models import build_model
    from benchmarks.train import TrainConfig

    torch.manual_seed(0)
    tv = build_model("resnet18", 10, 3).layer1[0].conv1.weight.detach()
    torch.manual_seed(0)
    pt = build_model("resnet18", 10, 3, init="pytorch").layer1[0].conv1.weight.detach()
    # 64 -> 64 channels, 3x3: fan-out std sqrt(2 / 576) = 0.059; default bound 1 / sqrt(576), std 0.024
    assert float(tv.std()) == pytest.approx(math.sqrt(2 / 576), rel=0.05)
    assert float(pt.std()) == pytest.approx(1 / math.sqrt(576) / math.sqrt(3), rel=0.05)
    assert TrainConfig(init="pytorch", pad_mode="zeros").run_name().endswith("_s0_init-pytorch")
    assert TrainConfig(pad_mode="zeros").run_name().endswith("_s0")
    with pytest.raises(ValueError, match="Unknown init"):
        build_model("resnet18", 10, 3, init="xavier")
    with pytest.raises(ValueError, match="small CNN"):
        build_model("small-cnn", 10, 1, init="pytorch")


def test_reflect_padding_option():
    """--pad-mode reflect (the default) crops from the mirrored image (no black border); it is in
    the run name, zero padding is not (the names of the zero-padded main tables' runs), and a bad
    value is refused before any data is loaded."""
    from benchmarks.train import TrainConfig, train

    x = torch.randint(1, 256, (16, 3, 6, 6), dtype=torch.uint8)
    z = augment_crop_flip(x, pad=2, flip=False, generator=torch.Generator().manual_seed(0), pad_mode="reflect")
    assert bool((z > 0).all())  # zero padding would bring zeros into most crops
    for a, b in zip(x, z):
        ref = torch.nn.functional.pad(a[None].float(), (2, 2, 2, 2), mode="reflect")[0].to(torch.uint8)
        assert any(torch.equal(ref[:, i : i + 6, j : j + 6], b) for i in range(5) for j in range(5))
    with pytest.raises(ValueError, match="Unknown pad_mode"):
        augment_crop_flip(x, pad=2, pad_mode="edge")
    assert TrainConfig(pad_mode="reflect").run_name().endswith("_s0_pad-reflect")
    assert TrainConfig().pad_mode == "reflect" and TrainConfig().run_name().endswith("_s0_pad-reflect")
    assert TrainConfig(pad_mode=None).pad_mode == "zeros"  # the old spelling of zero padding
    assert (
        TrainConfig(init="pytorch", pad_mode="reflect", tag="t").run_name().endswith("_s0_init-pytorch_pad-reflect_t")
    )
    # a graphed or compiled run does not overwrite the log of the eager one
    assert TrainConfig(cuda_graph=True, tag="t", pad_mode="zeros").run_name().endswith("_s0_cudagraph_t")
    assert TrainConfig(compile=True).run_name().endswith("_s0_pad-reflect_compile-default")
    assert (
        TrainConfig(compile=True, compile_mode="reduce-overhead", pad_mode="zeros")
        .run_name()
        .endswith("_s0_compile-reduce-overhead")
    )
    for bad, msg in ((dict(pad_mode="edge"), "pad_mode"), (dict(init="xavier"), "init"), (dict(method="sg"), "method")):
        with pytest.raises(ValueError, match=f"Unknown {msg}"):
            train(TrainConfig(dataset="no-such-data", **bad))  # refused before the data set is looked up


def test_graph_model_leaves_batchnorm_statistics_as_they_were(monkeypatch):
    """--cuda-graph's capture runs the model in training mode several times (torch's warm-up); the
    BatchNorm statistics are put back afterwards. CUDA graphs themselves: tests/test_cuda.py."""
    from benchmarks.models import build_model
    from benchmarks.train import graph_model

    captured = []

    def fake_make_graphed_callables(module, sample_args):
        for _ in range(4):  # 3 warm-up passes and the capture, as torch does
            module(*sample_args)
        captured.append(sample_args[0].shape)
        return module

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_make_graphed_callables)
    model = build_model("resnet18", 10, 3)
    before = [b.clone() for b in model.buffers()]
    assert graph_model(model, torch.randn(4, 3, 32, 32), bf16=False) is model
    assert captured == [(4, 3, 32, 32)]
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert model.training


def test_run_logs_name_the_commit(monkeypatch):
    """environment() records the code's commit: $RLOPT_COMMIT when set (a copied tree), else git's
    where there is a checkout, else None."""
    import subprocess

    from benchmarks import train as tr

    monkeypatch.delenv("RLOPT_COMMIT", raising=False)
    root = Path(tr.__file__).resolve().parent.parent
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert tr.environment(torch.device("cpu"))["commit"].split("+")[0] == head.stdout.strip()
        monkeypatch.setenv("RLOPT_COMMIT", "abc123")  # the tree's own commit, named by the copier
        assert tr.source_commit() == "abc123"
        monkeypatch.delenv("RLOPT_COMMIT")

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(tr.subprocess, "run", no_git)
    monkeypatch.setenv("RLOPT_COMMIT", "abc123")
    assert tr.source_commit() == "abc123"
    monkeypatch.delenv("RLOPT_COMMIT")
    assert tr.source_commit() is None


@pytest.mark.parametrize(
    "folder", ["cifar10_resnet18_e30", "fashion-mnist_resnet18_e30", "cifar10_floor/black", "cifar10_floor/reflect"]
)
def test_committed_run_logs_still_resolve(folder):
    """The committed tables' run logs (zero padding, then the default, with pad_mode None or no
    pad_mode at all; and the reflect-padded floor runs) still load: their config read by today's
    TrainConfig names the same file and matches it, so tables aggregate and runs are reused."""
    import dataclasses

    from benchmarks.table import _reusable
    from benchmarks.train import TrainConfig, logged_config

    logs = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results" / folder / "runs").glob("*.json"))
    assert logs, folder
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for path in logs[:6]:
        cfg = logged_config(json.loads(path.read_text())["config"])
        tc = TrainConfig(**{k: v for k, v in cfg.items() if k in fields})
        assert tc.run_name() == path.stem, path
        assert tc.pad_mode == ("reflect" if "pad-reflect" in path.stem else "zeros")
        assert _reusable(dataclasses.replace(tc, out_dir=str(path.parent))) is not None, path


def test_symmetric_label_noise():
    """Exactly round(p * n) labels change, each to another class, seeded; 0 changes nothing."""
    from benchmarks.data import symmetric_label_noise

    y = torch.arange(1000) % 10
    noisy, idx = symmetric_label_noise(y, 0.4, 10, seed=3)
    assert len(idx) == 400 and int((noisy != y).sum()) == 400 and bool((noisy[idx] != y[idx]).all())
    assert torch.equal(y, torch.arange(1000) % 10)  # the input is left as it is
    again, _ = symmetric_label_noise(y, 0.4, 10, seed=3)
    other, _ = symmetric_label_noise(y, 0.4, 10, seed=4)
    assert torch.equal(noisy, again) and not torch.equal(noisy, other)
    counts = torch.bincount(noisy[idx], minlength=10)  # spread over the other classes
    assert int(counts.min()) > 20
    assert torch.equal(symmetric_label_noise(y, 0.0, 10, seed=3)[0], y)
    with pytest.raises(ValueError, match="Invalid label noise"):
        symmetric_label_noise(y, 1.5, 10, seed=0)


def test_label_noise_in_training_runs():
    """--label-noise corrupts the training labels the run trains on, with the run's seed; the
    validation and test labels stay clean; it is part of the run name."""
    from benchmarks.data import symmetric_label_noise
    from benchmarks.train import TrainConfig, train

    data = load_dataset("fmnist-subset", max_train=200, max_test=50, val_fraction=0.1)
    val_y, test_y, train_y = data.val_y.clone(), data.test_y.clone(), data.train_y.clone()
    kw = dict(
        dataset="fmnist-subset",
        model="small-cnn",
        width=4,
        max_train=200,
        max_test=50,
        batch_size=32,
        epochs=1,
        max_steps_per_epoch=2,
        device="cpu",
        out_dir=None,
        method="sgd",
        threads=1,
    )
    noisy = train(TrainConfig(**kw, label_noise=0.4), data=data, log=lambda s: None)
    clean = train(TrainConfig(**kw), data=data, log=lambda s: None)
    assert "label noise: 72 of 180 training labels" in noisy["data"] and "label noise" not in clean["data"]
    assert noisy["epochs"][0]["train_loss"] != clean["epochs"][0]["train_loss"]
    assert noisy["epochs"][0]["test_loss"] != clean["epochs"][0]["test_loss"]
    assert torch.equal(data.val_y, val_y) and torch.equal(data.test_y, test_y) and torch.equal(data.train_y, train_y)
    assert symmetric_label_noise(train_y, 0.4, 10, seed=0)[1].numel() == 72
    assert TrainConfig(label_noise=0.4, pad_mode="zeros").run_name().endswith("_s0_noise0.4")
    assert TrainConfig(label_noise=0.4, cuda_graph=True).run_name().endswith("_s0_pad-reflect_noise0.4_cudagraph")
    with pytest.raises(ValueError, match="Invalid label_noise"):
        train(TrainConfig(dataset="no-such-data", label_noise=-0.1))
