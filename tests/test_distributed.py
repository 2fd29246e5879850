"""Data-parallel runs (DDP over gloo, two CPU processes): every rank takes the same decisions.

Each rank trains on its own shard and is given its own seed; only rank 0 reports validation
metrics. With the default ``process_group="auto"`` the ranks must still see one observation,
choose one action and end with equal parameters and equal policies. With ``process_group=None``
(the control) they decide alone, and their observations differ.
"""
import subprocess
import sys
import textwrap

import pytest
import torch

from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

WORKER = textwrap.dedent("""
    import sys
    import warnings
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel
    from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer

    def run(case, rank):
        kind, policy, mode = case.split("-")
        sync = mode in ("sync", "diverge", "group")
        torch.manual_seed(0)  # the same initial model on both ranks
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
        net = DistributedDataParallel(model) if sync else model
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        x, y = torch.randn(12, 16, 8, generator=gen), torch.randint(0, 3, (12, 16), generator=gen)
        group = dist.new_group([0, 1]) if mode == "group" else "auto" if sync else None
        if kind == "switching":
            opt = RLSwitchingOptimizer(net.parameters(), choices=["sgd", "sam", "adam"], policy=policy,
                                       interval=3, lr=0.05, seed=rank, total_steps=12, process_group=group)
        else:
            opt = QLearningRateOptimizer(net.parameters(), lr=0.05, interval=3, seed=rank, total_steps=12,
                                         process_group=group)
        for i in range(12):
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(net(x[i]), y[i])
                loss.backward()
                return loss
            opt.step(closure)
            if mode == "diverge" and i == 5 and rank == 1:  # rank 1's policy goes its own way
                opt.policy.generator.manual_seed(12345)
            if i % 4 == 3:  # only rank 0 evaluates, a common habit
                opt.epoch_end(val_loss=1.0, val_acc=0.5 + 0.01 * i) if rank == 0 else opt.epoch_end()
        return {"choices": [h["choice"] for h in opt.history],
                "observations": [h["observation"] for h in opt.history],
                "rewards": [h["reward"] for h in opt.history],
                "params": [p.detach().clone() for p in model.parameters()],
                "policy": opt.policy.state_dict()}

    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    results = {}
    for case in sys.argv[4:]:
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            results[case] = run(case, rank)
        results[case]["disagreements"] = sum("ranks' policies chose different" in str(w.message) for w in log)
    torch.save(results, out)
    dist.destroy_process_group()
""")


CASES = ["switching-ppo-sync", "switching-dqn-sync", "lr-dqn-sync", "switching-ppo-group",
         "switching-random-diverge", "switching-ppo-alone"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results for every case, from one pair of processes (starting them dominates)."""
    tmp_path = tmp_path_factory.mktemp("ddp")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(outs[r]), *CASES],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the ranks did not finish within 180 s (a collective waited forever)")
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    return [torch.load(o, weights_only=True) for o in outs]


def _tensors(state):
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("-alone")])
def test_ranks_decide_together(ranks, case):
    a, b = ranks[0][case], ranks[1][case]
    assert a["choices"] == b["choices"]
    assert a["observations"] == b["observations"]
    assert a["rewards"] == b["rewards"]
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    ta, tb = _tensors(a["policy"]), _tensors(b["policy"])
    assert len(ta) == len(tb) and all(torch.equal(u, v) for u, v in zip(ta, tb))
    if case.startswith("switching"):
        assert len(set(a["choices"])) > 1  # the run did switch, so agreement was tested
    if not case.endswith("-diverge"):  # equal policies from the first decision (seeds 0 and 1): never a disagreement
        assert a["disagreements"] == b["disagreements"] == 0
    else:  # rank 1's generator was reseeded: the ranks disagreed, and took rank 0's action and policy
        assert a["disagreements"] == b["disagreements"] >= 1


def test_ranks_alone_differ(ranks):
    a, b = ranks[0]["switching-ppo-alone"], ranks[1]["switching-ppo-alone"]
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
    assert copy.deepcopy(opt)._process_group is None
    assert pickle.loads(pickle.dumps(opt))._process_group is None
