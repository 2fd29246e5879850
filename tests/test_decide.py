"""The deciding experiment's pipeline at toy scale on the CPU (benchmarks/decide.py): the driver with
two worker processes, the SGD arm's checkpoints and the sam-late arms branched from them, resuming
across calls (finished runs are not made again; a machine without the checkpoints makes the SGD
prefix again), the time budget, and the paired analysis of the runs it made."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from benchmarks.data import load_dataset
from benchmarks.decide import LEARNED_PLACEHOLDER, arm_label, arms, jobs, main, paired
from benchmarks.train import TrainConfig, sam_late_branch_epoch, train

#: a small CNN, 3 epochs of 4 steps, on the embedded Fashion-MNIST subset (a few seconds for all runs)
TOY = [
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
    "32",
    "--eval-batch-size",
    "256",
    "--epochs",
    "3",
    "--max-steps-per-epoch",
    "4",
    "--warmup-epochs",
    "0.5",
    "--lr",
    "0.1",
    "--interval",
    "1",
    "--device",
    "cpu",
    "--threads",
    "1",
]


def _logs(out):
    return {p.stem: json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))}


def _name(logs, label, seed, noise):
    hits = [
        n
        for n, r in logs.items()
        if arm_label(r["config"]) == label and r["config"]["seed"] == seed and r["config"]["label_noise"] == noise
    ]
    assert len(hits) == 1, (label, seed, noise, hits)
    return hits[0]


def test_arms_and_branch_points():
    """SGD and SAM are sam-late at budgets 0 and 1; the sam-late arms branch off the SGD run at the
    last epoch before their first SAM decision; the learned arms are there when a name is given."""
    labels = [a.label for a in arms([0.15, 0.3], "pol")]
    assert labels == [
        "sam",
        "sgd",
        "random@0.3",
        "ae-sam@0.3",
        "pol@0.3",
        "random@0.15",
        "ae-sam@0.15",
        "pol@0.15",
        "sam-late@0.3",
        "sam-late@0.15",
    ]
    # CIFAR-10 with 5% held out: 92 steps per epoch, 30 epochs, a decision every 10 steps
    assert sam_late_branch_epoch(0.3, 30, 92, 10) == 20 and sam_late_branch_epoch(0.15, 30, 92, 10) == 25
    assert sam_late_branch_epoch(0.3, 30, 92, "epoch") == 20  # the decision at epoch 21's end picks SAM
    base = TrainConfig(epochs=30, interval=10)
    js = jobs(base, [0], [0.0, 0.4], arms([0.15, 0.3], None), 92)
    assert len(js) == 16 and {j.cfg.run_name() for j in js}.__len__() == 16
    sgd = [j for j in js if j.arm.label == "sgd"]
    assert all(j.checkpoint_epochs == (20, 25) for j in sgd)
    late = [j for j in js if j.arm.label.startswith("sam-late")]
    assert {(j.arm.label, j.branch_epoch) for j in late} == {("sam-late@0.3", 20), ("sam-late@0.15", 25)}
    assert all(
        j.prefix.run_name() == s.cfg.run_name() for j in late for s in sgd if s.cfg.label_noise == j.cfg.label_noise
    )
    assert paired({0: 1.0, 1: 3.0, 2: 5.0}, {0: 0.0, 1: 1.0})["mean"] == 1.5  # seeds in both only


@pytest.mark.slow
def test_decide_dry_run_branches_resumes_and_analyses(tmp_path):
    out, ckpt = tmp_path / "toy", tmp_path / "ckpt"
    args = ["--out", str(out), "--checkpoint-dir", str(ckpt), "--seeds", "2", *TOY]
    first = main(["run", *args, "--workers", "2"])  # two processes share the runs through claim files
    assert first["missing"] == [] and len(first["made"]) == 2 * 2 * 8  # seeds x noise levels x arms
    assert LEARNED_PLACEHOLDER in first["skipped_learned"] and "not in the registry" in first["skipped_learned"]
    assert not list((out / "runs").glob("*.claim")) and not list(ckpt.glob("*.pt"))  # spent checkpoints dropped
    logs = _logs(out)
    data = load_dataset("fmnist-subset", max_train=400, max_test=100, val_fraction=0.05)
    for seed in (0, 1):
        for noise in (0.0, 0.4):
            sgd = logs[_name(logs, "sgd", seed, noise)]
            assert sgd["summary"]["step_share"] == {"sgd": 1.0}
            assert logs[_name(logs, "sam", seed, noise)]["summary"]["step_share"] == {"sam": 1.0}
            for b, epoch in ((0.3, 1), (0.15, 2)):
                late = logs[_name(logs, f"sam-late@{b:g}", seed, noise)]
                assert late["branched_from"]["epoch"] == epoch and late["branched_from"]["budget"] == 0.0
                assert late["epochs"][:epoch] == sgd["epochs"][:epoch]  # the SGD arm's prefix, shared
                assert late["summary"]["step_share"]["sam"] == math.floor(b * 12) / 12  # the last SAM steps
                for label in (f"random@{b:g}", f"ae-sam@{b:g}"):  # the budget holds whatever the policy says
                    run = logs[_name(logs, label, seed, noise)]
                    assert run["summary"]["grad_evals"] <= 12 * (1 + b)
            if noise:
                assert "label noise: 152 of 380 training labels" in sgd["data"]
    # a branched run is the run from scratch (on the CPU bit for bit)
    late = logs[_name(logs, "sam-late@0.3", 1, 0.4)]
    scratch = train(TrainConfig(**{**late["config"], "out_dir": None}), data=data, log=lambda s: None)
    keys = ("train_loss", "val_loss", "test_loss", "test_acc", "grad_evals")
    assert [[e[k] for k in keys] for e in scratch["epochs"]] == [[e[k] for k in keys] for e in late["epochs"]]
    assert scratch["choice_segments"] == late["choice_segments"]

    # another call: nothing is made again
    assert main(["run", *args])["made"] == []
    # a fresh machine without the checkpoints, two runs lost: only they are made, the branch from a
    # prefix made again, to the same numbers
    lost = [_name(logs, "sam-late@0.15", 0, 0.0), _name(logs, "random@0.3", 1, 0.4)]
    for n in lost:
        (out / "runs" / f"{n}.json").unlink()
    shutil.rmtree(ckpt, ignore_errors=True)
    again = main(["run", *args])
    assert sorted(again["made"]) == sorted(lost) and again["missing"] == []
    new = _logs(out)
    assert new[lost[0]]["branched_from"]["prefix_made_again"] is True
    for n in lost:
        assert [[e[k] for k in keys] for e in new[n]["epochs"]] == [[e[k] for k in keys] for e in logs[n]["epochs"]]
    # the time budget: a run that is not expected to end in time is not started
    (out / "runs" / f"{lost[1]}.json").unlink()
    short = main(["run", *args, "--time-budget", "5", "--run-overhead", "60"])
    assert short["made"] == [] and short["missing"] == [lost[1]]
    main(["run", *args])

    summary = main(["analyse", "--out", str(out)])
    assert [(c["label_noise"], len(c["arms"])) for c in summary["conditions"]] == [(0.0, 8), (0.4, 8)]
    table = (out / "table.md").read_text()
    assert "| sam | sgd | against SGD | 2 |" in table and "| ae-sam@0.15 | random@0.15 |" in table
    logs = _logs(out)
    clean = summary["conditions"][0]
    got = next(d for d in clean["differences"] if d["a"] == "sam" and d["b"] == "sgd")
    want = [
        100
        * (
            logs[_name(logs, "sam", s, 0.0)]["summary"]["final_test_acc"]
            - logs[_name(logs, "sgd", s, 0.0)]["summary"]["final_test_acc"]
        )
        for s in (0, 1)
    ]
    assert got["mean"] == pytest.approx(sum(want) / 2)
    sd = abs(want[0] - want[1]) / math.sqrt(2)
    assert got["half"] == pytest.approx(12.706 * sd / math.sqrt(2))
    assert {d["b"] for d in clean["differences"]} == {"sam-late@0.3", "random@0.3", "random@0.15", "sgd"}


def test_learned_policy_that_does_not_fit_is_skipped(tmp_path):
    """A shipped policy made without the budget features cannot drive the budgeted arms: its arms are
    skipped with the reason, before any run (here the time budget starts none of the others)."""
    res = main(
        [
            "run",
            "--out",
            str(tmp_path / "o"),
            "--seeds",
            "1",
            "--noise",
            "0",
            "--learned",
            "switch-sgd-sam",
            "--time-budget",
            "0",
            *TOY,
        ]
    )
    assert "does not fit the budgeted arms" in res["skipped_learned"] and res["made"] == []
    assert not any("switch-sgd-sam" in n for n in res["missing"]) and len(res["missing"]) == 8


@pytest.mark.slow
def test_learned_arms_run_a_policy_checkpoint(tmp_path):
    """--learned takes a checkpoint path too: a policy made for a budgeted sgd/sam switch runs its arms
    (here an untrained PPO policy, frozen), labelled by the file's name."""
    from rlopt import RLSwitchingOptimizer

    opt = RLSwitchingOptimizer(
        [torch.nn.Parameter(torch.zeros(1))],
        choices=["sgd", "sam"],
        policy="ppo",
        interval=1,
        total_steps=100,
        compute_budget=0.3,
    )
    opt.controller.policy.save(tmp_path / "pol.pt")
    res = main(
        [
            "run",
            "--out",
            str(tmp_path / "o"),
            "--checkpoint-dir",
            str(tmp_path / "ck"),
            "--seeds",
            "1",
            "--noise",
            "0",
            "--budgets",
            "0.3",
            "--learned",
            str(tmp_path / "pol.pt"),
            *TOY,
        ]
    )
    assert res["skipped_learned"] is None and res["missing"] == [] and len(res["made"]) == 6
    summary = main(["analyse", "--out", str(tmp_path / "o")])
    labels = [a["arm"] for a in summary["conditions"][0]["arms"]]
    assert "pol@0.3" in labels and len(labels) == 6
    run = _logs(tmp_path / "o")[_name(_logs(tmp_path / "o"), "pol@0.3", 0, 0.0)]
    assert run["summary"]["grad_evals"] <= 12 * 1.3


def test_branch_refusals(tmp_path):
    """A run starts only from its own run's checkpoint, or (sam-late) from a smaller budget's that
    spent nothing, no later than its branch point."""
    base = dict(
        dataset="fmnist-subset",
        model="small-cnn",
        width=4,
        max_train=200,
        max_test=50,
        batch_size=32,
        epochs=3,
        max_steps_per_epoch=2,
        warmup_epochs=0.5,
        lr=0.05,
        interval=1,
        device="cpu",
        out_dir=None,
        method="switch",
        threads=1,
    )
    data = load_dataset("fmnist-subset", max_train=200, max_test=50, val_fraction=0.1)

    def q(line):  # the runs' log lines: not wanted here
        pass

    sgd = TrainConfig(**base, budget=0.0)
    train(sgd, data=data, log=q, checkpoint_epochs=(1, 2), checkpoint_dir=tmp_path)
    ck1, ck2 = (tmp_path / f"{sgd.run_name()}_ep{e}.pt" for e in (1, 2))
    with pytest.raises(ValueError, match="at epoch 1 at the latest"):  # 6 steps: SAM from step 5 at 0.3
        train(TrainConfig(**base, budget=0.3), data=data, log=q, start_from=ck2)
    with pytest.raises(ValueError, match="differs from this run in \\['lr'\\]"):
        train(TrainConfig(**{**base, "lr": 0.1}, budget=0.3), data=data, log=q, start_from=ck1)
    rnd = TrainConfig(**base, policy="ss-sam", budget=0.0)  # at budget 0 it spends nothing either
    train(rnd, data=data, log=q, checkpoint_epochs=(1,), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="Only a sam-late switch run"):  # at 0.3 it would have drawn SAM
        train(
            TrainConfig(**base, policy="ss-sam", budget=0.3),
            data=data,
            log=q,
            start_from=tmp_path / f"{rnd.run_name()}_ep1.pt",
        )
    sam = TrainConfig(**base, budget=1.0)
    train(sam, data=data, log=q, checkpoint_epochs=(1,), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="spent budget"):
        train(TrainConfig(**base, budget=0.3), data=data, log=q, start_from=tmp_path / f"{sam.run_name()}_ep1.pt")
    # resuming a run's own checkpoint gives the uninterrupted run
    whole = train(sgd, data=data, log=q)
    resumed = train(sgd, data=data, log=q, start_from=ck2)
    assert [e["test_loss"] for e in resumed["epochs"]] == [e["test_loss"] for e in whole["epochs"]]
    assert resumed["branched_from"]["epoch"] == 2
    assert torch.equal(
        torch.tensor([e["train_loss"] for e in resumed["epochs"]]),
        torch.tensor([e["train_loss"] for e in whole["epochs"]]),
    )
