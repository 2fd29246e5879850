"""Per-step overhead of RLSwitchingOptimizer over the plain inner optimizer.

``python -m benchmarks.overhead`` times, in one process and on the same model and batch,

- ``plain``: ``torch.optim.SGD(lr, momentum=0.9, nesterov=True, weight_decay=5e-4, fused=True)``;
- ``wrapper, interval=epoch``: ``RLSwitchingOptimizer(choices={"sgd": same settings}, policy="constant:sgd")``;
- ``wrapper, interval=50``: the same, deciding every 50 steps;

A step is ``zero_grad; forward; backward; opt.step()`` (bf16 autocast and channels_last on CUDA).
Protocol: every configuration gets its own copy of the same initial model; ``--warmup`` steps each
first; then ``--repeats`` rounds, each round timing a block of ``--block`` steps of every
configuration, the order rotated from round to round (interleaved, so drifts in machine load hit
all configurations alike). Blocks are timed with ``torch.cuda.synchronize()`` (CUDA) at both ends.
The figure per configuration is the median over rounds of the mean step time in a block;
overhead = median(wrapper) / median(plain) - 1. Because the rounds interleave the configurations, a
paired figure is also given: the median over rounds of wrapper block / plain block of the same
round, minus 1, which cancels drifts slower than a round. ``--pool A.json B.json ...`` pools the
rounds of several runs into one paired median with a bootstrap 95% interval. ``--block`` is a multiple of 50, so each
interval-50 block holds its decisions in proportion. After the timing, one more block per
configuration counts the operations torch dispatches inside ``opt.step()`` (exact, unlike a
clock: on a GPU a ResNet-18 step is largely bound by the host launching kernels, so this count
is what the wrapper's time overhead follows).

Cases: ``resnet18`` (torchvision ResNet-18, CIFAR stem, 32x32 inputs) and ``mlp`` (784-256-10 on
batch 64), where the fixed per-step cost of the wrapper (Python, small kernels) dominates.
Bars (GPU, ResNet-18): at most 3% (interval epoch) and 5% (interval 50). On a CPU the figures are
only reported.
"""

from __future__ import annotations

import collections
import copy
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from rlopt import RLSwitchingOptimizer

from .cli import parser, runs_path
from .models import resnet18
from .train import environment, resolve_device

BARS = {"wrapper, interval=epoch": 0.03, "wrapper, interval=50": 0.05}
VIEW_OPS = (
    "aten.view.default",
    "aten.select.int",
    "aten.slice.Tensor",
    "aten.unbind.int",
    "aten.alias.default",
    "aten._reshape_alias.default",
    "aten.as_strided.default",
)


class CountOps(TorchDispatchMode):
    """Counts the operations torch dispatches while active, by name. On a GPU most of those that
    are not views launch a kernel, and a step bound by the host pays for every launch."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    def per_step(self, steps: int) -> dict[str, float]:
        """Operations per step: all, and those that are not views."""
        total = sum(self.ops.values())
        views = sum(v for k, v in self.ops.items() if k in VIEW_OPS)
        return {"all": total / steps, "not_views": (total - views) / steps}


SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)


def make_case(case: str, device: torch.device, batch: int):
    torch.manual_seed(0)
    if case == "resnet18":
        model = resnet18(10, 3, "cifar")
        x = torch.randn(batch, 3, 32, 32)
    elif case == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
        x = torch.randn(batch, 1, 28, 28)
    else:
        raise ValueError(f"unknown case {case!r}")
    y = torch.randint(0, 10, (batch,))
    model, x, y = model.to(device), x.to(device), y.to(device)
    if device.type == "cuda" and case == "resnet18":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    return model, x, y


def build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "plain":
        return torch.optim.SGD(model.parameters(), **SGD, fused=True)
    interval = "epoch" if name.endswith("epoch") else 50
    kw = {k: v for k, v in SGD.items() if k not in ("lr", "momentum")}
    return RLSwitchingOptimizer(
        model.parameters(),
        choices={"sgd": kw},
        policy="constant:sgd",
        interval=interval,
        lr=SGD["lr"],
        momentum=SGD["momentum"],
    )


def measure(
    case: str,
    device: torch.device,
    batch: int,
    block: int,
    repeats: int,
    warmup: int,
    log: Callable[[str], None] = print,
    profile: int = 0,
) -> dict[str, Any]:
    base, x, y = make_case(case, device, batch)
    names = ["plain", "wrapper, interval=epoch", "wrapper, interval=50"]
    models = {n: copy.deepcopy(base) for n in names}
    opts = {n: build(n, models[n]) for n in names}
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def run(n: str, steps: int, count: Optional[CountOps] = None) -> float:
        model, opt = models[n], opts[n]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with amp:
                out = model(x)
            F.cross_entropy(out.float(), y).backward()
            if count is None:
                opt.step()
            else:
                with count:
                    opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / steps

    for n in names:
        run(n, warmup)
    if profile:  # where the time goes: per configuration, the ops by device time and by host time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables = []
        for n in names:
            with torch_profile(activities=acts) as prof:
                run(n, profile)
            avg = prof.key_averages()
            tables.append(
                f"== {case} / {n}: {profile} steps, by device time\n"
                + avg.table(sort_by=sort, row_limit=25)
                + f"\n== {case} / {n}: by host time\n"
                + avg.table(sort_by="self_cpu_time_total", row_limit=25)
            )
        log("\n".join(tables))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            times[n].append(run(n, block))
        log(f"  {case} round {r + 1}/{repeats}: " + ", ".join(f"{n} {1e3 * times[n][-1]:.2f} ms" for n in names))
    ops = {}
    for n in names:  # operations dispatched by opt.step(), after the timing (counting slows steps down)
        count = CountOps()
        run(n, block, count)
        ops[n] = count.per_step(block)
    res = {
        "case": case,
        "batch": batch,
        "block": block,
        "repeats": repeats,
        "warmup": warmup,
        "params": sum(p.numel() for p in base.parameters()),
        "step_ops": ops,
        "decisions": {n: len(opts[n].history) for n in names if n != "plain"},
    }
    if repeats:  # --repeats 0: operation counts only
        med = {n: statistics.median(v) for n, v in times.items()}
        res.update(
            {
                "median_step_ms": {n: 1e3 * m for n, m in med.items()},
                "all_step_ms": {n: [1e3 * t for t in v] for n, v in times.items()},
                "overhead": {n: med[n] / med["plain"] - 1.0 for n in names if n != "plain"},
            }
        )
    return res


def paired_overheads(all_step_ms: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per round, wrapper block time / plain block time of the same round, minus 1."""
    plain = all_step_ms["plain"]
    return {n: [w / p - 1.0 for w, p in zip(v, plain)] for n, v in all_step_ms.items() if n != "plain"}


def median_ci(x: list[float], level: float = 0.95, resamples: int = 5000, seed: int = 0) -> list[float]:
    """Percentile-bootstrap interval of the median of ``x``."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(x, k=len(x))) for _ in range(resamples))
    lo = int((1 - level) / 2 * resamples)
    return [meds[lo], meds[resamples - 1 - lo]]


def pool_markdown(runs: list[dict[str, Any]], paths: list[str], case: str = "resnet18") -> str:
    """Rounds of several saved runs of ``case`` pooled: paired median overhead, bootstrap interval, bars."""
    rows, pooled = [], collections.defaultdict(list)
    for path, run in zip(paths, runs):
        r = next((r for r in run["results"] if r["case"] == case and "all_step_ms" in r), None)
        if r is None:
            raise ValueError(f"{path}: no timed {case} case to pool")
        pairs = paired_overheads(r["all_step_ms"])
        for n, v in pairs.items():
            pooled[n] += v
        rows.append(
            f"| {path} | {r['repeats']} | {r['median_step_ms']['plain']:.2f} | "
            + " | ".join(f"{100 * r['overhead'][n]:+.1f}% / {100 * statistics.median(pairs[n]):+.1f}%" for n in BARS)
            + " |"
        )
    env = runs[0]["environment"]
    hardware = {
        (run["environment"].get("gpu") or run["environment"].get("cpu"), run["environment"]["torch"]) for run in runs
    }
    if len(hardware) > 1:
        raise ValueError(f"runs on different hardware or torch versions cannot be pooled: {sorted(hardware)}")
    lines = [
        f"# RLSwitchingOptimizer per-step overhead, {case}, rounds of {len(runs)} runs pooled",
        "",
        "- command: `python -m benchmarks.overhead --pool " + " ".join(paths) + "`",
        f"- hardware: {env.get('gpu') or env.get('cpu')} ({env['device']}); torch {env['torch']}",
        "- per run: ratio of the medians / median of the per-round paired ratios (wrapper block over the "
        "plain block of the same round)",
        "- the interval resamples rounds as independent; rounds of one run share its machine state, so "
        "it is too narrow if the runs differ",
        "",
        "| run | rounds | plain ms/step (median) | wrapper, interval=epoch | wrapper, interval=50 |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "| pooled | rounds | paired median overhead | 95% interval (bootstrap) | bar | point estimate within bar "
        "| whole interval within bar |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, bar in BARS.items():
        med, (lo, hi) = statistics.median(pooled[n]), median_ci(pooled[n])
        lines.append(
            f"| {n} | {len(pooled[n])} | {100 * med:+.1f}% | [{100 * lo:+.1f}%, {100 * hi:+.1f}%] | "
            f"{100 * bar:.0f}% | {'yes' if med <= bar else 'no'} | {'yes' if hi <= bar else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def to_markdown(results: list[dict[str, Any]], env: dict[str, Any], command: str) -> str:
    gpu = env["device"].startswith("cuda")
    lines = [
        "# RLSwitchingOptimizer per-step overhead",
        "",
        f"- command: `{command}`",
        f"- hardware: {env.get('gpu', env['cpu'])} ({env['device']}, {env['cpu_count']} CPU cores, "
        f"{env['torch_threads']} torch threads); torch {env['torch']}, Python {env['python']}",
        "- step = zero_grad, forward, backward, optimizer step; plain = torch.optim.SGD(lr 0.1, momentum 0.9, "
        "nesterov, weight decay 5e-4, fused=True); wrapper = RLSwitchingOptimizer with that SGD as its only "
        "choice, policy constant:sgd",
        "- interleaved rounds (order rotated), warm-up first; median over rounds of the mean step time per block",
        "- bars (GPU, ResNet-18): interval=epoch <= 3%, interval=50 <= 5%"
        + ("" if gpu else "; this is a CPU run: figures reported, bars not applicable"),
        "",
    ]
    lines += [
        "| case | params | batch | rounds x steps | plain ms/step | wrapper (epoch) ms/step | overhead | "
        "wrapper (50) ms/step | overhead | bars met |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    noisy, paired = [], []
    for r in results:
        if "median_step_ms" not in r:
            lines.append(
                f"| {r['case']} | {r['params'] / 1e6:.2f}M | {r['batch']} | not timed | - | - | - | - | - | - |"
            )
            continue
        m, o, a = r["median_step_ms"], r["overhead"], r["all_step_ms"]
        ok = "-"
        if gpu and r["case"] == "resnet18":
            ok = "yes" if all(o[k] <= BARS[k] for k in BARS) else "no"
        lines.append(
            f"| {r['case']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['repeats']} x {r['block']} | "
            f"{m['plain']:.2f} | {m['wrapper, interval=epoch']:.2f} | {100 * o['wrapper, interval=epoch']:+.1f}% | "
            f"{m['wrapper, interval=50']:.2f} | {100 * o['wrapper, interval=50']:+.1f}% | {ok} |"
        )
        pairs = paired_overheads(a)
        paired.append(f"{r['case']}: " + ", ".join(f"{n} {100 * statistics.median(v):+.1f}%" for n, v in pairs.items()))
        spread = {n: (max(v) - min(v)) / statistics.median(v) for n, v in a.items()}
        if max(spread.values()) > 0.1:
            noisy.append(
                f"{r['case']}: round-to-round spread of the step time up to {100 * max(spread.values()):.0f}% "
                f"of the median ("
                + ", ".join(f"{n} {min(v):.2f}-{max(v):.2f} ms" for n, v in a.items())
                + "); with the fastest round instead of the median: "
                + ", ".join(f"{n} {100 * (min(a[n]) / min(a['plain']) - 1):+.1f}%" for n in o)
                + ". Differences smaller than the spread are noise, not overhead."
            )
    if all("step_ops" in r for r in results):
        lines += [
            "",
            "Operations torch dispatches per `opt.step()`, all / not views (an exact count; on a GPU "
            "most of the latter launch a kernel, and a host-bound step pays for each):",
            "",
            "| case | plain | wrapper (epoch) | wrapper (50) |",
            "|---|---|---|---|",
        ]
        for r in results:
            lines.append(
                f"| {r['case']} | "
                + " | ".join(
                    f"{r['step_ops'][n]['all']:.1f} / {r['step_ops'][n]['not_views']:.1f}"
                    for n in ("plain", "wrapper, interval=epoch", "wrapper, interval=50")
                )
                + " |"
            )
    if paired:
        lines += [
            "",
            "Paired overhead (median over rounds of the wrapper's block time over the plain block time of "
            "the same round, minus 1):",
            "",
        ] + [f"- {t}" for t in paired]
    lines += ["", "Per-round step times (ms) are in the JSON file next to this one."]
    if noisy:
        lines += ["", "Noise:", ""] + [f"- {t}" for t in noisy]
    if "load" in env:
        lines += [f"- machine load average (1, 5, 15 min) at the start / end: {env['load']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict[str, Any]]:
    ap = parser("overhead", __doc__.splitlines()[0])
    ap.add_argument(
        "--cases", nargs="+", default=["resnet18", "mlp"], choices=["resnet18", "mlp"], help="models to time"
    )
    ap.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cuda' or 'cpu'")
    ap.add_argument("--batch", type=int, default=None, help="ResNet-18 batch (default 512 on CUDA, 8 on CPU)")
    ap.add_argument("--block", type=int, default=None, help="steps per timed block (default 100 CUDA, 50 CPU)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved rounds (default 15 CUDA, 5 CPU; 0: count operations only, no timing)",
    )
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps of each configuration first")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also print a torch.profiler table (device and host time per op) of STEPS steps of "
        "each configuration, after the warm-up (default 0: none)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    ap.add_argument(
        "--out",
        default=None,
        help="output stem, .md and .json are added (default "
        "benchmarks/runs/overhead_<cpu|gpu>; give a path under benchmarks/results/ to commit a study)",
    )
    ap.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="only re-write the markdown next to a JSON file written by an earlier run (default: none)",
    )
    ap.add_argument(
        "--pool",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only pool the rounds of the ResNet-18 case of several saved runs (paired median overhead "
        "with a bootstrap interval); written to --out (.md) when given (default: none)",
    )
    args = ap.parse_args(argv)
    if args.pool:
        md = pool_markdown([json.loads(Path(f).read_text()) for f in args.pool], args.pool)
        if args.out:
            Path(args.out).with_suffix(".md").write_text(md)
        print(md)
        return []
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        md = to_markdown(saved["results"], saved["environment"], saved["command"])
        Path(args.render).with_suffix(".md").write_text(md)
        print(md)
        return saved["results"]
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if args.threads and not gpu:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    load0 = _loadavg()
    print(
        f"hardware: {env.get('gpu', env['cpu'])} ({env['device']}), torch {env['torch']}, "
        f"{env['torch_threads']} threads"
    )
    command = "python -m benchmarks.overhead " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    stem = Path(args.out) if args.out else runs_path(f"overhead_{'gpu' if gpu else 'cpu'}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for case in args.cases:
        batch = args.batch or (512 if gpu else 8) if case == "resnet18" else 64
        block = args.block or (100 if gpu else 50)
        reps = (15 if gpu else 5) if args.repeats is None else args.repeats
        if case == "mlp" and not args.block:
            block *= 4
        r = measure(case, device, batch, block, reps, args.warmup, profile=args.profile)
        results.append(r)
        if "median_step_ms" in r:
            print(
                f"{case}: plain {r['median_step_ms']['plain']:.3f} ms/step; "
                + "; ".join(
                    f"{n} {r['median_step_ms'][n]:.3f} ms/step ({100 * o:+.1f}%)" for n, o in r["overhead"].items()
                )
            )
        print(
            f"{case}: operations per opt.step() (all / not views): "
            + "; ".join(f"{n} {v['all']:.1f} / {v['not_views']:.1f}" for n, v in r["step_ops"].items())
        )
        if load0:
            env["load"] = f"{load0} / {_loadavg()}"
        md = to_markdown(results, env, command)  # written after every case: a cut-off run keeps what it measured
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(
            json.dumps({"command": command, "environment": env, "results": results}, indent=1)
        )
    print(md)
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return results


if __name__ == "__main__":
    main()
