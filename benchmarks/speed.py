"""Speed bars: seconds per training epoch of SGD and SAM (and any other method) on the benchmark.

``python -m benchmarks.speed --dataset cifar10 --data-dir data/cifar10-jpeg.tar.gz``

Each method trains alone, in this one process, with the benchmark's settings (ResNet-18 CIFAR stem,
batch 512, bf16 autocast, channels_last, data and augmentation on the GPU) on the whole training
set (``--val-fraction 0``: 50,000 CIFAR-10 images per epoch, as the reference script). The figure
per method is the median training time of epochs 2..E: epoch 1 holds cuDNN's autotuning, the lazy
allocations and any compilation. Evaluation is timed apart and not counted.

``--variants eager cuda-graph reduce-overhead`` measures each method once per variant: ``eager``
(no compilation), ``cuda-graph`` (the model's forward and backward replayed as CUDA graphs, eager's
kernels) or a ``torch.compile`` mode (``default``, ``reduce-overhead``, ...). ``--repeats R``
runs every (variant, method) R times in rounds, the order rotated from round to round, so that a
machine that drifts during the call drifts for all of them; the figure is then the median of all
timed epochs of the R runs, and each round's median is listed beside it. Only figures from one
call compare well: machine starts differ by about 10% (``benchmarks/results/speed/``).

Bars (CIFAR-10 on one H100): SGD at most 1.0 s per epoch, SAM at most 2.05x SGD, each
variant judged on its own SGD and SAM. Other data sets or devices: figures are reported, bars not
applied.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from .cli import fail, missing_data_message, parser, runs_path
from .data import MissingDataError, load_dataset
from .train import COMPILE_MODES, METHODS, TrainConfig, environment, resolve_device, train

SGD_BAR_S = 1.0
SAM_RATIO_BAR = 2.05
VARIANTS = ("eager", "cuda-graph", *COMPILE_MODES)


def _variant_config(base: TrainConfig, method: str, variant: Optional[str]) -> TrainConfig:
    kw = {**base.__dict__, "method": method, "out_dir": None}
    if variant is not None:  # None: the base config's own compile settings
        compiled = variant not in ("eager", "cuda-graph")
        kw.update(
            compile=compiled,
            compile_mode=variant if compiled and variant != "default" else None,
            cuda_graph=variant == "cuda-graph",
        )
    return TrainConfig(**kw)


def label(method: str, variant: Optional[str]) -> str:
    """Row name: the method, with the variant when one was asked for."""
    return method if variant is None else f"{method} [{variant}]"


def measure(
    methods: Sequence[str],
    base: TrainConfig,
    variants: Sequence[Optional[str]] = (None,),
    repeats: int = 1,
    log=print,
    on_run: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Train every (variant, method) ``repeats`` times; per row the seconds of every epoch of every run.
    ``on_run`` gets the result so far after each run (a run cut off by a time limit keeps the others)."""
    if repeats < 1:
        raise ValueError(f"Invalid repeats: {repeats}")
    variants, methods = list(dict.fromkeys(variants)), list(dict.fromkeys(methods))  # each once per round
    for v in variants:
        if v is not None and v not in VARIANTS:
            raise ValueError(f"Unknown variant {v!r}; expected one of {VARIANTS}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"Unknown method {m!r}; expected one of {list(METHODS)}")
    device = resolve_device(base.device)
    if "cuda-graph" in variants and device.type != "cuda":
        raise ValueError(f"Variant 'cuda-graph' needs a CUDA device, not {device.type!r}")
    data = load_dataset(base.dataset, base.data_dir, base.download, base.val_fraction, seed=0, cache_dir=base.cache_dir)
    pairs = [(v, m) for v in variants for m in methods]
    runs: dict[tuple[Optional[str], str], list[dict[str, Any]]] = {p: [] for p in pairs}
    errors: dict[str, str] = {}  # a row whose run raised: not run again, the other rows go on
    result: dict[str, Any] = {}
    for r in range(repeats):
        k = r % len(pairs)
        for v, m in pairs[k:] + pairs[:k]:
            if label(m, v) in errors:
                continue
            cfg = _variant_config(base, m, v)
            log(f"== round {r + 1}/{repeats}: {label(m, v)}")
            try:
                run = train(cfg, data=data, log=log)
            except Exception as e:  # noqa: BLE001 -- one variant failing must not lose the others' figures
                errors[label(m, v)] = f"{type(e).__name__}: {e}"
                log(f"== {label(m, v)} failed, not run again:\n{traceback.format_exc()}")
            else:
                runs[(v, m)].append(
                    {
                        "secs": [e["train_seconds"] for e in run["epochs"]],
                        "eval_s": [e["eval_seconds"] for e in run["epochs"]],
                        "steps": run["summary"]["steps"] // cfg.epochs,
                    }
                )
            result = {
                "rows": _rows(runs),
                "errors": dict(errors),
                "variants": variants,
                "repeats": repeats,
                "data": data.summary(),
                "environment": environment(device),
            }
            if on_run is not None:
                on_run(result)
    return result


def _rows(runs: dict[tuple[Optional[str], str], list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One row per (variant, method) with at least one run, in the order of ``runs``."""
    rows = {}
    for (v, m), rs in runs.items():
        if not rs:
            continue
        timed = [x["secs"][1:] if len(x["secs"]) > 1 else x["secs"] for x in rs]
        pooled = [s for t in timed for s in t]
        rows[label(m, v)] = {
            "method": m,
            "variant": v,
            "median_s": statistics.median(pooled),
            "min_s": min(pooled),
            "max_s": max(pooled),
            "round_medians_s": [statistics.median(t) for t in timed],
            "first_epoch_s": [x["secs"][0] for x in rs],
            "all_s": [x["secs"] for x in rs],
            "eval_s_median": statistics.median(s for x in rs for s in x["eval_s"]),
            "steps_per_epoch": rs[0]["steps"],
        }
    return rows


def bars(result: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Per variant: SGD's seconds and SAM's ratio to SGD, and whether the issue-3 bars hold."""
    rows, env = result["rows"], result["environment"]
    out: dict[str, Any] = {"applicable": dataset == "cifar10" and "H100" in env.get("gpu", ""), "variants": {}}
    for v in result.get("variants", [None]):
        sgd, sam = rows.get(label("sgd", v)), rows.get(label("sam", v))
        b: dict[str, Any] = {}
        if sgd:
            b["sgd_s"] = sgd["median_s"]
            b["sgd_ok"] = b["sgd_s"] <= SGD_BAR_S
        if sgd and sam:
            b["sam_ratio"] = sam["median_s"] / sgd["median_s"]
            b["sam_ok"] = b["sam_ratio"] <= SAM_RATIO_BAR
        out["variants"][str(v or "as configured")] = b
    return out


def to_markdown(result: dict[str, Any], b: dict[str, Any], command: str, epochs: int) -> str:
    env, rows, reps = result["environment"], result["rows"], result.get("repeats", 1)
    runs = f"{reps} rounds, each running every row once, in a rotated order" if reps > 1 else "one run per row"
    lines = [
        "# Training speed per epoch",
        "",
        f"- command: `{command}`",
        f"- hardware: {env.get('gpu', env['cpu'])} ({env['device']}, {env['cpu_count']} CPU cores); "
        f"torch {env['torch']}, torchvision {env.get('torchvision', '?')}",
        f"- data: {result['data']}",
        f"- {epochs} epochs per run, {runs}, each run alone on the device; figure: median training seconds "
        f"of epochs 2..{epochs} of all runs of the row (epoch 1 holds cuDNN autotuning and any compilation), "
        "evaluation excluded",
        "",
    ]
    lines += [
        "| row | runs | s/epoch (median) | min-max | round medians | x SGD | first epoch s | eval s | steps/epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        sgd = rows.get(label("sgd", r["variant"]), {}).get("median_s")
        ratio = f"{r['median_s'] / sgd:.2f}" if sgd else "-"
        rounds = ", ".join(f"{x:.3f}" for x in r["round_medians_s"])
        first = ", ".join(f"{x:.2f}" for x in r["first_epoch_s"])
        lines.append(
            f"| {name} | {len(r['all_s'])} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | "
            f"{rounds} | {ratio} | {first} | {r['eval_s_median']:.3f} | {r['steps_per_epoch']} |"
        )
    lines.append("")
    for name, err in result.get("errors", {}).items():
        lines.append(f"- **{name} failed** (not run again): `{err}`")
    if b["applicable"]:
        for v, vb in b["variants"].items():
            tag = f" ({v})" if len(b["variants"]) > 1 else ""
            if "sgd_ok" in vb:
                lines.append(
                    f"- bar{tag}: SGD epoch <= {SGD_BAR_S} s: **{'met' if vb['sgd_ok'] else 'NOT met'}** "
                    f"({vb['sgd_s']:.3f} s)"
                )
            if "sam_ok" in vb:
                lines.append(
                    f"- bar{tag}: SAM <= {SAM_RATIO_BAR}x SGD: **{'met' if vb['sam_ok'] else 'NOT met'}** "
                    f"({vb['sam_ratio']:.2f}x)"
                )
    else:
        lines.append("- bars (CIFAR-10 on one H100) not applicable to this run: figures reported only")
    lines.append("- reference (plain PyTorch script, ../shared/data/README.md, H100): SGD 0.95-1.06 s, SAM 1.89-2.16 s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    from .train import add_config_args, config_from_args

    ap = parser("speed", __doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["sgd", "sam"], choices=list(METHODS), help="methods to time")
    ap.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=list(VARIANTS),
        help="measure each method eager and/or under these torch.compile modes (default: as "
        "--compile/--compile-mode say, one variant)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per (variant, method), in rotating rounds")
    ap.add_argument(
        "--out",
        default=None,
        help="output stem, .md and .json are added (default "
        "benchmarks/runs/speed_<dataset>_<cpu|gpu>; give a path under benchmarks/results/ to commit a study)",
    )
    add_config_args(ap, skip=("method", "out_dir", "epochs", "val_fraction"))
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4; epoch 1 is not counted)")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="held-out share (default 0: all training images)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"Invalid repeats: {args.repeats}")
    base = config_from_args(args, method=args.methods[0], out_dir=None)
    command = "python -m benchmarks.speed " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    dev = "gpu" if resolve_device(base.device).type == "cuda" else "cpu"
    stem = Path(args.out) if args.out else runs_path(f"speed_{base.dataset}_{dev}")
    stem.parent.mkdir(parents=True, exist_ok=True)

    def write(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        b = bars(result, base.dataset)
        md = to_markdown(result, b, command, base.epochs)
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".json").write_text(json.dumps({"command": command, "bars": b, **result}, indent=1))
        return md, b

    try:
        result = measure(args.methods, base, variants=args.variants or [None], repeats=args.repeats, on_run=write)
    except MissingDataError as e:
        fail(ap, missing_data_message(e))
    md, b = write(result)
    print(md)
    print(f"wrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return {"bars": b, **result}


if __name__ == "__main__":
    main()
