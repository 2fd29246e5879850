"""What a policy would do on the observations logged by benchmark runs.

``python -m benchmarks.policy_probe switch-sgd-sam benchmarks/results/cifar10_resnet18_e30/runs/*pre-sgd-sam*.json``

Every run log written by :mod:`benchmarks.train` keeps each decision's observation. This script
feeds them to a policy (a shipped name or a checkpoint path) and prints, per action, the policy's
probability (PPO) or the share of decisions where it has the highest Q-value and the mean gap to
the runner-up (DQN). It shows whether a frozen policy's choices depend on the state, and how far
from a tie its greedy choice is, without any training.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import rlopt

from .cli import parser


def logged_observations(paths: Sequence[str]) -> list[list[float]]:
    obs = []
    for p in paths:
        obs += [d["observation"] for d in json.loads(Path(p).read_text())["decisions"]]
    return obs


def probe(policy: Any, observations: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Per action: min / mean / max probability (PPO), or greedy share and mean Q gap (DQN)."""
    if not observations:
        raise ValueError("No logged decisions to probe")
    x = torch.tensor(observations, dtype=torch.float32)
    names = list(policy.action_names)
    with torch.no_grad():
        if hasattr(policy, "probabilities"):
            p = torch.stack([policy.probabilities(o) for o in x])
            return {
                "kind": "probabilities",
                "decisions": len(x),
                "actions": {
                    a: {
                        "min": float(p[:, i].min()),
                        "mean": float(p[:, i].mean()),
                        "max": float(p[:, i].max()),
                        "greedy_share": float((p.argmax(1) == i).float().mean()),
                    }
                    for i, a in enumerate(names)
                },
            }
        q = torch.stack([policy.q_values(o) for o in x])
    top2 = q.topk(min(2, q.shape[1]), dim=1).values
    gap = (top2[:, 0] - top2[:, -1]).tolist()
    return {
        "kind": "q_values",
        "decisions": len(x),
        "mean_gap_to_runner_up": statistics.mean(gap),
        "actions": {a: {"greedy_share": float((q.argmax(1) == i).float().mean())} for i, a in enumerate(names)},
    }


def by_feature(
    policy: Any, observations: Sequence[Sequence[float]], feature: str, action: str, bins: int = 3
) -> dict[str, Any]:
    """How a PPO policy's probability of ``action`` follows one observation feature: their
    correlation, and the mean probability and greedy share in equal-width bins of the feature."""
    names = list(policy.obs_layout["names"])
    if feature not in names:
        raise ValueError(f"Unknown feature {feature!r}; the layout has {names}")
    x = torch.tensor(observations, dtype=torch.float32)
    with torch.no_grad():
        p = torch.stack([policy.probabilities(o) for o in x])
    a = list(policy.action_names).index(action)
    f, pa, greedy = x[:, names.index(feature)], p[:, a], (p.argmax(1) == a).float()
    corr = float(torch.corrcoef(torch.stack([f, pa]))[0, 1]) if f.std() > 0 and pa.std() > 0 else float("nan")
    edges = torch.linspace(float(f.min()), float(f.max()), bins + 1)
    rows = []
    for k in range(bins):
        m = (f >= edges[k]) & ((f < edges[k + 1]) if k < bins - 1 else (f <= edges[k + 1]))
        if m.any():
            rows.append(
                {
                    "from": float(edges[k]),
                    "to": float(edges[k + 1]),
                    "decisions": int(m.sum()),
                    "mean_p": float(pa[m].mean()),
                    "greedy_share": float(greedy[m].mean()),
                }
            )
    return {"feature": feature, "action": action, "correlation": corr, "bins": rows}


def main(argv=None) -> dict[str, Any]:
    ap = parser("policy_probe", __doc__.splitlines()[0] + " Prints its report; writes nothing.")
    ap.add_argument("policy", help="a shipped policy name (rlopt.list_policies()) or a checkpoint path")
    ap.add_argument("runs", nargs="+", help="run logs (JSON) written by benchmarks.train / benchmarks.table")
    ap.add_argument(
        "--by",
        nargs=2,
        metavar=("FEATURE", "ACTION"),
        default=None,
        help="also show how P(ACTION) follows FEATURE (PPO policies), e.g. --by progress sam (default: not shown)",
    )
    args = ap.parse_args(argv)
    policy, observations = rlopt.load_policy(args.policy), logged_observations(args.runs)
    res = probe(policy, observations)
    print(f"{args.policy} on {res['decisions']} logged decisions from {len(args.runs)} run(s):")
    for a, v in res["actions"].items():
        if res["kind"] == "probabilities":
            print(
                f"  {a}: P min {v['min']:.3f} mean {v['mean']:.3f} max {v['max']:.3f}; "
                f"most probable in {100 * v['greedy_share']:.0f}% of decisions"
            )
        else:
            print(f"  {a}: highest Q in {100 * v['greedy_share']:.0f}% of decisions")
    if res["kind"] == "q_values":
        print(f"  mean Q gap between the best and second-best action: {res['mean_gap_to_runner_up']:.4f}")
    if args.by:
        res["by"] = by = by_feature(policy, observations, *args.by)
        print(f"  P({by['action']}) against {by['feature']}: correlation {by['correlation']:+.2f}")
        for b in by["bins"]:
            print(
                f"    {by['feature']} {b['from']:+.2f} to {b['to']:+.2f} ({b['decisions']} decisions): "
                f"mean P {b['mean_p']:.3f}, most probable in {100 * b['greedy_share']:.0f}%"
            )
    return res


if __name__ == "__main__":
    main()
