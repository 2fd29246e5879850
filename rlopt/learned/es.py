"""Meta-training a rule by antithetic evolution strategies, the population run batched.

One ES iteration::

    eps_1..eps_h ~ N(0, I)                         # h antithetic pairs in weight space
    population  = [theta, theta + s eps_j, theta - s eps_j]
    for each of B tasks drawn from the distribution:
        run every member for T steps on the task   # one torch.func.vmap over the population
        f = meta_objective(losses)                 # mean over steps of log(L_t / L_0), clipped
        rank-normalise f over the perturbed members
    grad = sum_j (f+_j - f-_j) eps_j / (2 s h B)
    theta <- Adam(theta, grad)

Whole episodes of ``T`` steps from the task's initial point (no truncation, hence no
truncation bias, and no meta-gradient through the unroll). The centre ``theta`` rides along as
member 0, which gives the current meta-objective for free. Everything is seeded from one
``torch.Generator`` whose state is part of :meth:`ESTrainer.state_dict`, so a resumed run draws
the same tasks and perturbations as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch.func import grad_and_value, vmap

from .features import reference_step
from .rule import LearnedRule, RuleSpec
from .tasks import Task, TaskDistribution

__all__ = ["ESConfig", "ESTrainer", "rollout", "meta_objective"]

LOG_CAP = math.log(10.0)
"""A loss 10x above the start (or non-finite) scores as 10x: divergence is the worst outcome."""
LOG_FLOOR = -12.0


def meta_objective(losses: torch.Tensor) -> torch.Tensor:
    """``losses [P, T+1]`` (column 0 the initial loss) -> ``[P]``: the mean over steps ``1..T`` of
    ``log(L_t / L_0)`` clipped to ``[LOG_FLOOR, log 10]``; non-finite losses count as the cap.
    Lower is better. Scale-free, so tasks of any loss scale weigh alike."""
    ratio = torch.log(losses[:, 1:] / losses[:, :1])
    ratio = torch.nan_to_num(ratio, nan=LOG_CAP, posinf=LOG_CAP, neginf=LOG_FLOOR)
    return ratio.clamp(LOG_FLOOR, LOG_CAP).mean(1)


def rollout(thetas: torch.Tensor, spec: RuleSpec, task: Task, steps: int, lr: float) -> torch.Tensor:
    """Run the rules ``thetas [P, n]`` for ``steps`` steps on ``task`` from its initial point, all
    members at once (``torch.func.vmap``); returns the losses ``[P, steps + 1]``."""
    n_members, K = thetas.shape[0], len(spec.betas)
    params = [p.expand(n_members, *p.shape).clone() for p in task.init()]
    moms = [torch.zeros(n_members, K, *p.shape[1:]) for p in params]
    vs = [torch.zeros_like(p) for p in params]

    def member(
        theta: torch.Tensor, ps: list[torch.Tensor], ms: list[torch.Tensor], ws: list[torch.Tensor], step: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        grads, loss = grad_and_value(task.loss)(ps)
        new = [reference_step(theta, spec, p, g, m, w, step, lr) for p, g, m, w in zip(ps, grads, ms, ws)]
        return loss, [x[0] for x in new], [x[1] for x in new], [x[2] for x in new]

    batched = vmap(member, in_dims=(0, 0, 0, 0, None))
    losses = torch.empty(n_members, steps + 1)
    with torch.no_grad():
        for t in range(steps):
            losses[:, t], params, moms, vs = batched(thetas, params, moms, vs, torch.tensor(float(t)))
        losses[:, steps] = vmap(task.loss)(params)
    return losses


def _centered_ranks(f: torch.Tensor) -> torch.Tensor:
    ranks = torch.empty_like(f)
    ranks[f.argsort()] = torch.arange(len(f), dtype=f.dtype)
    return ranks / max(len(f) - 1, 1) - 0.5


@dataclass
class ESConfig:
    """Hyper-parameters of the ES meta-training (defaults: the shipped ``learned-es`` rule)."""

    pairs: int = 8
    """Antithetic pairs per iteration (population ``2 * pairs + 1`` with the centre)."""
    tasks_per_iter: int = 4
    steps: int = 50
    """Episode length ``T``: the meta-training horizon."""
    sigma: float = 0.05
    meta_lr: float = 0.01
    lr: float = 0.02
    """The base learning rate the rule is trained at (the optimizer's default ``lr``)."""
    hidden: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("pairs", "tasks_per_iter", "steps", "hidden"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {name}: {v}")
        for name in ("sigma", "meta_lr", "lr"):
            v = getattr(self, name)
            if not 0.0 < v < math.inf:
                raise ValueError(f"Invalid {name}: {v}")


class ESTrainer:
    """Antithetic ES on a rule's weights over a task distribution (see the module docstring)."""

    def __init__(
        self,
        config: ESConfig,
        tasks: TaskDistribution,
        spec: Optional[RuleSpec] = None,
        theta: Optional[torch.Tensor] = None,
    ):
        self.config, self.tasks = config, tasks
        self.spec = spec or RuleSpec(hidden=config.hidden)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.theta = (theta.clone() if theta is not None else self.spec.init_theta(self.generator)).float()
        self.meta_opt = torch.optim.Adam([self.theta], lr=config.meta_lr)
        self.iteration = 0
        self.history: list[dict[str, float]] = []

    def step(self) -> dict[str, float]:
        """One ES iteration; returns ``{"iteration", "objective"}`` (the centre's mean objective)."""
        cfg = self.config
        eps = torch.randn(cfg.pairs, self.theta.numel(), generator=self.generator)
        thetas = torch.cat([self.theta[None], self.theta + cfg.sigma * eps, self.theta - cfg.sigma * eps])
        shaped = torch.zeros(2 * cfg.pairs)
        centre = 0.0
        for _ in range(cfg.tasks_per_iter):
            task = self.tasks.sample(self.generator)
            f = meta_objective(rollout(thetas, self.spec, task, cfg.steps, cfg.lr))
            centre += float(f[0]) / cfg.tasks_per_iter
            shaped += _centered_ranks(f[1:])
        diff = shaped[: cfg.pairs] - shaped[cfg.pairs :]
        grad = (diff[:, None] * eps).sum(0) / (2 * cfg.sigma * cfg.pairs * cfg.tasks_per_iter)
        self.meta_opt.zero_grad()
        self.theta.grad = grad
        self.meta_opt.step()
        self.theta.grad = None
        self.iteration += 1
        record = {"iteration": self.iteration, "objective": centre}
        self.history.append(record)
        return record

    def evaluate(self, tasks: Sequence[Task], theta: Optional[torch.Tensor] = None) -> float:
        """Mean meta-objective of ``theta`` (default: the current one) over fixed ``tasks``."""
        theta = self.theta if theta is None else theta
        return float(
            sum(
                float(meta_objective(rollout(theta[None], self.spec, t, self.config.steps, self.config.lr))[0])
                for t in tasks
            )
            / len(tasks)
        )

    def rule(self, meta: Optional[dict[str, Any]] = None) -> LearnedRule:
        return LearnedRule(self.spec, self.theta.detach(), lr=self.config.lr, meta=dict(meta or {}))

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "spec": self.spec.to_dict(),
            "theta": self.theta.detach().clone(),
            "meta_opt": self.meta_opt.state_dict(),
            "iteration": self.iteration,
            "generator": self.generator.get_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["spec"] != self.spec.to_dict():
            raise ValueError("This ES checkpoint was made for a different rule spec")
        with torch.no_grad():
            self.theta.copy_(sd["theta"])
        self.meta_opt.load_state_dict(sd["meta_opt"])
        self.iteration = int(sd["iteration"])
        self.generator.set_state(sd["generator"])
        self.history = list(sd["history"])
