"""Data-parallel runs (DDP over gloo, two CPU processes): every rank takes the same decisions.

Each rank trains on its own shard and is given its own seed; only rank 0 reports validation
metrics. With the default ``process_group="auto"`` the ranks must still see one observation,
choose one action and end with equal parameters and equal policies. With ``process_group=None``
(the control) they decide alone, and their observations differ.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

WORKER = Path(__file__).with_name("ddp_worker.py")
SYNCED = [
    "switching-ppo-sync",
    "switching-dqn-sync",
    "lr-dqn-sync",
    "switching-ppo-group",
    "switching-random-diverge",
    "switching-ppo-val",
    "switching-ppo-lossnan",
    "switching-ppo-gradnan",
]
CASES = SYNCED + ["switching-ppo-alone", "outside"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results for every case, from one pair of processes (starting them dominates)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(r), init, str(outs[r]), *CASES],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the ranks did not finish within 180 s (a collective waited forever)")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return Ranks(torch.load(o, weights_only=True) for o in outs)


class Ranks(list):
    """Both ranks' results; ``case(name)`` gives them, or fails with a rank's error."""

    def case(self, name):
        for r in self:
            if "error" in r[name]:
                pytest.fail(f"case {name} raised:\n{r[name]['error']}")
        return [r[name] for r in self]


def _tensors(state):
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


@pytest.mark.parametrize("case", SYNCED)
def test_ranks_decide_together(ranks, case):
    a, b = ranks.case(case)
    assert a["choices"] == b["choices"]
    assert a["observations"] == b["observations"]
    assert a["rewards"] == b["rewards"]
    for p, q in zip(a["params"], b["params"]):  # both ranks run the same code on all-reduced
        assert torch.equal(p, q)  # gradients: equal by construction
    ta, tb = _tensors(a["policy"]), _tensors(b["policy"])
    assert len(ta) == len(tb) and all(torch.equal(u, v) for u, v in zip(ta, tb))
    assert a["skipped"] == b["skipped"]
    if case.startswith("switching") and not case.endswith("-gradnan"):
        assert len(set(a["choices"])) > 1  # the run did switch, so agreement was tested
    if not case.endswith("-diverge"):  # equal policies from the first decision (seeds 0 and 1): never a disagreement
        assert a["disagreements"] == b["disagreements"] == 0
    else:  # rank 1's generator was reseeded: the ranks disagreed, and took rank 0's action and policy
        assert a["disagreements"] == b["disagreements"] >= 1


def test_validation_is_averaged_over_the_ranks_that_gave_it(ranks):
    # epoch 1: rank 0 gave loss 1.0 and accuracy 0.53, rank 1 3.0 and 0.1; epoch 2: rank 0 0.8 and
    # 0.57, rank 1 the accuracy 0.2 alone; epoch 3: rank 0 alone (0.6, 0.61). Rank 1's old loss must
    # not come back, also after every rank loaded rank 0's checkpoint mid-run.
    for res in ranks.case("switching-ppo-val"):
        assert res["val_loss"][1:] == pytest.approx([2.0, 0.8, 0.6])
        assert res["val_acc"][1:] == pytest.approx([0.315, 0.385, 0.61])


def test_one_ranks_nonfinite_loss_skips_no_step(ranks):
    # rank 1's loss at step 6 is NaN while every gradient is finite: no rank skips it, none raises
    # (max_nonfinite_steps=1), and the replicas stay equal (checked above)
    for res in ranks.case("switching-ppo-lossnan"):
        assert res["raised"] is None and sum(res["skipped"]) == 0


def test_nonfinite_gradients_raise_on_every_rank_at_the_same_decision(ranks):
    a, b = ranks.case("switching-ppo-gradnan")
    assert a["raised"] is not None and a["raised"] == b["raised"]
    assert "not finite" in a["raised"][1]


def test_subgroups_and_copies(ranks):
    for res in ranks.case("switching-ppo-group"):
        assert res["deepcopy_keeps_group"]
        assert res["pickled_group"] is None and res["pickle_warned"]
        assert res["pickled_auto_in_group"]
    for res in ranks.case("outside"):
        assert res["decisions"] == 4  # rank 1 outside the group, rank 0 alone in it: no waiting


def test_ranks_alone_differ(ranks):
    a, b = ranks.case("switching-ppo-alone")
    assert a["observations"][1:] != b["observations"][1:]  # their own losses and seeds


def test_process_group_argument_errors():
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="Invalid process_group"):
        RLSwitchingOptimizer(params, choices=["sgd"], process_group="world")
    with pytest.raises(TypeError, match="Invalid process_group"):
        QLearningRateOptimizer(params, process_group=3)
    opt = RLSwitchingOptimizer(params, choices=["sgd"], process_group=None)  # no group: decides alone
    opt.epoch_end()
    assert opt.choice == "sgd"


def test_copies_keep_the_process_group_setting():
    import copy
    import pickle

    opt = RLSwitchingOptimizer([torch.nn.Parameter(torch.zeros(2))], choices=["sgd"], process_group=None)
    assert copy.deepcopy(opt).controller.process_group is None
    assert pickle.loads(pickle.dumps(opt)).controller.process_group is None
