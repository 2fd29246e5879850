"""Before/after figures of meta-training (``rlopt.meta.train_policy``) from its checkpoints.

    python benchmarks/results/learner_check/meta_compare.py OUT.json NAME=BEFORE.pt,AFTER.pt ...

The two checkpoints of a pair were trained with the same ``--seed``, so episode ``e`` is the same
task in both: the figures are paired differences (after - before) of each episode's return and
final validation accuracy, mean with a 95% t-interval, over all episodes and over the last 50.
"""

import json
import statistics
import sys

import torch
from scipy import stats


def paired(a, b):
    d = [y - x for x, y in zip(a, b)]
    m, s = statistics.mean(d), statistics.stdev(d)
    h = stats.t.ppf(0.975, len(d) - 1) * s / len(d) ** 0.5
    return {"mean": m, "lo": m - h, "hi": m + h, "n": len(d)}


def main(out, pairs):
    rows = {}
    for item in pairs:
        name, files = item.split("=")
        before, after = (torch.load(f, weights_only=True)["metadata"] for f in files.split(","))
        row = {}
        for key in ("returns", "val_acc"):
            row[key] = {
                "all": paired(before[key], after[key]),
                "last50": paired(before[key][-50:], after[key][-50:]),
                "before_last20": statistics.mean(before[key][-20:]),
                "after_last20": statistics.mean(after[key][-20:]),
            }
        row["sam_share_last20"] = {
            "before": before["action_share_last_20"].get("sam"),
            "after": after["action_share_last_20"].get("sam"),
        }
        rows[name] = row
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    for name, row in rows.items():
        r, v = row["returns"], row["val_acc"]
        print(
            f"| {name} | {r['before_last20']:.3f} -> {r['after_last20']:.3f} | "
            f"{r['all']['mean']:+.3f} [{r['all']['lo']:+.3f}, {r['all']['hi']:+.3f}] | "
            f"{100 * v['all']['mean']:+.2f} [{100 * v['all']['lo']:+.2f}, {100 * v['all']['hi']:+.2f}] | "
            f"{row['sam_share_last20']['before']:.2f} -> {row['sam_share_last20']['after']:.2f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
