"""Meta-train a switching or learning-rate policy across a distribution of cheap training tasks.

.. code-block:: text

    policy = new PPO / DQN policy (learning)
    for episode e = 1..E:
        task = TaskDistribution.sample(seed + e)       # data, model, batch, lr, noise, budget
        opt  = RLSwitchingOptimizer(task.params, choices, policy=policy, train_policy=True, ...)
               or QLearningRateOptimizer(task.params, base="sgd", policy=policy, ...)
        run_episode(task, opt)                          # the policy keeps learning inside it
        log the episode's return (sum of rewards) and its final validation accuracy
    policy.save(out, action set, observation layout, task distribution, seeds, returns, command)

The same policy object goes to a new optimizer each episode, so it learns across episodes;
the last decision of an episode is a truncation (bootstrapped), never a terminal state.

Command line (the shipped checkpoints' commands are in ``rlopt/registry/index.json``)::

    python -m rlopt.meta.train_policy --kind switching --choices sgd,sam --algo ppo --episodes 200 \
        --seed 0 --out switch.pt
    python -m rlopt.meta.train_policy --kind lr --episodes 150 --out lr.pt
    python -m rlopt.meta.train_policy --choices sgd,sam --episodes 300 --task epochs=20,30 \
        --task label_noise=0.2,0.4 --out long.pt        # any TaskDistribution field
    python -m rlopt.meta.train_policy --choices sgd,sam --task interval=epoch --reward paired --out p.pt
        # paid relative to an SGD run of each task (rewards.BaselineReward)
    python -m rlopt.meta.train_policy --preset resnet --budget 0.15 --reward final --out b.pt
        # ResNet tasks, compute budget 0.15, paid at the end against SAM-late at the same budget
        # (rewards.FinalReward)

Example:
    >>> from rlopt.meta.train_policy import train_policy
    >>> result = train_policy(kind="switching", choices=("sgd", "sam"), algo="ppo", episodes=20, out="p.pt")
    >>> result.returns[-5:], rlopt.load_policy("p.pt").metadata["command"]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union, cast

import torch

from ..control.observation import LAYOUT_VERSION
from ..optim.lr_control import DEFAULT_DQN_CONFIG, QLearningRateOptimizer
from ..optim.switching import RLSwitchingOptimizer
from ..policies import DQNConfig, Policy, PPOConfig, ReplayBuffer
from ..rewards import BaselineReward, FinalReward, RewardContext, sharpness_potential
from .tasks import Task, TaskConfig, TaskDistribution, build_task, run_episode

__all__ = ["train_policy", "TrainResult", "main"]

log = logging.getLogger("rlopt.meta.train_policy")


@dataclass
class TrainResult:
    policy: Policy
    """The trained policy (still in training mode)."""
    returns: list[float]
    """Return (sum of rewards) of each episode."""
    episodes: list[dict[str, Any]]
    """Per episode: the task, its return, decisions, final validation metrics, action shares."""
    wall_time_s: float
    path: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _exploration_decay(episodes: int, mean_decisions: float, share: float = 0.6, end: float = 0.05) -> float:
    """Per-decision epsilon decay that reaches ``end`` after ``share`` of the expected decisions."""
    n = max(1.0, share * episodes * mean_decisions)
    return min(1.0, math.exp(math.log(end) / n))


def _policy_config(
    kind: str, algo: str, episodes: int, dist: TaskDistribution, seed: int
) -> Union[PPOConfig, DQNConfig]:
    if algo == "ppo":
        return PPOConfig(hidden=32, rollout_len=16, update_epochs=4, ent_coef=0.01)
    decay = _exploration_decay(episodes, dist.mean_decisions(seed=seed))
    # pinned to the values the shipped policies were meta-trained with (the learner check found
    # nothing better for these short episodes; benchmarks/results/learner_check)
    base = (
        DEFAULT_DQN_CONFIG
        if kind == "lr"
        else DQNConfig(
            gamma=0.9, learning_starts=16, target_update=20, lr=1e-3, batch_size=32, train_frequency=1, double_dqn=False
        )
    )
    cfg = DQNConfig(**vars(base))
    cfg.epsilon_decay = decay
    cfg.buffer_size, cfg.hidden = 2000, 32
    return cfg


def _make_optimizer(
    kind: str,
    task: Task,
    choices: Sequence[str],
    policy: Any,
    seed: int,
    reward: Optional[Callable[[RewardContext], float]] = None,
    budget: Optional[float] = None,
    train: bool = True,
) -> Union[RLSwitchingOptimizer, QLearningRateOptimizer]:
    cfg = task.config
    common = dict(
        policy=policy,
        interval=cfg.interval,
        seed=seed,
        total_steps=cfg.total_steps,
        total_epochs=cfg.epochs,
        train_policy=train,
        process_group=None,
    )  # one process, its own episodes
    if cfg.weight_decay:  # 0: each choice's own default, as the first tasks ran
        common["weight_decay"] = cfg.weight_decay
    if kind == "switching":
        return RLSwitchingOptimizer(
            task.model.parameters(), choices=list(choices), lr=cfg.lr, reward=reward, compute_budget=budget, **common
        )
    return QLearningRateOptimizer(task.model.parameters(), base="sgd", lr=cfg.lr, control=("lr",), **common)


def _reference_reward(
    cfg: TaskConfig, fmnist: Optional[Path], choices: Sequence[str], seed: int, cifar10: Optional[Path] = None
) -> BaselineReward:
    """Train ``cfg``'s task with SGD alone (the same wrapper, initial weights and batch order as
    the policy's episode) and return the reward relative to that run."""
    task = build_task(cfg, fmnist, cifar10)
    ref = _make_optimizer("switching", task, choices, "constant:sgd", seed)
    curve = run_episode(task, ref)["val_curve"]
    if len(curve) < cfg.epochs:  # the reference diverged: pad with its last figures
        curve += [curve[-1] if curve else (1e6, 0.0)] * (cfg.epochs - len(curve))
    return BaselineReward(reference=curve)


def _final_reward(
    cfg: TaskConfig,
    fmnist: Optional[Path],
    choices: Sequence[str],
    seed: int,
    cifar10: Optional[Path],
    budget: float,
    reference: str = "sam-late",
    shaping: float = 0.0,
) -> FinalReward:
    """Train ``cfg``'s task with the rule ``reference`` under the same compute budget (the same
    wrapper, initial weights, batches and augmentation as the policy's episode) and return the
    reward that pays the final validation metrics against that run's."""
    task = build_task(cfg, fmnist, cifar10)
    ref = _make_optimizer("switching", task, choices, reference, seed, budget=budget, train=False)
    out = run_episode(task, ref)
    potential = sharpness_potential(shaping) if shaping else None
    return FinalReward(reference=(max(out["val_loss"], 1e-12), out["val_acc"]), potential=potential)


def _command(
    kind: str,
    choices: Sequence[str],
    algo: str,
    episodes: int,
    seed: int,
    out: Optional[str | os.PathLike],
    data: Sequence[str],
    register: Optional[str],
    reward: str = "default",
    budget: Optional[float] = None,
) -> str:
    args = ["python", "-m", "rlopt.meta.train_policy", "--kind", kind]
    if kind == "switching":
        args += ["--choices", ",".join(choices), "--algo", algo]
        if reward != "default":
            args += ["--reward", reward]
        if budget is not None:
            args += ["--budget", repr(budget)]
    args += ["--episodes", str(episodes), "--seed", str(seed), "--data", ",".join(data)]
    if out is not None:
        args += ["--out", os.fspath(out)]
    if register:
        args += ["--register", register]
    return shlex.join(args)


def compact(policy: Policy) -> Policy:
    """A copy without the replay buffer (DQN) or partial rollout (PPO): the networks, their
    optimizer state and the counters stay, so the file is small; fine-tuning refills the buffer."""
    policy = copy.deepcopy(policy)
    if hasattr(policy, "buffer"):
        policy.buffer = ReplayBuffer(policy.buffer.capacity, policy.obs_dim)
    if hasattr(policy, "rollout"):
        policy.rollout.reset()
    cast(Any, policy)._pending = None  # DQN's and PPO's step awaiting its reward (other kinds: unused)
    return policy


def train_policy(
    kind: str = "switching",
    choices: Sequence[str] = ("sgd", "sam"),
    algo: str = "ppo",
    episodes: int = 200,
    seed: int = 0,
    out: Optional[str | os.PathLike] = None,
    *,
    distribution: Optional[TaskDistribution] = None,
    progress: bool = True,
    keep_buffers: bool = False,
    command: Optional[str] = None,
    register: Optional[str] = None,
    threads: Optional[int] = 1,
    reward: str = "default",
    budget: Optional[float] = None,
    reference: str = "sam-late",
    shaping: float = 0.0,
) -> TrainResult:
    """Meta-train a policy over ``episodes`` tasks of ``distribution`` (see the module doc).

    Args:
        kind: ``"switching"`` (an :class:`~rlopt.RLSwitchingOptimizer` policy over ``choices``) or
            ``"lr"`` (the DQN of :class:`~rlopt.QLearningRateOptimizer`, ``control=("lr",)``).
        choices: the switching optimizer's choices (ignored for ``"lr"``).
        algo: ``"ppo"`` or ``"dqn"`` (``"lr"`` always uses DQN).
        episodes: training runs; one task each.
        seed: seeds the policy and the task sequence (task ``e`` has seed ``seed * 100003 + e``).
        out: checkpoint path (None: not saved).
        distribution: the tasks (default :class:`~rlopt.meta.tasks.TaskDistribution`).
        progress: show a tqdm bar (when tqdm is installed).
        keep_buffers: keep the replay buffer / rollout in the checkpoint (larger file).
        command: the command recorded in the metadata (default: the equivalent CLI call).
        register: a one-line description: also list the checkpoint in ``index.json`` next to
            ``out`` (its name is the file's stem), with the command and the measured time.
        threads: ``torch.set_num_threads`` for the run (None: leave it).
        reward: ``"default"`` (:class:`~rlopt.rewards.SwitchingReward`) or ``"paired"``
            (switching only): before each episode the task is also trained with SGD alone, and the
            policy is paid relative to that run (:class:`~rlopt.rewards.BaselineReward`). Costs
            one SGD run per episode more. ``"final"`` (switching, needs ``budget``): before each
            episode the task is also trained by the rule ``reference`` under the same budget, and
            the policy is paid at the end only, its final validation accuracy and loss against
            that run's (:class:`~rlopt.rewards.FinalReward`). Costs one reference run per episode.
        budget: ``compute_budget`` of every episode's optimizer (switching only; None: no budget).
            The policy then sees the budget features, and must be used with a budget.
        reference: the rule the ``"final"`` reward pays against (default ``"sam-late"``).
        shaping: ``"final"`` only: scale of a potential-based shaping term from the sharpness
            signal (:func:`~rlopt.rewards.sharpness_potential`; 0: none).
    """
    if kind not in ("switching", "lr"):
        raise ValueError(f"Unknown kind '{kind}'; expected 'switching' or 'lr'")
    if kind == "lr":
        algo = "dqn"
    if algo not in ("ppo", "dqn"):
        raise ValueError(f"Unknown algo '{algo}'; expected 'ppo' or 'dqn'")
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes < 1:
        raise ValueError(f"Invalid episodes: {episodes}")
    if reward not in ("default", "paired", "final"):
        raise ValueError(f"Unknown reward '{reward}'; expected 'default', 'paired' or 'final'")
    if reward == "paired" and (kind != "switching" or "sgd" not in choices):
        raise ValueError("reward='paired' needs kind='switching' with 'sgd' among the choices (the reference run)")
    if budget is not None and kind != "switching":
        raise ValueError("budget is for kind='switching'")
    if reward == "final" and (kind != "switching" or budget is None):
        raise ValueError("reward='final' needs kind='switching' and a budget (the reference run spends the same)")
    choices = tuple(choices)
    dist = distribution if distribution is not None else TaskDistribution()
    if command is None:
        command = _command(kind, choices, algo, episodes, seed, out, dist.data, register, reward, budget)
    if threads is not None:
        torch.set_num_threads(threads)

    policy: Any = _policy_config(kind, algo, episodes, dist, seed)
    g = torch.Generator().manual_seed(seed)
    fmnist, cifar10 = dist.resolved_fmnist_path(), dist.resolved_cifar10_path()
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=episodes, desc=f"{kind}/{algo}", unit="ep")
        except ImportError:
            pass
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*runs without fused kernels.*")
        for e in range(episodes):
            cfg = dist.sample(g, seed * 100003 + e)
            fn: Any = None
            if reward == "paired":
                fn = _reference_reward(cfg, fmnist, choices, seed, cifar10)
            elif reward == "final":
                assert budget is not None  # (main() refuses --reward final without --budget)
                fn = _final_reward(cfg, fmnist, choices, seed, cifar10, budget, reference, shaping)
            task = build_task(cfg, fmnist, cifar10)
            opt = _make_optimizer(kind, task, choices, policy, seed, fn, budget=budget)
            policy = opt.policy  # the first episode built it from the config; later ones reuse it
            summary = run_episode(task, opt)
            summary.pop("val_curve")
            if isinstance(fn, BaselineReward):
                summary["ref_val_acc"] = fn.reference[-1][1]
            elif isinstance(fn, FinalReward):
                summary["ref_val_acc"] = fn.reference[1]
            records.append({"episode": e, "task": cfg.short(), **summary})
            log.info("episode %d  return %.3f  val_acc %.3f  %s", e, summary["return"], summary["val_acc"], cfg.short())
            if bar is not None:
                recent = records[-20:]
                bar.set_postfix(
                    ret=f"{sum(r['return'] for r in recent) / len(recent):.2f}",
                    acc=f"{sum(r['val_acc'] for r in recent) / len(recent):.3f}",
                )
                bar.update()
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    returns = [r["return"] for r in records]
    metadata = {
        "trained_with": "rlopt.meta.train_policy",
        "optimizer_kind": kind,
        "algo": algo,
        "action_names": list(policy.action_names),
        "obs_layout_version": (policy.obs_layout or {}).get("version", LAYOUT_VERSION),
        "obs_layout": policy.obs_layout,
        "choices": list(choices) if kind == "switching" else ["sgd"],
        "task_distribution": dist.describe(),
        "episodes": episodes,
        "seed": seed,
        "task_seeds": f"seed * 100003 + episode, episode = 0..{episodes - 1}",
        "reward": reward,
        "compute_budget": budget,
        **({"reference": reference, "shaping": shaping} if reward == "final" else {}),
        "returns": [round(r, 4) for r in returns],
        "val_acc": [round(r["val_acc"], 4) for r in records],
        **({"sgd_val_acc": [round(r["ref_val_acc"], 4) for r in records]} if reward == "paired" else {}),
        **({"reference_val_acc": [round(r["ref_val_acc"], 4) for r in records]} if reward == "final" else {}),
        "tasks": [r["task"] for r in records],
        "decisions": [r["decisions"] for r in records],
        "diverged": [e for e, r in enumerate(records) if r["diverged"]],
        "action_share_last_20": {
            a: round(sum(r["action_share"][a] for r in records[-20:]) / len(records[-20:]), 4)
            for a in policy.action_names
        },
        "wall_time_s": round(wall, 1),
        "torch_version": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "command": command,
        "buffers_kept": keep_buffers,
    }
    policy.metadata = dict(metadata)
    path = None
    if out is not None:
        path = os.fspath(out)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        (policy if keep_buffers else compact(policy)).save(path, **metadata)
        if register:
            _register(Path(path), register, command, episodes, wall, kind, algo, list(policy.action_names))
    return TrainResult(policy, returns, records, wall, path, metadata)


def _register(
    path: Path, description: str, command: str, episodes: int, wall: float, kind: str, algo: str, actions: list[str]
) -> None:
    index_path = path.parent / "index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index[path.stem] = {
        "description": description,
        "command": command,
        "optimizer": kind,
        "algo": algo,
        "actions": actions,
        "episodes": episodes,
        "train_time_s": round(wall, 1),
        "trained_on": f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
    }
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def main(argv: Optional[Sequence[str]] = None) -> TrainResult:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m rlopt.meta.train_policy",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--kind",
        choices=("switching", "lr"),
        default="switching",
        help="the optimizer the policy drives: RLSwitchingOptimizer or QLearningRateOptimizer",
    )
    p.add_argument("--choices", default="sgd,sam", help="comma-separated switching choices")
    p.add_argument("--algo", choices=("ppo", "dqn"), default="ppo", help="the learner")
    p.add_argument("--episodes", type=int, default=200, help="training runs (one task each)")
    p.add_argument("--seed", type=int, default=0, help="policy seed; task e is drawn with seed * 100003 + e")
    p.add_argument(
        "--out",
        default=None,
        help="checkpoint path (default: runs/policies/<kind>-<algo>-s<seed>.pt under the current folder)",
    )
    p.add_argument(
        "--preset",
        choices=("classic", "resnet"),
        default="classic",
        help="task distribution (rlopt.meta.tasks.PRESETS): classic = teacher/MLP/CNN tasks, resnet = "
        "batch-norm ResNets on CIFAR-10 and Fashion-MNIST subsets with augmentation, weight decay, "
        "warm-up then cosine, label noise 0-40%%",
    )
    p.add_argument(
        "--data",
        default=None,
        help="task data sources: teacher, fmnist, cifar10 (default: the preset's; classic: teacher,fmnist)",
    )
    p.add_argument(
        "--cifar10",
        default=None,
        metavar="PATH",
        help="the CIFAR-10 subset file (default: $RLOPT_CIFAR10_SUBSET or data/meta/cifar10_subset.npz, "
        "built by python -m benchmarks.make_subset --dataset cifar10)",
    )
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="FIELD=VALUES",
        help="set a TaskDistribution field, e.g. --task epochs=10,20 --task label_noise=0.2,0.4 "
        "(repeatable; see rlopt.meta.tasks.TaskDistribution)",
    )
    p.add_argument(
        "--reward",
        choices=("default", "paired", "final"),
        default="default",
        help="paired: pay the policy relative to an SGD run of the same task; final: pay at the end only, "
        "the final validation accuracy and loss against a run of --reference under the same --budget "
        "(switching only)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="compute_budget of every episode (switching; e.g. 0.15: SAM on at most 15%% of the steps)",
    )
    p.add_argument("--reference", default="sam-late", help="the rule --reward final pays against")
    p.add_argument(
        "--shaping",
        type=float,
        default=0.0,
        help="--reward final: scale of the potential-based shaping from the sharpness signal (0: none)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--keep-buffers", action="store_true", help="keep the replay buffer in the checkpoint")
    p.add_argument(
        "--register",
        default=None,
        metavar="DESCRIPTION",
        help="also list the checkpoint in index.json next to --out with this description",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    a = p.parse_args(argv)
    if a.out is None:
        if a.register:
            p.error("--register needs an explicit --out (the index.json next to it is written)")
        a.out = os.path.join("runs", "policies", f"{a.kind}-{a.algo}-s{a.seed}.pt")
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(message)s")
    if not a.quiet and not a.no_progress:
        log.setLevel(logging.WARNING)  # the progress bar shows the running returns
    try:
        changes: dict[str, Any] = {} if a.data is None else {"data": tuple(s for s in a.data.split(",") if s)}
        if a.cifar10 is not None:
            changes["cifar10_path"] = a.cifar10
        dist = TaskDistribution.preset(a.preset, **changes).with_overrides(a.task)
    except ValueError as e:
        p.error(str(e))
    if a.reward in ("paired", "final") and a.kind != "switching":
        p.error(f"--reward {a.reward} is for --kind switching")
    if a.reward == "final" and a.budget is None:
        p.error("--reward final needs --budget (the reference run spends the same)")
    command = shlex.join(["python", "-m", "rlopt.meta.train_policy", *argv])
    result = train_policy(
        a.kind,
        tuple(c for c in a.choices.split(",") if c),
        a.algo,
        a.episodes,
        a.seed,
        a.out,
        distribution=dist,
        progress=not a.no_progress,
        keep_buffers=a.keep_buffers,
        command=command,
        register=a.register,
        threads=a.threads,
        reward=a.reward,
        budget=a.budget,
        reference=a.reference,
        shaping=a.shaping,
    )
    n = max(1, len(result.returns) // 5)
    first, last = result.returns[:n], result.returns[-n:]
    print(
        f"{a.kind}/{result.metadata['algo']}: {a.episodes} episodes in {result.wall_time_s:.1f} s; "
        f"mean return first {n}: {sum(first) / n:.3f}, last {n}: {sum(last) / n:.3f}"
        + (f"; saved {os.path.abspath(result.path)}" if result.path else "")
    )
    return result


if __name__ == "__main__":
    main()
