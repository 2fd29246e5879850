"""Method by method, final test accuracy of table A minus table B (two ``summary.json`` files written by
``benchmarks.table``), with the Welch 95% interval of ``benchmarks.table.welch_diff``; markdown on stdout.

    PYTHONPATH=. python benchmarks/scripts/diff_tables.py A/summary.json B/summary.json [--out diff.md]
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from benchmarks.cli import HelpFormatter
from benchmarks.table import welch_diff


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(
        prog="diff_tables.py", description=__doc__.splitlines()[0], formatter_class=HelpFormatter
    )
    ap.add_argument("a", help="summary.json of table A")
    ap.add_argument("b", help="summary.json of table B")
    ap.add_argument("--out", default=None, help="also write the markdown to this file (default: stdout only)")
    args = ap.parse_args(argv)
    rows = {}
    for key, path in (("a", args.a), ("b", args.b)):
        rows[key] = {r["method"]: r for r in json.loads(Path(path).read_text())["methods"]}
    lines = [
        f"# {args.a} minus {args.b}",
        "",
        "- command: `PYTHONPATH=. python benchmarks/scripts/diff_tables.py "
        + shlex.join(sys.argv[1:] if argv is None else list(argv))
        + "`",
        "- final test accuracy, mean over seeds; 95% interval: Welch's t over seeds",
        "",
        "| method | n (A, B) | A | B | A - B (points) | 95% interval | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, ra in rows["a"].items():
        rb = rows["b"].get(method)
        if rb is None:
            continue
        a, b = ra["final_test_acc"], rb["final_test_acc"]
        diff, half = welch_diff(a, b, ra["n"], rb["n"])
        interval = "-" if math.isnan(half) else f"[{100 * (diff - half):+.2f}, {100 * (diff + half):+.2f}]"
        verdict = (
            "too few runs"
            if math.isnan(half)
            else "A higher"
            if diff - half > 0
            else "B higher"
            if diff + half < 0
            else "not separable"
        )
        lines.append(
            f"| {method} | {ra['n']}, {rb['n']} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} | "
            f"{100 * b['mean']:.2f} ± {100 * b['std']:.2f} | {100 * diff:+.2f} | {interval} | {verdict} |"
        )
    md = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(md)
    print(md, end="")
    return md


if __name__ == "__main__":
    main()
