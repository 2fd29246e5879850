"""The off-policy actor-critic alternative: TD3 on the coordinate-wise decomposition.

Li & Malik (2016) trained their update policy with an actor-critic for continuous actions. Here
the rule's MLP *is* the actor, applied to every coordinate, and each coordinate's step is one
transition of a shared MDP::

    observation  o_i = (f_i, s)       # the rule's features of coordinate i, the time features
    action       a_i = clip(rule(o_i) + noise, -1, 1)^2   -> step  lr * a_i0 * exp(kappa * a_i1)
    reward       r   = log L_t - log L_{t+1}  (the same for every coordinate; clipped to [-1, 1])

A random subset of coordinates per step goes to a replay buffer; TD3 (Fujimoto et al., 2018:
twin critics, target-policy smoothing, delayed actor updates) learns ``Q(o, a)`` and the actor
by the deterministic policy gradient. Credit assignment is the decomposition's weak point: a
coordinate's reward is mostly the other coordinates' doing. The result is a
:class:`~rlopt.learned.rule.LearnedRule` like ES's, scored on the same validation tasks with the
same meta-objective, for the comparison in ``benchmarks/results/learned_es_vs_td3``::

    python -m rlopt.learned.td3 --data rlopt/meta/data/fmnist_subset.npz --time-budget 600
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Sequence
from typing import Any, Optional, cast

import torch
from torch import nn
from torch.func import grad_and_value

from .es import meta_objective, rollout
from .features import coordinate_features, time_features
from .rule import LearnedRule, RuleSpec
from .tasks import TRAIN_FAMILIES, Task, TaskDistribution, load_fmnist

__all__ = ["TD3Trainer", "main"]


def _actor_outputs(theta: torch.Tensor, spec: RuleSpec, obs: torch.Tensor) -> torch.Tensor:
    """Pre-clip outputs ``[B, 2]`` of the rule on observations ``[B, F + S]`` (differentiable)."""
    w = spec.unpack(theta)
    F = spec.n_features
    f, s = obs[:, :F], obs[:, F:]
    h = torch.relu(f @ w["w1"].t() + s @ w["u"].t() + w["b1"])
    return h @ w["w2"].t() + w["b2"] + f @ w["skip"].t()


class TD3Trainer:
    def __init__(
        self,
        tasks: TaskDistribution,
        spec: Optional[RuleSpec] = None,
        steps: int = 50,
        lr: float = 0.02,
        seed: int = 0,
        buffer_size: int = 200_000,
        batch_size: int = 256,
        per_step: int = 32,
        gamma: float = 0.9,
        tau: float = 0.01,
        actor_lr: float = 1e-3,
        critic_lr: float = 1e-3,
        explore: float = 0.2,
        policy_noise: float = 0.2,
        noise_clip: float = 0.5,
        policy_delay: int = 2,
    ):
        self.tasks, self.spec, self.steps, self.lr = tasks, spec or RuleSpec(), steps, lr
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.theta = nn.Parameter(self.spec.init_theta(self.generator))
        self.theta_target = self.theta.detach().clone()
        dim = self.spec.n_features + self.spec.n_scalars + 2
        self.critics = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
                for _ in range(2)
            ]
        )
        self.critics_target = copy.deepcopy(self.critics)
        self.actor_opt = torch.optim.Adam([self.theta], lr=actor_lr)
        self.critic_opt = torch.optim.Adam(self.critics.parameters(), lr=critic_lr)
        obs_dim = dim - 2
        self.buf = {
            "obs": torch.zeros(buffer_size, obs_dim),
            "act": torch.zeros(buffer_size, 2),
            "rew": torch.zeros(buffer_size),
            "next": torch.zeros(buffer_size, obs_dim),
            "done": torch.zeros(buffer_size),
        }
        self.size, self.ptr, self.updates = 0, 0, 0
        self.batch_size, self.per_step, self.gamma, self.tau = batch_size, per_step, gamma, tau
        self.explore, self.policy_noise, self.noise_clip, self.policy_delay = (
            explore,
            policy_noise,
            noise_clip,
            policy_delay,
        )

    # ------------------------------------------------------------------ acting
    def _observe(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        moms: Sequence[torch.Tensor],
        vs: Sequence[torch.Tensor],
        step: torch.Tensor,
    ) -> torch.Tensor:
        s = time_features(step, self.spec)
        feats = torch.cat(
            [coordinate_features(p, g, m, v, step, self.spec) for p, g, m, v in zip(params, grads, moms, vs)], dim=1
        ).t()
        return torch.cat([feats, s.expand(feats.shape[0], -1)], dim=1)

    def _store(
        self, obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor, nxt: torch.Tensor, done: torch.Tensor
    ) -> None:
        n = obs.shape[0]
        idx = (torch.arange(n) + self.ptr) % self.buf["obs"].shape[0]
        for k, v in (("obs", obs), ("act", act), ("rew", rew), ("next", nxt), ("done", done)):
            self.buf[k][idx] = v
        self.ptr = int((self.ptr + n) % self.buf["obs"].shape[0])
        self.size = min(self.size + n, self.buf["obs"].shape[0])

    def episode(self) -> float:
        """One task, ``steps`` steps with exploration noise, one TD3 update per step; returns
        the episode's meta-objective (same definition as ES's)."""
        spec, K = self.spec, len(self.spec.betas)
        task = self.tasks.sample(self.generator)
        params = task.init()
        moms = [torch.zeros(K, *p.shape) for p in params]
        vs = [torch.zeros_like(p) for p in params]
        losses, prev = [], None
        for t in range(self.steps + 1):
            grads, loss = grad_and_value(task.loss)(params)
            loss = loss.detach()
            losses.append(float(loss))
            finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(g).all()) for g in grads)
            step = torch.tensor(float(t + 1))
            if finite:
                moms = [
                    m + (1 - torch.tensor(spec.betas).reshape(-1, *([1] * g.dim()))) * (g - m)
                    for m, g in zip(moms, grads)
                ]
                vs = [v + (1 - spec.beta2) * (g * g - v) for v, g in zip(vs, grads)]
                obs = self._observe(params, grads, moms, vs, step)
            if prev is not None:
                p_obs, p_act, p_loss, pick = prev
                done = t == self.steps or not finite
                r = (torch.log(p_loss) - torch.log(loss)).clamp(-1, 1) if finite else torch.tensor(-1.0)
                nxt = obs[pick] if finite else p_obs
                self._store(p_obs, p_act, r.expand(len(pick)), nxt, torch.full((len(pick),), float(done)))
                self.update()
            if not finite or t == self.steps:
                break
            with torch.no_grad():
                act = _actor_outputs(self.theta, spec, obs).clamp(-1, 1)
                act = (act + self.explore * torch.randn(act.shape, generator=self.generator)).clamp(-1, 1)
            d = act[:, 0] * torch.exp(spec.kappa * act[:, 1])
            offsets = [0]
            for p in params:
                offsets.append(offsets[-1] + p.numel())
            params = [p - self.lr * d[a:b].reshape(p.shape) for p, a, b in zip(params, offsets[:-1], offsets[1:])]
            n = obs.shape[0]
            pick = torch.randperm(n, generator=self.generator)[: self.per_step]
            prev = (obs[pick], act[pick], loss, pick)
        losses += [float("nan")] * (self.steps + 1 - len(losses))
        return float(meta_objective(torch.tensor([losses]))[0])

    # ------------------------------------------------------------------ learning
    def update(self) -> None:
        if self.size < max(self.batch_size, 1000):
            return
        idx = torch.randint(self.size, (self.batch_size,), generator=self.generator)
        obs, act, rew, nxt, done = (self.buf[k][idx] for k in ("obs", "act", "rew", "next", "done"))
        with torch.no_grad():
            noise = (torch.randn(act.shape, generator=self.generator) * self.policy_noise).clamp(
                -self.noise_clip, self.noise_clip
            )
            nact = (_actor_outputs(self.theta_target, self.spec, nxt).clamp(-1, 1) + noise).clamp(-1, 1)
            qn = torch.min(*[c(torch.cat([nxt, nact], 1)).squeeze(1) for c in self.critics_target])
            target = rew + self.gamma * (1 - done) * qn
        q = [c(torch.cat([obs, act], 1)).squeeze(1) for c in self.critics]
        critic_loss = cast(torch.Tensor, sum(nn.functional.mse_loss(qi, target) for qi in q))  # not the int start
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        self.updates += 1
        if self.updates % self.policy_delay == 0:
            out = _actor_outputs(self.theta, self.spec, obs)
            a = out.clamp(-1, 1)
            # the clip has no gradient outside [-1, 1]: a small penalty keeps outputs inside
            actor_loss = (
                -self.critics[0](torch.cat([obs, a], 1)).mean() + 1e-2 * torch.relu(out.abs() - 1).square().mean()
            )
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            with torch.no_grad():
                self.theta_target.lerp_(self.theta.detach(), self.tau)
                for c, ct in zip(self.critics, self.critics_target):
                    for p, pt in zip(c.parameters(), ct.parameters()):
                        pt.lerp_(p.detach(), self.tau)

    def evaluate(self, tasks: Sequence[Task]) -> float:
        theta = self.theta.detach()
        return float(
            sum(float(meta_objective(rollout(theta[None], self.spec, t, self.steps, self.lr))[0]) for t in tasks)
            / len(tasks)
        )

    def rule(self, meta: Optional[dict[str, Any]] = None) -> LearnedRule:
        return LearnedRule(self.spec, self.theta.detach(), lr=self.lr, meta=dict(meta or {}))


def main(argv: Optional[list[str]] = None) -> dict:
    from .train import validation_tasks

    ap = argparse.ArgumentParser(
        prog="python -m rlopt.learned.td3",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--data", default=None, help="Fashion-MNIST .npz for the MLP tasks (else random teachers)")
    ap.add_argument("--time-budget", type=float, default=600.0, help="seconds of training (wall clock)")
    ap.add_argument("--steps", type=int, default=50, help="episode length T (the horizon)")
    ap.add_argument("--lr", type=float, default=0.02, help="base learning rate of the rule")
    ap.add_argument("--hidden", type=int, default=8, help="hidden width of the rule's MLP")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    ap.add_argument("--eval-every", type=int, default=20, help="validate every N episodes")
    ap.add_argument("--out", default="benchmarks/runs/learned/td3/rule.pt", help="best rule (by validation)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_fmnist(args.data) if args.data else None
    trainer = TD3Trainer(
        TaskDistribution(TRAIN_FAMILIES, data),
        RuleSpec(hidden=args.hidden),
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
    )
    val = validation_tasks(TRAIN_FAMILIES, data)
    start = time.perf_counter()
    best: dict[str, Any] = {"objective": trainer.evaluate(val), "episode": 0, "theta": trainer.theta.detach().clone()}
    history = [{"episode": 0, "elapsed_s": 0.0, "validation": best["objective"]}]
    episodes = 0
    while time.perf_counter() - start < args.time_budget:
        trainer.episode()
        episodes += 1
        if episodes % args.eval_every == 0:
            score = trainer.evaluate(val)
            history.append(
                {
                    "episode": episodes,
                    "updates": trainer.updates,
                    "elapsed_s": round(time.perf_counter() - start, 1),
                    "validation": score,
                }
            )
            print(json.dumps(history[-1]), flush=True)
            if score < best["objective"]:
                best = {"objective": score, "episode": episodes, "theta": trainer.theta.detach().clone()}
    rule = LearnedRule(
        trainer.spec,
        best["theta"],
        lr=args.lr,
        meta={
            "algo": "td3",
            "episodes": episodes,
            "best_episode": best["episode"],
            "validation_objective": best["objective"],
        },
    )
    rule.save(args.out)
    result = {
        "episodes": episodes,
        "updates": trainer.updates,
        "best_validation": best["objective"],
        "best_episode": best["episode"],
        "history": history,
        "time_budget_s": args.time_budget,
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"best validation objective {best['objective']:.4f} at episode {best['episode']} ({episodes} episodes)")
    return result


if __name__ == "__main__":
    main()
