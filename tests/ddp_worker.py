"""One rank of the two-process DDP runs of tests/test_distributed.py (gloo on the CPU).

usage: python ddp_worker.py RANK INIT_METHOD OUT CASE [CASE ...]; writes {case: result} to OUT.
A case is KIND-POLICY-MODE. Each rank trains on its own shard with its own seed; only rank 0
reports validation metrics unless the mode says otherwise.
"""

import copy
import pickle
import sys
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from rlopt import QLearningRateOptimizer, RLSwitchingOptimizer

STEPS = 12


def run(case, rank):
    kind, policy, mode = case.split("-")
    sync = mode != "alone"
    torch.manual_seed(0)  # the same initial model on both ranks
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    net = DistributedDataParallel(model) if sync else model
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
    x, y = torch.randn(STEPS, 16, 8, generator=gen), torch.randint(0, 3, (STEPS, 16), generator=gen)
    if mode == "gradnan" and rank == 1:
        x[4:] = float("nan")  # from step 5 on: NaN gradients on every rank once DDP has averaged them
    group = dist.new_group([0, 1]) if mode == "group" else "auto" if sync else None
    interval = "epoch" if mode == "val" else 3
    common = dict(
        interval=interval,
        lr=0.05,
        seed=rank,
        total_steps=STEPS,
        process_group=group,
        max_nonfinite_steps=2 if mode == "gradnan" else 1,
    )
    if kind == "switching":
        opt = RLSwitchingOptimizer(net.parameters(), choices=["sgd", "sam", "adam"], policy=policy, **common)
    else:
        opt = QLearningRateOptimizer(net.parameters(), **common)
    raised = None
    for i in range(STEPS):

        def closure(i=i):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[i]), y[i])
            loss.backward()
            if mode == "lossnan" and rank == 1 and i == 5:  # this rank's loss only: its gradient is finite
                return loss.detach() * float("nan")
            return loss

        try:
            opt.step(closure)
        except RuntimeError as err:
            raised = (i, str(err))
            break
        if mode == "diverge" and i == 5 and rank == 1:  # rank 1's policy goes its own way
            opt.policy.generator.manual_seed(12345)
        if mode == "val" and i == 5:  # a checkpoint of rank 0, loaded by every rank mid-epoch
            holder = [opt.state_dict() if rank == 0 else None]
            dist.broadcast_object_list(holder, src=0)
            opt.load_state_dict(holder[0])
        if i % 4 == 3:
            epoch = i // 4
            if rank == 0:  # rank 0 evaluates every epoch
                opt.epoch_end(val_loss=1.0 - 0.2 * epoch, val_acc=0.5 + 0.01 * i)
            elif mode == "val" and epoch == 0:  # rank 1: both metrics at the first epoch,
                opt.epoch_end(val_loss=3.0, val_acc=0.1)
            elif mode == "val" and epoch == 1:  # the accuracy alone at the second, none at the third
                opt.epoch_end(val_acc=0.2)
            else:
                opt.epoch_end()
    out = {
        "choices": [h["choice"] for h in opt.history],
        "observations": [h["observation"] for h in opt.history],
        "rewards": [h["reward"] for h in opt.history],
        "val_loss": [h["signals"]["val_loss"] for h in opt.history],
        "val_acc": [h["signals"]["val_acc"] for h in opt.history],
        "skipped": [h["signals"]["skipped"] for h in opt.history],
        "params": [p.detach().clone() for p in model.parameters()],
        "policy": opt.policy.state_dict(),
        "raised": raised,
    }
    if mode == "group":
        twin = copy.deepcopy(opt)
        out["deepcopy_keeps_group"] = twin.controller.process_group is group and twin._in_group()
        with warnings.catch_warnings(record=True) as log:
            warnings.simplefilter("always")
            out["pickled_group"] = pickle.loads(pickle.dumps(opt)).controller.process_group
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "auto" pickles as it is, and the copy is in step at once
            out["pickled_auto_in_group"] = pickle.loads(pickle.dumps(opt_auto(net))).controller.group is not None
        out["pickle_warned"] = any("does not keep its ProcessGroup" in str(w.message) for w in log)
    return out


def opt_auto(net):
    return RLSwitchingOptimizer(net.parameters(), choices=["sgd", "adam"], policy="constant:sgd")


def outside_member(rank):
    """A group of rank 0 alone: rank 1 is outside it, and both decide alone without waiting."""
    group = dist.new_group([0])
    opt = RLSwitchingOptimizer(
        [torch.nn.Parameter(torch.zeros(2))],
        choices=["sgd", "adam"],
        policy="random",
        interval=1,
        seed=rank,
        process_group=group,
    )
    for _ in range(3):
        opt.param_groups[0]["params"][0].grad = torch.ones(2)
        opt.step()
    return {"decisions": len(opt.history)}


def main():
    rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    results = {}
    for case in sys.argv[4:]:
        try:
            with warnings.catch_warnings(record=True) as log:
                warnings.simplefilter("always")
                results[case] = outside_member(rank) if case == "outside" else run(case, rank)
        except Exception:  # reported by the case's own test
            results[case] = {"error": traceback.format_exc()}
            continue
        results[case]["disagreements"] = sum("ranks' policies chose different" in str(w.message) for w in log)
    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
