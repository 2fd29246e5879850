"""The CUDA code paths: fused inner kernels on the GPU, device-side signals, the lagged skip-run
poll, no host synchronisation in ordinary steps, checkpoints across devices.

Skipped without a GPU (CI has none); run on a GPU machine with ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import make_closure, make_data, make_model, roundtrip
from torch.nn import functional as F

from rlopt import SAM, QLearningRateOptimizer, RLSwitchingOptimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = torch.device("cuda")


def _cuda_setup(seed=0):
    x, y = make_data(seed)
    return make_model(seed).to(DEV), x.to(DEV), y.to(DEV)


def _reference(choice, params):
    if choice == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)
    if choice == "adam":
        return torch.optim.Adam(params, lr=0.1 * 0.01, fused=True)
    return SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)


def _steps_without_sync(step, n: int) -> None:
    """``n`` calls of ``step()``, any host synchronisation an error."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("choice", ["sgd", "adam", "sam"])
def test_constant_policy_equals_fused_torch_on_cuda(choice):
    m1, x, y = _cuda_setup()
    m2, _, _ = _cuda_setup()
    sgd = {"nesterov": True, "weight_decay": 5e-4}
    opt = RLSwitchingOptimizer(
        m1.parameters(),
        choices={"sgd": sgd, "sam": dict(sgd, rho=0.05), "adam": {}},
        policy=f"constant:{choice}",
        lr=0.1,
    )
    ref = _reference(choice, m2.parameters())
    for _ in range(8):
        l1 = opt.step(make_closure(m1, opt, x, y))
        c2 = make_closure(m2, ref, x, y)
        if choice == "sam":
            l2 = ref.step(c2)
        else:
            l2 = c2()
            ref.step()
        assert torch.equal(l1, l2)
        for p, q in zip(m1.parameters(), m2.parameters()):
            assert p.device.type == "cuda" and torch.equal(p, q)


@pytest.mark.parametrize("with_closure", [True, False])
def test_ordinary_steps_do_not_synchronise_with_the_host(with_closure):
    model, x, y = _cuda_setup()
    choices = ["sgd", "sam", "adam"] if with_closure else ["sgd", "adam"]  # SAM needs a closure
    opt = RLSwitchingOptimizer(model.parameters(), choices=choices, policy="ppo", interval="epoch", total_epochs=2)
    closure = make_closure(model, opt, x, y)

    def step():
        if with_closure:
            opt.step(closure)
        else:  # the loop without a closure: backward first, then step()
            closure()
            opt.step()

    step()  # first step: lazy state, warm-up
    _steps_without_sync(step, 20)
    opt.epoch_end(val_loss=1.0, val_acc=0.5)  # decisions may synchronise
    assert len(opt.history) == 2


@pytest.mark.filterwarnings("ignore:None of the last")  # no closure under GradScaler: no loss
def test_grad_scaler_fp16_loop_does_not_synchronise_and_matches_torch():
    """fp16 autocast with GradScaler: scaler.step(opt) calls the wrapper at every step (it supports
    AMP scaling as torch's fused optimizers do), with no host sync, and equals fused torch SGD
    stepped after ``scaler.unscale_``. (The wrapper unscales first, with GradScaler's own kernel;
    torch's fused CUDA SGD given ``grad_scale`` unscales inside its update kernel instead, which
    measured 2e-9 to 6e-8 apart from unscaling first on an H100, as torch's foreach SGD is.)"""
    results = []
    for wrapped in (True, False):
        model, x, y = _cuda_setup()
        opt = (
            RLSwitchingOptimizer(model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", lr=0.1)
            if wrapped
            else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
        )
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**14)

        def step(model=model, x=x, y=y, opt=opt, scaler=scaler, wrapped=wrapped):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            if not wrapped:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()

        step()  # warm-up
        if wrapped:
            _steps_without_sync(step, 10)
        else:  # the reference's own syncs are not under test
            for _ in range(10):
                step()
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters()):
        assert torch.equal(p, q)


def test_nonfinite_steps_are_skipped_on_cuda_and_a_long_run_raises():
    model, x, y = _cuda_setup()
    opt = RLSwitchingOptimizer(
        model.parameters(), choices=["sgd", "adam"], policy="constant:sgd", interval="epoch", max_nonfinite_steps=3
    )
    bad = [False]

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if bad[0]:
            loss = loss * float("nan")
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.inner_optimizers["sgd"].state[p]["momentum_buffer"].clone() for p in model.parameters()]
    bad[0] = True
    # The run length is folded every 32 steps and read from pinned memory once the copy has landed:
    # the error comes at the third consecutive bad step or within about 35 steps after it, never before.
    raised_at = None
    for i in range(1, 48):
        try:
            opt.step(closure)
        except RuntimeError as e:
            assert "not finite for" in str(e)
            raised_at = i
            break
        torch.cuda.synchronize()
    assert raised_at is not None and raised_at >= 3
    for p, q, m in zip(model.parameters(), before, momentum):
        assert torch.equal(p, q)
        assert torch.equal(opt.inner_optimizers["sgd"].state[p]["momentum_buffer"], m)


@pytest.mark.parametrize("policy,interval", [("ppo", 3), ("dqn", "epoch")])
def test_cuda_checkpoint_resumes_identically(policy, interval):
    def build(model):
        return RLSwitchingOptimizer(
            model.parameters(),
            choices=["sgd", "sam", "adam"],
            policy=policy,
            interval=interval,
            seed=3,
            total_steps=24,
            total_epochs=4,
        )

    m1, x, y = _cuda_setup()
    opt1 = build(m1)
    for k in range(12):
        opt1.step(make_closure(m1, opt1, x, y))
        if interval == "epoch" and k % 3 == 2:
            opt1.epoch_end(val_loss=1.0 / (k + 1), val_acc=0.1 * k / 12)
    saved_model, saved_opt = roundtrip(m1.state_dict()), roundtrip(opt1.state_dict())
    m2, _, _ = _cuda_setup(seed=1)
    m2.load_state_dict(saved_model)
    opt2 = build(m2)
    opt2.load_state_dict(saved_opt)
    for k in range(12, 24):
        for m, o in ((m1, opt1), (m2, opt2)):
            o.step(make_closure(m, o, x, y))
            if interval == "epoch" and k % 3 == 2:
                o.epoch_end(val_loss=1.0 / (k + 1), val_acc=0.1 * k / 12)
    assert [h["choice"] for h in opt1.history] == [h["choice"] for h in opt2.history]
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_cpu_checkpoint_loads_onto_cuda():
    m_cpu = make_model()
    x, y = make_data()
    opt = RLSwitchingOptimizer(m_cpu.parameters(), choices=["sgd", "sam"], policy="ppo", interval=2)
    for _ in range(6):
        opt.step(make_closure(m_cpu, opt, x, y))
    saved = roundtrip(opt.state_dict())
    m_gpu = make_model().to(DEV)
    m_gpu.load_state_dict(m_cpu.state_dict())
    opt2 = RLSwitchingOptimizer(m_gpu.parameters(), choices=["sgd", "sam"], policy="ppo", interval=2)
    opt2.load_state_dict(saved)
    for p in m_gpu.parameters():
        for v in opt2.inner_optimizers["sgd"].state[p].values():
            assert v.device.type == "cuda"
    opt2.step(make_closure(m_gpu, opt2, x.to(DEV), y.to(DEV)))


def test_learning_rate_agent_runs_on_cuda():
    model, x, y = _cuda_setup()
    opt = QLearningRateOptimizer(model.parameters(), lr=0.1, policy="dqn", interval=4, total_steps=40)
    losses = [opt.step(make_closure(model, opt, x, y)).detach() for _ in range(40)]
    assert len(opt.history) >= 10
    assert float(losses[-1]) < float(losses[0])


def _benchmarks():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a folder, not a package


def test_graphed_benchmark_model_trains_like_the_eager_one():
    """The benchmarks' --cuda-graph: a ResNet-18 whose forward and backward replay as CUDA graphs
    trains exactly as the eager one (the same kernels, with cuDNN's deterministic algorithms and no
    autotuning so both pick the same), a SAM step (two passes) included; the capture leaves the
    BatchNorm statistics as they were; eval mode, at another batch size, runs the model as before."""
    import copy

    _benchmarks()
    from benchmarks.models import build_model
    from benchmarks.train import graph_model

    flags = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        torch.manual_seed(0)
        eager = build_model("resnet18", 10, 3).to(DEV, memory_format=torch.channels_last)
        graphed = copy.deepcopy(eager)
        x = torch.randn(5, 16, 3, 32, 32, device=DEV)
        y = torch.randint(0, 10, (5, 16), device=DEV)
        batches = [xb.contiguous(memory_format=torch.channels_last) for xb in x]
        fwd = graph_model(graphed, batches[0], bf16=True)
        for b1, b2 in zip(eager.buffers(), graphed.buffers()):
            assert torch.equal(b1, b2)  # the warm-up's training-mode passes left no trace
        opts = [
            SAM(m.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, nesterov=True, fused=True)
            for m in (eager, graphed)
        ]
        for i, (xb, yb) in enumerate(zip(batches, y)):
            for f, opt in zip((eager, fwd), opts):

                def closure(f=f, opt=opt, xb=xb, yb=yb):
                    opt.zero_grad(set_to_none=True)
                    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                        out = f(xb)
                    loss = F.cross_entropy(out.float(), yb)
                    loss.backward()
                    return loss

                if i == 2:  # a SAM step: the graphs replayed twice, at w and at w + e
                    opt.step(closure)
                else:
                    closure()
                    opt.base_optimizer.step()
        for t1, t2 in zip([*eager.parameters(), *eager.buffers()], [*graphed.parameters(), *graphed.buffers()]):
            torch.testing.assert_close(t1, t2, rtol=0, atol=0)
        eager.eval()
        graphed.eval()
        with torch.no_grad():
            torch.testing.assert_close(graphed(x[0, :7]), eager(x[0, :7]), rtol=0, atol=0)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = flags


@pytest.mark.parametrize("method", ["sam", "ppo-sgd-sam"])
def test_benchmark_run_with_cuda_graph_trains_as_without(method):
    """train(cuda_graph=True) end to end (augmented batches, SAM's two passes, the RL wrapper, eval
    each epoch and back): its losses follow the eager run's. Not to the bit: train() lets cuDNN
    autotune, and the two runs may pick different algorithms."""
    _benchmarks()
    from benchmarks.train import TrainConfig, train

    kw = dict(
        dataset="fmnist-subset",
        model="resnet18",
        method=method,
        epochs=2,
        max_steps_per_epoch=4,
        batch_size=64,
        out_dir=None,
        interval=2,
    )
    runs = [train(TrainConfig(cuda_graph=g, **kw), log=lambda s: None) for g in (False, True)]
    for e1, e2 in zip(runs[0]["epochs"], runs[1]["epochs"]):
        assert e2["train_loss"] == pytest.approx(e1["train_loss"], rel=2e-2)
        assert e2["test_loss"] == pytest.approx(e1["test_loss"], rel=5e-2)
    assert runs[1]["summary"]["steps"] == 8


NCCL_SCRIPT = """
import sys, torch, torch.distributed as dist
from rlopt.control import distributed
from rlopt.policies import policy_class
dist.init_process_group("nccl", init_method=sys.argv[1], rank=0, world_size=1)
group = dist.group.WORLD
dev = distributed.collective_device(group, torch.device("cuda", 0))
assert dev.type == "cuda", dev
means, top = distributed.reduce_signals({"loss": 2.0, "val_acc": float("nan")}, {"skipped": 3}, group, dev)
assert means["loss"] == 2.0 and means["val_acc"] != means["val_acc"] and top["skipped"] == 3.0, (means, top)
policy = policy_class("ppo")(4, ("sgd", "sam"))
distributed.broadcast_policy(policy, group, dev)
assert distributed.agree(1, policy, group, dev) == 1
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_nccl_available(), reason="needs NCCL"
)
def test_nccl_collectives_take_tensors_on_the_model_device(tmp_path):
    # one rank is all one GPU allows: it runs every collective of rlopt.distributed through NCCL
    import subprocess
    import sys

    script = tmp_path / "nccl.py"
    script.write_text(NCCL_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])  # the child imports this checkout's rlopt, installed or not
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, str(script), f"file://{tmp_path / 'rdv'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr
