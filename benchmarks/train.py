"""One training run of an image classifier with a static, scheduled or RL-switched optimizer.

``python -m benchmarks.train --dataset cifar10 --data-dir /path --method ppo-sgd-sam --epochs 30``

Everything that defines a run is in :class:`TrainConfig`; the JSON log of a run holds that config
verbatim, the environment (hardware, torch version), per-epoch metrics, per-step optimizer choices
(run-length encoded) and, for RL methods, every decision with its reward.

On CUDA the data live on the GPU, augmentation (random crop with padding + horizontal flip) is
batched on the GPU, the forward/backward run under bf16 autocast in ``channels_last``, the step
loop does not synchronise with the host (losses are accumulated on the device), and epochs are
timed after ``torch.cuda.synchronize()``. ``--compile`` adds ``torch.compile`` of the model
(``--compile-mode reduce-overhead``: with CUDA graphs); ``--cuda-graph`` replays the model's eager
forward and backward as CUDA graphs instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F

from rlopt import SAM, QLearningRateOptimizer, RLSwitchingOptimizer
from rlopt.policies import RandomConfig

from .cli import RUNS_DIR, fail, missing_data_message, parser
from .data import (
    PAD_MODES,
    ImageDataset,
    MissingDataError,
    augment_crop_flip,
    iterate_batches,
    load_dataset,
    normalize,
    symmetric_label_noise,
)
from .models import INITS, build_model

__all__ = [
    "TrainConfig",
    "METHODS",
    "train",
    "classification_metrics",
    "convergence_epoch",
    "CONVERGENCE_DEFINITION",
    "environment",
    "cosine_warmup",
    "logged_config",
    "checkpoint_path",
    "sam_late_branch_epoch",
    "check_branch",
    "BRANCH_FIELDS",
]

#: method name -> one-line description
METHODS: dict[str, str] = {
    "sgd": "SGD (Nesterov momentum), cosine schedule",
    "sam": "SAM over that SGD, cosine schedule",
    "adamw": "AdamW, cosine schedule",
    "adam": "Adam (no weight decay), cosine schedule",
    "const-sgd": "RLSwitchingOptimizer with policy constant:sgd (wrapper overhead check)",
    "dqn-sgd-sam": "RLSwitchingOptimizer, DQN policy over {sgd, sam}",
    "ppo-sgd-sam": "RLSwitchingOptimizer, PPO policy over {sgd, sam}",
    "ppo-sgd-sam-adamw": "RLSwitchingOptimizer, PPO policy over {sgd, sam, adamw}",
    "random-sgd-sam": "RLSwitchingOptimizer, random policy over {sgd, sam} picking SAM with probability --sam-share "
    "(benchmarks.table: the SAM step share of ppo-sgd-sam's run of the same seed)",
    "random-sgd-sam-adam": "RLSwitchingOptimizer, random policy over {sgd, sam, adam} with probabilities "
    "--random-probs (benchmarks.table: the step shares of pre-sgd-sam-adam's run of the "
    "same seed)",
    "sam-every-k": "SGD, with a SAM step every --sam-every steps (shared momentum)",
    "sam-last": "SGD, then SAM for the last --sam-last-fraction of the epochs (shared momentum)",
    "pre-sgd-sam": "RLSwitchingOptimizer, shipped policy switch-sgd-sam used zero-shot (frozen)",
    "ppo-sgd-sam-adam": "RLSwitchingOptimizer, PPO policy over {sgd, sam, adam} (the online counterpart of "
    "pre-sgd-sam-adam)",
    "pre-sgd-sam-adam": "RLSwitchingOptimizer, shipped policy switch-sgd-sam-adam used zero-shot (frozen)",
    "lr-dqn": "QLearningRateOptimizer over that SGD, shipped policy lr-dqn used zero-shot (frozen), on top of "
    "the cosine schedule",
    "lr-dqn-online": "QLearningRateOptimizer as lr-dqn, its DQN learning online from scratch",
    "switch": "RLSwitchingOptimizer over {sgd, sam} with policy --policy (a rule: sam-late, ss-sam, ae-sam, "
    "sam-every:<k>; a shipped policy's name; a checkpoint path) under compute budget --budget (SAM on "
    "at most that share of the steps)",
}
RL_METHODS = (
    "const-sgd",
    "dqn-sgd-sam",
    "ppo-sgd-sam",
    "ppo-sgd-sam-adamw",
    "random-sgd-sam",
    "pre-sgd-sam",
    "ppo-sgd-sam-adam",
    "pre-sgd-sam-adam",
    "random-sgd-sam-adam",
    "lr-dqn",
    "lr-dqn-online",
    "switch",
)
#: RL methods whose policy is frozen (shipped, constant or random); the others follow --policy-train
_FROZEN = ("const-sgd", "random-sgd-sam", "random-sgd-sam-adam", "pre-sgd-sam", "pre-sgd-sam-adam", "lr-dqn", "switch")

#: torch.compile modes accepted by --compile-mode (None: torch's default)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

CONVERGENCE_DEFINITION = (
    "convergence epoch: the first epoch (1-based) whose test accuracy is within "
    "0.5 percentage points of the run's final-epoch test accuracy"
)


def _probs(text: Optional[str], n: int) -> Optional[tuple[float, ...]]:
    """``"0.4,0.3,0.3"`` -> (0.4, 0.3, 0.3); None stays None (uniform)."""
    if text is None:
        return None
    try:
        probs = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"Invalid random_probs {text!r}: expected {n} comma-separated numbers") from None
    if len(probs) != n or any(not p >= 0 for p in probs) or not sum(probs) > 0:
        raise ValueError(
            f"Invalid random_probs {text!r}: expected {n} comma-separated non-negative numbers with a positive sum"
        )
    return probs


@dataclass
class TrainConfig:
    """All hyper-parameters of one run. Learning rates are peak values (after warm-up)."""

    dataset: str = "cifar10"
    """"cifar10", "fashion-mnist" or "fmnist-subset" (the embedded subset)."""
    data_dir: Optional[str] = None
    """Folder or archive with the data (see benchmarks.data); None: $RLOPT_DATA_DIR or ./data."""
    download: bool = False
    """Let torchvision download the data set when data_dir holds none."""
    cache_dir: Optional[str] = None
    """Where decoded uint8 arrays are cached; None: $RLOPT_CACHE_DIR or ~/.cache/rlopt/datasets."""
    val_fraction: float = 0.1
    """Share of the training set held out for validation (the policies' reward signal)."""
    max_train: Optional[int] = None
    """Keep a stratified subset of at most this many training images (None: all)."""
    max_test: Optional[int] = None
    """Keep a stratified subset of at most this many test images (None: all)."""
    model: str = "resnet18"
    """"resnet18" (CIFAR stem), "resnet18-imagenet" or "small-cnn"."""
    width: int = 32
    """Channels of the small CNN's first layer."""
    init: Optional[str] = None
    """ResNet convolution initialisation. None: torchvision's (Kaiming-normal, fan-out); "pytorch":
    PyTorch's layer default (Kaiming-uniform, a = sqrt(5)), as a hand-written ResNet gets. A set
    value is part of the run name."""
    method: str = "sgd"
    """One of METHODS."""
    epochs: int = 30
    """Training epochs."""
    batch_size: int = 512
    """Images per optimizer step."""
    eval_batch_size: int = 1024
    """Images per evaluation batch."""
    max_steps_per_epoch: Optional[int] = None
    """Cut each epoch after this many steps (smoke tests); None: full epochs."""
    lr: float = 0.4
    """Peak learning rate of SGD and SAM (the wrapper's base lr)."""
    momentum: float = 0.9
    """SGD/SAM momentum (Nesterov)."""
    weight_decay: float = 5e-4
    """SGD/SAM weight decay (L2, coupled)."""
    adam_lr: float = 2e-3
    """Peak learning rate of Adam/AdamW (static or as an RL choice)."""
    adamw_weight_decay: float = 0.05
    """AdamW decoupled weight decay."""
    rho: float = 0.05
    """SAM neighbourhood radius."""
    warmup_epochs: float = 2.0
    """Linear warm-up from lr/warmup_steps to lr, then cosine decay to 0 at the last step (epochs)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    label_noise: float = 0.0
    """Symmetric label noise on the training split: this share of its labels replaced by another
    class, drawn with the run's seed (benchmarks.data.symmetric_label_noise), so every method of one
    seed sees the same wrong labels; validation and test labels stay clean. Part of the run name
    when set."""
    augment: bool = True
    """Random crop (padding `crop_pad` pixels) and horizontal flip of training batches."""
    crop_pad: int = 4
    """Padding of the random crop (pixels)."""
    pad_mode: str = "reflect"
    """Padding of the random crop: "reflect" (the border mirrored, as airbench and the reference
    script pad) or "zeros" (black, torchvision's RandomCrop default; None is read as "zeros"). Run
    names hold "_pad-reflect" for reflect and nothing for zeros, the names the zero-padded main
    tables' runs were made under."""
    interval: Union[str, int] = "epoch"
    """RL methods: decide at each epoch end ("epoch") or every N steps."""
    policy_train: bool = True
    """RL methods: the policy learns online during the run."""
    pretrained: Optional[str] = None
    """pre-sgd-sam, pre-sgd-sam-adam, lr-dqn: the frozen policy to use (a shipped name or a checkpoint
    path; None: the method's shipped policy). Give such runs a --tag: the run name does not include it."""
    sam_share: float = 0.5
    """random-sgd-sam: probability of choosing SAM at each decision."""
    random_probs: Optional[str] = None
    """random-sgd-sam-adam: probabilities of sgd, sam and adam at each decision, comma-separated (e.g.
    "0.4,0.3,0.3"); None: uniform."""
    sam_every: int = 2
    """sam-every-k: one SAM step every this many steps, SGD otherwise."""
    sam_last_fraction: float = 0.3
    """sam-last: SAM for this fraction of the epochs at the end, SGD before."""
    policy: str = "sam-late"
    """switch: the policy choosing between sgd and sam ("sam-late", "ss-sam", "ae-sam",
    "sam-every:<k>", a shipped policy's name or a checkpoint path). Part of the run name of switch runs."""
    budget: Optional[float] = 0.3
    """switch: the optimizer's compute_budget, the share of the run's steps on which SAM may run
    (0: SGD throughout; 1: SAM may run on every step); None: no budget. Part of the run name of
    switch runs."""
    seed: int = 0
    """Seeds the model initialisation, data order, augmentation and the policy."""
    device: str = "auto"
    """"auto" (CUDA when present), "cuda", "cpu"."""
    bf16: bool = True
    """bf16 autocast of forward/backward (CUDA only)."""
    channels_last: bool = True
    """channels_last memory format (CUDA only)."""
    compile: bool = False
    """torch.compile the model. Part of the run name when set, with the mode."""
    compile_mode: Optional[str] = None
    """torch.compile's mode when `compile` is set: None (torch's default), "reduce-overhead" (CUDA
    graphs of the forward and backward), "max-autotune" or "max-autotune-no-cudagraphs"."""
    cuda_graph: bool = False
    """CUDA only: replay the model's training forward and backward as CUDA graphs
    (torch.cuda.make_graphed_callables): eager's kernels without launching them one by one.
    Evaluation runs the model as usual. Part of the run name when set."""
    threads: Optional[int] = None
    """torch.set_num_threads on CPU (None: leave torch's default)."""
    out_dir: Optional[str] = str(RUNS_DIR)
    """Folder for the run's JSON log (None: do not write); default the git-ignored benchmarks/runs/."""
    tag: str = ""
    """Free text stored with the run."""

    def __post_init__(self) -> None:
        if self.pad_mode is None:  # the old spelling of zero padding (run logs made before reflect was the default)
            self.pad_mode = "zeros"

    def method_name(self) -> str:
        """The method as the run name writes it: ``switch`` runs add their policy and budget
        (``switch-sam-late-b0.3``; ``:`` of a rule's argument dropped, a path reduced to its file's stem)."""
        if self.method != "switch":
            return self.method
        policy = Path(self.policy).stem if os.sep in self.policy or self.policy.endswith(".pt") else self.policy
        budget = "" if self.budget is None else f"-b{self.budget:g}"
        return f"switch-{policy.replace(':', '')}{budget}"

    def run_name(self) -> str:
        init = f"_init-{self.init}" if self.init else ""
        pad = "" if self.pad_mode == "zeros" else f"_pad-{self.pad_mode}"
        noise = f"_noise{self.label_noise:g}" if self.label_noise else ""
        fast = "_cudagraph" if self.cuda_graph else f"_compile-{self.compile_mode or 'default'}" if self.compile else ""
        tag = f"_{self.tag}" if self.tag else ""
        return (
            f"{self.dataset}_{self.model}_{self.method_name()}_e{self.epochs}_s{self.seed}{init}{pad}{noise}{fast}{tag}"
        )


def logged_config(config: dict[str, Any]) -> dict[str, Any]:
    """A run log's ``config`` as today's :class:`TrainConfig` reads it: a field the log predates
    takes the value those runs had (``pad_mode`` "zeros": zero padding was the default then; the
    others their defaults), and ``pad_mode`` None, the old spelling of zeros, reads as "zeros"."""
    cfg = json.loads(json.dumps(dataclasses.asdict(TrainConfig())))
    cfg.update(config)
    if config.get("pad_mode") is None:
        cfg["pad_mode"] = "zeros"
    return cfg


# ------------------------------------------------------------------------------------ metrics
def classification_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-averaged precision, recall and F1 (each the unweighted mean over classes
    of the per-class value; a class with no predicted or no true sample scores 0 there, as
    scikit-learn with ``zero_division=0``)."""
    k = num_classes
    cm = torch.bincount(target.long() * k + pred.long(), minlength=k * k).reshape(k, k).double()  # rows: true
    tp = cm.diag()
    pred_n, true_n = cm.sum(0), cm.sum(1)
    precision = torch.where(pred_n > 0, tp / pred_n.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(true_n > 0, tp / true_n.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    return {
        "acc": float(tp.sum() / cm.sum().clamp_min(1)),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }


def convergence_epoch(test_acc: list[float], tol: float = 0.005) -> Optional[int]:
    """See :data:`CONVERGENCE_DEFINITION` (accuracies as fractions, ``tol`` 0.005 = 0.5 points)."""
    if not test_acc:
        return None
    final = test_acc[-1]
    return next(i + 1 for i, a in enumerate(test_acc) if a >= final - tol)


def cosine_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warm-up to 1 over ``warmup_steps``, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))

    return factor


def source_commit() -> Optional[str]:
    """The commit of the code that runs: ``$RLOPT_COMMIT`` when set (a copy of a tree whose git
    metadata is missing or not its own, as on the GPU machine, where ``gpu_table.sh`` sets it);
    else ``git rev-parse`` of this checkout, with ``+dirty`` when tracked files of ``rlopt/`` or
    ``benchmarks/`` (results aside) differ from it; else None."""
    if os.environ.get("RLOPT_COMMIT"):
        return os.environ["RLOPT_COMMIT"]
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(
                git
                + [
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                    "--",
                    "rlopt",
                    "benchmarks",
                    ":!benchmarks/results",
                ],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "commit": source_commit(),
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    else:
        try:
            with open("/proc/cpuinfo") as f:
                names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
            if names:
                env["cpu"] = names[0]
        except OSError:
            pass
    return env


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_safe(obj.tolist())
    return obj


# ------------------------------------------------------------------------------- optimizers
class _Stepper:
    """Uniform interface over the methods: ``step(closure) -> loss``, ``current`` choice name,
    ``epoch_end(val_loss, val_acc)``, ``scheduled`` (the object an LR scheduler drives)."""

    def __init__(self, cfg: TrainConfig, params, steps_per_epoch: int, fused: bool):
        m = cfg.method
        if m not in METHODS:
            raise ValueError(f"Unknown method {m!r}; expected one of {list(METHODS)}")
        self.cfg, self.method = cfg, m
        self.steps_per_epoch = steps_per_epoch
        self.step_count, self.epoch = 0, 0
        self.ran: Optional[str] = None
        self.rl: Optional[Union[RLSwitchingOptimizer, QLearningRateOptimizer]] = None
        sgd_kw = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
        fused_kw = {"fused": True} if fused else {}
        if m in ("sgd",):
            self.opt = torch.optim.SGD(params, **sgd_kw, **fused_kw)
        elif m in ("sam", "sam-every-k", "sam-last"):
            self.opt = SAM(params, torch.optim.SGD, rho=cfg.rho, **sgd_kw, **fused_kw)
        elif m == "adamw":
            self.opt = torch.optim.AdamW(params, lr=cfg.adam_lr, weight_decay=cfg.adamw_weight_decay, **fused_kw)
        elif m == "adam":
            self.opt = torch.optim.Adam(params, lr=cfg.adam_lr, **fused_kw)
        elif m in ("lr-dqn", "lr-dqn-online"):
            self.opt = self.rl = QLearningRateOptimizer(
                params,
                base=("sgd", {"nesterov": True}),
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.momentum,
                control=("lr",),
                policy=(cfg.pretrained or "lr-dqn") if m == "lr-dqn" else "dqn",
                interval=cfg.interval,
                seed=cfg.seed,
                total_epochs=cfg.epochs,
                total_steps=cfg.epochs * steps_per_epoch,
                train_policy=None if m in _FROZEN else cfg.policy_train,
            )
        elif m == "switch":
            sgd = {"nesterov": True, "weight_decay": cfg.weight_decay}
            self.opt = self.rl = RLSwitchingOptimizer(
                params,
                choices={"sgd": sgd, "sam": dict(sgd, rho=cfg.rho)},
                policy=cfg.policy,
                interval=cfg.interval,
                lr=cfg.lr,
                momentum=cfg.momentum,
                seed=cfg.seed,
                total_epochs=cfg.epochs,
                total_steps=cfg.epochs * steps_per_epoch,
                train_policy=None,
                compute_budget=cfg.budget,
            )
        else:
            sgd = {"nesterov": True, "weight_decay": cfg.weight_decay}
            choices: dict[str, dict[str, Any]] = {"sgd": sgd, "sam": dict(sgd, rho=cfg.rho)}
            policy: Any = {
                "dqn-sgd-sam": "dqn",
                "ppo-sgd-sam": "ppo",
                "ppo-sgd-sam-adamw": "ppo",
                "ppo-sgd-sam-adam": "ppo",
                "const-sgd": "constant:sgd",
                "pre-sgd-sam": cfg.pretrained or "switch-sgd-sam",
                "pre-sgd-sam-adam": cfg.pretrained or "switch-sgd-sam-adam",
                "random-sgd-sam": RandomConfig(probs=(1.0 - cfg.sam_share, cfg.sam_share)),
                "random-sgd-sam-adam": RandomConfig(probs=_probs(cfg.random_probs, 3)),
            }[m]
            if m == "const-sgd":
                choices = {"sgd": sgd}
            if m == "ppo-sgd-sam-adamw":
                choices["adamw"] = {"lr": cfg.adam_lr, "weight_decay": cfg.adamw_weight_decay}
            if m in ("ppo-sgd-sam-adam", "pre-sgd-sam-adam", "random-sgd-sam-adam"):  # as "adam": no weight decay
                choices["adam"] = {"lr": cfg.adam_lr, "weight_decay": 0.0}
            self.opt = self.rl = RLSwitchingOptimizer(
                params,
                choices=choices,
                policy=policy,
                interval=cfg.interval,
                lr=cfg.lr,
                momentum=cfg.momentum,
                seed=cfg.seed,
                total_epochs=cfg.epochs,
                total_steps=cfg.epochs * steps_per_epoch,
                train_policy=None if m in _FROZEN else cfg.policy_train,
            )
        self.sam_from_epoch = cfg.epochs - int(round(cfg.sam_last_fraction * cfg.epochs))

    @property
    def scheduled(self) -> torch.optim.Optimizer:
        """What the LR scheduler drives. Scheduled SAM methods: the base SGD, which shares its param
        groups with SAM and steps at every step (SAM's second step calls it)."""
        return self.opt.base_optimizer if self.method in ("sam-every-k", "sam-last") else self.opt

    @property
    def current(self) -> Optional[str]:
        m = self.method
        if m in ("lr-dqn", "lr-dqn-online"):  # the agent's lr factor, 2^-k
            k = round(-math.log2(self.rl.factors["lr"]))
            return f"lr x2^-{k}" if k else "lr x1"
        if self.rl is not None:
            return self.rl.choice
        if m == "sam-every-k":
            return "sam" if self.step_count % self.cfg.sam_every == self.cfg.sam_every - 1 else "sgd"
        if m == "sam-last":
            return "sam" if self.epoch >= self.sam_from_epoch else "sgd"
        return m

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One step; afterwards :attr:`ran` names the choice that ran it (under a compute budget the
        policy's choice may have been replaced by SGD: read from the budget's host-side count)."""
        name = self.current
        budget = getattr(self.rl, "budget", None)
        if budget is not None:
            spent = budget.used(self.step_count)[0]
            loss = self.opt.step(closure)
            self.ran = "sam" if budget.used(self.step_count + 1)[0] > spent else "sgd"
            self.step_count += 1
            return loss
        if self.rl is not None or name == "sam" or self.method not in ("sam-every-k", "sam-last"):
            loss = self.opt.step(closure)
        else:  # an SGD step of a scheduled SAM method: the base optimizer, same momentum buffers
            with torch.enable_grad():
                loss = closure()
            self.opt.base_optimizer.step()
        self.step_count += 1
        self.ran = name if name is not None else self.current  # an RL optimizer's first decision: in its first step
        return loss

    def epoch_end(self, val_loss: Optional[float], val_acc: Optional[float]) -> None:
        self.epoch += 1
        if self.rl is not None:
            self.rl.epoch_end(val_loss=val_loss, val_acc=val_acc)


# ---------------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model, x_u8, y, mean, std, cfg: TrainConfig, device, num_classes: int) -> dict[str, float]:
    model.eval()
    cl = cfg.channels_last and device.type == "cuda"
    total_loss = torch.zeros((), device=device)
    preds = []
    for xb, yb in iterate_batches(x_u8, y, cfg.eval_batch_size):
        with _autocast(cfg, device):
            out = model(normalize(xb, mean, std, cl))
        total_loss += F.cross_entropy(out.float(), yb, reduction="sum")
        preds.append(out.argmax(1))
    m = classification_metrics(torch.cat(preds), y, num_classes)
    m["loss"] = float(total_loss) / max(1, len(y))
    model.train()
    return m


def _autocast(cfg: TrainConfig, device: torch.device):
    if device.type == "cuda" and cfg.bf16:  # no weight-cast cache: CUDA graphs replay their own casts
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cfg.cuda_graph)
    return torch.autocast("cpu", enabled=False)


def graph_model(model: torch.nn.Module, sample: torch.Tensor, bf16: bool) -> torch.nn.Module:
    """``model`` with its training-mode forward and backward captured as CUDA graphs, for inputs
    shaped and laid out like ``sample`` (torch.cuda.make_graphed_callables; eval mode runs the model
    as before). The warm-up and capture run the model four times in training mode; its buffers
    (BatchNorm statistics) are put back afterwards, so training starts from the same state as
    without graphs."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False, enabled=bf16)
    with amp:
        graphed = torch.cuda.make_graphed_callables(model, (sample,))
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    return graphed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ------------------------------------------------------------------------------ checkpoints
#: config fields in which a run may differ from the run whose checkpoint it starts from
#: (``budget``: only as :func:`check_branch` allows)
BRANCH_FIELDS = ("budget", "tag", "threads", "out_dir", "cache_dir", "data_dir", "download")
CHECKPOINT_FORMAT = "benchmarks.train checkpoint"


def checkpoint_path(directory: Union[str, os.PathLike], cfg: TrainConfig, epoch: int) -> Path:
    """Where :func:`train` writes ``cfg``'s checkpoint after ``epoch`` epochs."""
    return Path(directory) / f"{cfg.run_name()}_ep{epoch}.pt"


def sam_late_branch_epoch(budget: float, epochs: int, steps_per_epoch: int, interval: Union[str, int]) -> int:
    """The last epoch end from which a ``switch`` run of policy ``sam-late`` at ``budget`` may start
    off the checkpoint of the same run at a smaller budget (0: SGD throughout): every decision
    taken up to that point chooses SGD at both budgets. sam-late chooses SAM at the first decision
    whose step ``s`` has ``budget * T >= T - s`` (``T`` the run's steps); a decision taken at an
    epoch's end belongs to the prefix, so the branch point keeps one decision interval clear of
    ``(1 - budget) * T``."""
    total = epochs * steps_per_epoch
    every = steps_per_epoch if interval == "epoch" else int(interval)
    return max(0, math.floor(((1.0 - budget) * total - every) / steps_per_epoch + 1e-9))  # 0.7 * 2760 < 1932


def check_branch(cfg: TrainConfig, ck: dict[str, Any], steps_per_epoch: int) -> None:
    """Refuse to start ``cfg`` from checkpoint ``ck`` unless the checkpointed run is ``cfg``'s
    own run up to ``ck["epoch"]``: the same config but for :data:`BRANCH_FIELDS`, and a budget
    change only for a sam-late ``switch`` run that spent nothing and branches no later than
    :func:`sam_late_branch_epoch` (sam-late's choices up to there are SGD at either budget)."""
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"Not a {CHECKPOINT_FORMAT}: format {ck.get('format')!r}")
    old, new = logged_config(ck["config"]), json.loads(json.dumps(dataclasses.asdict(cfg)))
    differ = sorted(k for k in new if k not in BRANCH_FIELDS and old.get(k) != new[k])
    if differ:
        raise ValueError(
            f"The checkpoint's run differs from this run in {differ}: "
            + ", ".join(f"{k}={old.get(k)!r} there, {new[k]!r} here" for k in differ)
        )
    epoch = int(ck["epoch"])
    if not 0 < epoch < cfg.epochs:
        raise ValueError(f"Invalid checkpoint epoch {epoch} for a run of {cfg.epochs} epochs")
    if old.get("budget") != cfg.budget:
        if cfg.method != "switch" or cfg.policy != "sam-late" or cfg.budget is None or old.get("budget") is None:
            raise ValueError(
                "Only a sam-late switch run may start from a checkpoint at another budget, got "
                f"method {cfg.method!r}, policy {cfg.policy!r}, budget {old.get('budget')!r} -> {cfg.budget!r}"
            )
        extra = ck["optimizer"]["rlopt"]["extra"]
        if extra.get("spent") or extra.get("overridden"):
            raise ValueError(
                f"The checkpoint's run spent budget ({extra.get('spent')} extra gradient evaluations, "
                f"{extra.get('overridden')} steps overridden): it is not this run's prefix"
            )
        limit = sam_late_branch_epoch(cfg.budget, cfg.epochs, steps_per_epoch, cfg.interval)
        if epoch > limit:
            raise ValueError(
                f"sam-late at budget {cfg.budget} may start from a checkpoint at epoch {limit} at the "
                f"latest (its first SAM decision comes after it), not {epoch}"
            )


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # other processes wait for the file: write it whole
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(
    cfg: TrainConfig,
    data: Optional[ImageDataset] = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    *,
    checkpoint_epochs: Sequence[int] = (),
    checkpoint_dir: Optional[Union[str, os.PathLike]] = None,
    start_from: Optional[Union[str, os.PathLike]] = None,
    stop_after: Optional[int] = None,
    log_decisions: bool = True,
) -> dict[str, Any]:
    """Run one training run; return (and write, if ``cfg.out_dir``) its log as a dict.

    ``checkpoint_epochs``: after each of these epochs write a checkpoint (model, optimizer,
    scheduler, the data order's generator, the epochs so far) to :func:`checkpoint_path` in
    ``checkpoint_dir``. ``start_from``: continue from such a checkpoint (see :func:`check_branch`):
    a resumed run trains as the uninterrupted one (on the CPU bit for bit), and a sam-late run
    branched off a smaller budget's run as if it had run from the start. Its log records
    ``branched_from``. ``stop_after``: stop after this many epochs (after the checkpoints) and
    write no log (a prefix made only for its checkpoints). ``log_decisions=False``: the log leaves
    out the RL decisions (observations, signals, rewards; a few hundred bytes each), keeping the
    step-level choices in ``choice_segments``.
    """
    if cfg.method not in METHODS:  # the choices that fail late, checked before the data is loaded
        raise ValueError(f"Unknown method {cfg.method!r}; expected one of {list(METHODS)}")
    if cfg.init not in INITS:
        raise ValueError(f"Unknown init {cfg.init!r}; expected None or 'pytorch'")
    if cfg.pad_mode not in PAD_MODES:
        raise ValueError(f"Unknown pad_mode {cfg.pad_mode!r}; expected one of {PAD_MODES}")
    if cfg.compile_mode not in (None, *COMPILE_MODES):
        raise ValueError(f"Unknown compile_mode {cfg.compile_mode!r}; expected None or one of {COMPILE_MODES}")
    if cfg.compile_mode is not None and not cfg.compile:
        raise ValueError(f"compile_mode {cfg.compile_mode!r} is set but compile is not")
    if cfg.cuda_graph and cfg.compile:
        raise ValueError(
            "cuda_graph and compile exclude each other (compile_mode='reduce-overhead' makes CUDA "
            "graphs of the compiled model)"
        )
    if not 0.0 <= cfg.label_noise <= 1.0:
        raise ValueError(f"Invalid label_noise: {cfg.label_noise} (a fraction in [0, 1])")
    if checkpoint_epochs and checkpoint_dir is None:
        raise ValueError("checkpoint_epochs needs a checkpoint_dir")
    device = resolve_device(cfg.device)
    if cfg.cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA device, not {device.type!r}")
    if cfg.threads is not None and device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if data is None:
        data = load_dataset(
            cfg.dataset,
            cfg.data_dir,
            cfg.download,
            cfg.val_fraction,
            seed=0,
            cache_dir=cfg.cache_dir,
            max_train=cfg.max_train,
            max_test=cfg.max_test,
        )
    ck = torch.load(start_from, map_location="cpu", weights_only=True) if start_from is not None else None
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes, data.in_channels, cfg.width, init=cfg.init).to(device)
    cl = cfg.channels_last and device.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    if ck is not None:  # before any graph capture: the graphs read the parameters in place
        model.load_state_dict(ck["model"])
    fwd = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model

    train_y, noisy = data.train_y, torch.zeros(0, dtype=torch.long)
    if cfg.label_noise:
        train_y, noisy = symmetric_label_noise(data.train_y, cfg.label_noise, data.num_classes, cfg.seed)
    tx, ty = data.train_x.to(device), train_y.to(device)
    vx, vy = data.val_x.to(device), data.val_y.to(device)
    sx, sy = data.test_x.to(device), data.test_y.to(device)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)

    steps_per_epoch = len(ty) // cfg.batch_size  # drop_last: every step has a full batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(ty)} training images")
    if cfg.cuda_graph:  # the capture's input: a batch made as the training batches are (shape, layout)
        sample = tx[: cfg.batch_size]
        if cfg.augment:  # a generator of its own: the run's draws stay as without graphs
            sample = augment_crop_flip(
                sample,
                cfg.crop_pad,
                flip=True,
                pad_mode=cfg.pad_mode,
                generator=torch.Generator(device=device).manual_seed(0),
            )
        fwd = graph_model(model, normalize(sample, mean, std, cl), cfg.bf16)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    try:  # torch's fused kernels (CUDA, and CPU in recent torch), as the wrapper's inner optimizers use
        stepper = _Stepper(cfg, list(model.parameters()), steps_per_epoch, fused=True)
    except (RuntimeError, ValueError, TypeError):
        stepper = _Stepper(cfg, list(model.parameters()), steps_per_epoch, fused=False)
    warmup = max(1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    sched = torch.optim.lr_scheduler.LambdaLR(stepper.scheduled, cosine_warmup(total_steps, warmup))

    env = environment(device)
    log(
        f"[{cfg.run_name()}] {data.summary()} | {METHODS[cfg.method]} | {env['device']} "
        f"{env.get('gpu', env['cpu'])} | torch {env['torch']} | {steps_per_epoch} steps/epoch"
    )
    epochs: list[dict[str, Any]] = []
    choice_ids: dict[str, int] = {}
    step_choices: list[int] = []  # choice per step, as small ints (host only, no sync)
    start_epoch, branched_from, elapsed = 0, None, 0.0
    if ck is not None:
        check_branch(cfg, ck, steps_per_epoch)
        state = ck["optimizer"]
        if logged_config(ck["config"]).get("budget") != cfg.budget:  # nothing spent (checked): any budget's state
            state = {
                **state,
                "rlopt": {**state["rlopt"], "extra": {**state["rlopt"]["extra"], "compute_budget": cfg.budget}},
            }
        stepper.opt.load_state_dict(state)
        sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        torch.set_rng_state(ck["torch_rng"])
        stepper.step_count, stepper.epoch = int(ck["stepper"]["step_count"]), int(ck["stepper"]["epoch"])
        epochs = [dict(e) for e in ck["epochs"]]
        choice_ids = {str(k): int(v) for k, v in ck["choice_ids"].items()}
        step_choices = [int(c) for c in ck["step_choices"]]
        start_epoch, elapsed = int(ck["epoch"]), float(ck["elapsed"])
        branched_from = {
            "run": ck["run_name"],
            "epoch": start_epoch,
            "path": str(start_from),
            "budget": logged_config(ck["config"]).get("budget"),
            "before": ck.get("branched_from"),
        }
        log(f"[{cfg.run_name()}] starts from {start_from} (epoch {start_epoch})")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps, initial=start_epoch * steps_per_epoch, desc=cfg.method, leave=False, dynamic_ncols=True
        )
    t_run = time.perf_counter()
    last = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, last):
        _sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        grad_evals = 0
        batches = iterate_batches(tx, ty, cfg.batch_size, shuffle=True, drop_last=True, generator=gen)
        for i, (xb, yb) in enumerate(batches):
            if i >= steps_per_epoch:
                break
            if cfg.augment:
                xb = augment_crop_flip(xb, cfg.crop_pad, flip=True, generator=gen, pad_mode=cfg.pad_mode)
            xin = normalize(xb, mean, std, cl)

            def closure(xin=xin, yb=yb):
                stepper.opt.zero_grad(set_to_none=True)
                with _autocast(cfg, device):
                    out = fwd(xin)
                loss = F.cross_entropy(out.float(), yb, label_smoothing=cfg.label_smoothing)
                loss.backward()
                return loss

            loss = stepper.step(closure)
            name = stepper.ran
            step_choices.append(choice_ids.setdefault(name, len(choice_ids)))
            grad_evals += 2 if name == "sam" else 1
            loss_sum += loss.detach()
            sched.step()
            if bar is not None:
                bar.update(1)
        _sync(device)
        train_time = time.perf_counter() - t0
        t1 = time.perf_counter()
        val = evaluate(model, vx, vy, mean, std, cfg, device, data.num_classes) if len(vy) else {}
        test = evaluate(model, sx, sy, mean, std, cfg, device, data.num_classes)
        eval_time = time.perf_counter() - t1
        train_loss = float(loss_sum) / steps_per_epoch
        stepper.epoch_end(val.get("loss"), val.get("acc"))  # None without a validation split: training loss
        rec = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "val_loss": val.get("loss"),
            "val_acc": val.get("acc"),
            "test_loss": test["loss"],
            "test_acc": test["acc"],
            "test_f1": test["f1"],
            "test_precision": test["precision"],
            "test_recall": test["recall"],
            "lr": sched.get_last_lr()[0],
            "train_seconds": train_time,
            "eval_seconds": eval_time,
            "grad_evals": grad_evals,
        }
        epochs.append(rec)
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", test_acc=f"{100 * test['acc']:.1f}")
        else:
            log(
                f"  epoch {epoch + 1:3d}/{cfg.epochs}  train loss {train_loss:.4f}  val acc "
                f"{100 * (val.get('acc') or 0):.2f}  test acc {100 * test['acc']:.2f}  {train_time:.2f}s"
            )
        if epoch + 1 in checkpoint_epochs and epoch + 1 < cfg.epochs:
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(cfg),
                "run_name": cfg.run_name(),
                "epoch": epoch + 1,
                "model": model.state_dict(),
                "optimizer": stepper.opt.state_dict(),
                "scheduler": sched.state_dict(),
                "generator": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "stepper": {"step_count": stepper.step_count, "epoch": stepper.epoch},
                "epochs": epochs,
                "choice_ids": choice_ids,
                "step_choices": step_choices,
                "branched_from": branched_from,
                "elapsed": elapsed + time.perf_counter() - t_run,
            }
            _save_checkpoint(checkpoint_path(checkpoint_dir, cfg, epoch + 1), state)
    wall = elapsed + time.perf_counter() - t_run
    if bar is not None:
        bar.close()
    if last < cfg.epochs:
        log(f"[{cfg.run_name()}] stopped after epoch {last} (no log written)")
        return {"config": dataclasses.asdict(cfg), "epochs": epochs, "stopped_after": last, "wall_seconds": wall}

    names = {v: k for k, v in choice_ids.items()}
    segments: list[tuple[int, int, str]] = []  # [first step, last step + 1, choice]
    for s, c in enumerate(step_choices):
        if segments and segments[-1][2] == names[c]:
            segments[-1][1] = s + 1
        else:
            segments.append([s, s + 1, names[c]])
    counts = {n: step_choices.count(i) for n, i in choice_ids.items()}
    decisions = []
    if stepper.rl is not None and log_decisions:
        keep = ("decision", "step", "epoch", "choice", "reward", "final", "observation", "signals", "policy")
        decisions = [{k: d.get(k) for k in keep} for d in stepper.rl.history]
    accs = [e["test_acc"] for e in epochs]
    secs = sorted(e["train_seconds"] for e in epochs)
    summary = {
        "final_test_acc": accs[-1],
        "best_test_acc": max(accs),
        "final_val_acc": epochs[-1]["val_acc"],
        "final_test_f1": epochs[-1]["test_f1"],
        "final_test_precision": epochs[-1]["test_precision"],
        "final_test_recall": epochs[-1]["test_recall"],
        "convergence_epoch": convergence_epoch(accs),
        "convergence_definition": CONVERGENCE_DEFINITION,
        "train_seconds_total": sum(secs),
        "wall_seconds": wall,
        "seconds_per_epoch_median": secs[len(secs) // 2],
        "seconds_per_epoch_min": secs[0],
        "seconds_per_epoch_max": secs[-1],
        "steps": len(step_choices),
        "grad_evals": sum(e["grad_evals"] for e in epochs),
        "step_share": {n: c / max(1, len(step_choices)) for n, c in counts.items()},
    }
    data_summary = data.summary()
    if cfg.label_noise:
        data_summary += (
            f"; label noise: {len(noisy)} of {len(train_y)} training labels replaced by another class "
            f"(seed {cfg.seed}), validation and test labels clean"
        )
    result = {
        "config": dataclasses.asdict(cfg),
        "environment": env,
        "data": data_summary,
        "epochs": epochs,
        "summary": summary,
        "choice_segments": segments,
        "decisions": decisions,
    }
    if branched_from is not None:
        result["branched_from"] = branched_from
    result = _json_safe(result)
    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{cfg.run_name()}.json"
        path.write_text(json.dumps(result, indent=1))
        result["path"] = str(path)
    log(
        f"[{cfg.run_name()}] final test acc {100 * accs[-1]:.2f}%  best {100 * max(accs):.2f}%  "
        f"convergence epoch {summary['convergence_epoch']}  {sum(secs):.1f}s training  "
        f"steps per optimizer {counts}"
    )
    return result


# -------------------------------------------------------------------------------------- CLI
def add_config_args(ap: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per TrainConfig field (help text: the field's docstring)."""
    import ast
    import inspect

    docs: dict[str, str] = {}
    src = inspect.getsource(TrainConfig)
    tree = ast.parse(src)
    body = tree.body[0].body
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = docs.get(f.name, "") + f" (default: {default})"
        if isinstance(default, bool):
            ap.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
        elif f.name == "interval":
            ap.add_argument(flag, default=default, type=lambda s: s if s == "epoch" else int(s), help=help_)
        elif default is None or f.type in ("Optional[int]", "Optional[str]"):
            conv = int if "int" in str(f.type) else str
            ap.add_argument(flag, default=default, type=conv, help=help_)
        else:
            ap.add_argument(flag, default=default, type=type(default), help=help_)


def config_from_args(args: argparse.Namespace, **override) -> TrainConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    kw.update(override)
    return TrainConfig(**kw)


def main(argv=None) -> dict[str, Any]:
    ap = parser("train", "One benchmark training run. Methods: " + ", ".join(METHODS))
    add_config_args(ap)
    ap.add_argument("--progress", action="store_true", help="tqdm progress bar")
    args = ap.parse_args(argv)
    cfg = config_from_args(args)
    print(CONVERGENCE_DEFINITION)
    try:
        result = train(cfg, progress=args.progress)
    except MissingDataError as e:
        fail(ap, missing_data_message(e, "or --dataset fmnist-subset for the embedded subset"))
    if "path" in result:
        print(f"wrote {result['path']}")
    return result


if __name__ == "__main__":
    main()
