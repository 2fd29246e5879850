"""The meta-training task distribution: the classic tasks run as they always did, the ResNet
tasks train with the real-training recipe (crops, flips, weight decay, warm-up then cosine), and a
missing CIFAR-10 subset falls back clearly."""

from __future__ import annotations

import dataclasses
import io
import math
import tarfile

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from rlopt import RLSwitchingOptimizer
from rlopt.meta.tasks import PRESETS, TaskDistribution, augment_batch, build_task, lr_factor, run_episode


def _old_loop(task, opt):
    """The classic tasks' training loop, written out: what run_episode must still do for them."""
    cfg = task.config
    for _ in range(cfg.epochs):
        order = torch.randperm(cfg.n_train, generator=task.generator)
        for i in range(cfg.steps_per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb, yb = task.train_x[idx], task.train_y[idx]

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = F.cross_entropy(task.model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
        with torch.no_grad():
            out = task.model(task.val_x)
        opt.epoch_end(
            val_loss=float(F.cross_entropy(out, task.val_y)),
            val_acc=float((out.argmax(1) == task.val_y).float().mean()),
        )


def _opt(task, policy="random", **kw):
    cfg = task.config
    return RLSwitchingOptimizer(
        task.model.parameters(),
        choices=["sgd", "sam"],
        policy=policy,
        lr=cfg.lr,
        interval=cfg.interval,
        total_steps=cfg.total_steps,
        total_epochs=cfg.epochs,
        process_group=None,
        **kw,
    )


def test_classic_tasks_run_exactly_as_the_written_out_loop():
    cfg = TaskDistribution(data=("teacher",), epochs=(2,)).sample(torch.Generator().manual_seed(1), 1)
    assert (cfg.schedule, cfg.augment, cfg.weight_decay, cfg.val_split) == ("constant", False, 0.0, "train")
    a, b = build_task(cfg), build_task(cfg)
    run_episode(a, _opt(a))
    _old_loop(b, _opt(b))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_the_default_distribution_is_the_classic_preset_and_draws_no_resnets():
    assert TaskDistribution() == TaskDistribution.preset("classic")
    g = torch.Generator().manual_seed(0)
    assert all(TaskDistribution().sample(g, i).model in ("mlp", "cnn") for i in range(50))
    with pytest.raises(ValueError, match="Unknown task preset"):
        TaskDistribution.preset("nope")


def test_lr_factor_warms_up_then_decays_to_zero():
    total, warm = 100, 0.1
    f = [lr_factor("warmup-cosine", s, total, warm) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(x > y for x, y in zip(f[10:], f[11:]))
    assert 0 < f[-1] < 1e-3 and lr_factor("warmup-cosine", total, total, warm) == pytest.approx(0.0)
    assert lr_factor("constant", 5, 10, 0.0) == 1.0
    with pytest.raises(ValueError, match="Unknown schedule"):
        lr_factor("step", 0, 10, 0.0)


def test_augment_batch_crops_and_flips():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, g, pad=0, flip=False), x)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=2, flip=True)
    assert out.shape == x.shape
    padded = F.pad(x, (2, 2, 2, 2))
    for n in range(2):  # every output is some 4x4 window of the padded image, or its mirror image
        wins = [padded[n, :, i : i + 4, j : j + 4] for i in range(5) for j in range(5)]
        assert any(torch.equal(out[n], w) or torch.equal(out[n], w.flip(-1)) for w in wins)


def _fake_cifar(path, n_train=60, n_test=30):
    rng = np.random.default_rng(0)
    np.savez(
        path,
        train_x=rng.integers(0, 255, (n_train, 3, 32, 32), dtype=np.uint8),
        train_y=(np.arange(n_train) % 10).astype(np.uint8),
        test_x=rng.integers(0, 255, (n_test, 3, 32, 32), dtype=np.uint8),
        test_y=(np.arange(n_test) % 10).astype(np.uint8),
    )


def test_resnet_tasks_train_with_the_recipe_on_both_data_sets(tmp_path):
    path = tmp_path / "c.npz"
    _fake_cifar(path)
    dist = TaskDistribution.preset(
        "resnet",
        cifar10_path=str(path),
        resnet_n_train=(40,),
        n_val=20,
        resnet_epochs=(2,),
        resnet_width=(4,),
        resnet_batch_size=(16,),
    )
    g, seen = torch.Generator().manual_seed(0), set()
    for i in range(12):
        cfg = dist.sample(g, i)
        seen.add(cfg.data)
        assert (cfg.model, cfg.schedule, cfg.augment, cfg.val_split) == ("resnet", "warmup-cosine", True, "test")
        assert cfg.weight_decay == 5e-4 and cfg.label_noise in (0.0, 0.2, 0.4)
    assert seen == {"cifar10", "fmnist"}
    cfg = dataclasses.replace(cfg, data="cifar10", image_size=16)
    task = build_task(cfg, cifar10_path=path)
    assert task.train_x.shape == (40, 3, 16, 16) and task.val_x.shape == (20, 3, 16, 16)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in task.model.modules())
    opt = _opt(task, policy="constant:sgd", weight_decay=cfg.weight_decay)
    out = run_episode(task, opt)
    assert len(out["val_curve"]) == 2 and math.isfinite(out["val_loss"])
    assert opt.param_groups[0]["lr"] < cfg.lr * 0.2  # the cosine ended near zero (4 steps here)
    again = build_task(cfg, cifar10_path=path)
    run_episode(again, _opt(again, policy="constant:sgd", weight_decay=cfg.weight_decay))
    assert all(torch.equal(p, q) for p, q in zip(task.model.parameters(), again.model.parameters()))


def test_missing_cifar_subset_falls_back_to_fmnist_and_says_so(tmp_path, monkeypatch):
    dist = TaskDistribution.preset("resnet", cifar10_path=str(tmp_path / "missing.npz"))
    g = torch.Generator().manual_seed(0)
    assert {dist.sample(g, i).data for i in range(20)} == {"fmnist"}
    d = dist.describe()
    assert d["cifar10_available"] is False and "fell back to fmnist" in d["note"]
    monkeypatch.setattr("rlopt.meta.tasks.cifar10_subset_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="make_subset"):
        build_task(dataclasses.replace(dist.sample(g, 0), data="cifar10"))


def test_overrides_and_validation():
    d = TaskDistribution.preset("resnet").with_overrides(["resnet_width=8", "augment=0", "label_noise=0.4"])
    assert d.resnet_width == (8,) and d.augment is False and d.label_noise == (0.4,)
    with pytest.raises(ValueError, match="image_size"):
        TaskDistribution(image_size=(24,))
    with pytest.raises(ValueError, match="resnet_share"):
        TaskDistribution(resnet_share=1.5)
    assert set(PRESETS) == {"classic", "resnet"}


def test_make_subset_reads_a_cifar_tar(tmp_path):
    from PIL import Image

    from benchmarks.make_subset import main

    tar_path = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for split in ("train", "test"):
            for c in ("cat", "dog"):
                for k in range(3):
                    buf = io.BytesIO()
                    Image.fromarray(np.full((32, 32, 3), 40 * k, dtype=np.uint8)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{split}/{c}/{k:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
    out = tmp_path / "sub.npz"
    main(
        [
            "--dataset",
            "cifar10",
            "--data-dir",
            str(tmp_path),
            "--per-class-train",
            "2",
            "--per-class-test",
            "1",
            "--out",
            str(out),
        ]
    )
    with np.load(out) as d:
        assert d["train_x"].shape == (4, 3, 32, 32) and d["test_x"].shape == (2, 3, 32, 32)
        assert sorted(d["train_y"].tolist()) == [0, 0, 1, 1] and list(d["classes"]) == ["cat", "dog"]
