"""Command-line plumbing shared by the benchmark scripts.

Contract of every ``python -m benchmarks.<name>`` command:

- ``--help`` lists every flag with a help string and its default (:class:`HelpFormatter`);
- paths the scripts choose by themselves are resolved from this package, not from the working
  directory, so a command behaves the same wherever it is started;
- a run writes under the git-ignored :data:`RUNS_DIR` (``benchmarks/runs/``) unless ``--out`` names
  another place, and prints where it wrote; committed results under ``benchmarks/results/`` are
  written only when ``--out`` points there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn, Optional

__all__ = [
    "HelpFormatter",
    "parser",
    "PACKAGE_DIR",
    "REPO_DIR",
    "RUNS_DIR",
    "RESULTS_DIR",
    "DATA_DIR",
    "runs_path",
    "missing_data_message",
    "fail",
]

#: the ``benchmarks`` package folder
PACKAGE_DIR = Path(__file__).resolve().parent
#: the repository checkout holding it
REPO_DIR = PACKAGE_DIR.parent
#: default output root (git-ignored)
RUNS_DIR = PACKAGE_DIR / "runs"
#: committed study folders
RESULTS_DIR = PACKAGE_DIR / "results"
#: default data folder when neither ``--data-dir`` nor ``$RLOPT_DATA_DIR`` is given (git-ignored)
DATA_DIR = REPO_DIR / "data"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except that a help text which already states its default
    (it contains the word "default") is left as it is, so the default is never shown twice."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if "default" in text.replace("%(default)s", "default"):
            return text
        return super()._get_help_string(action)


def parser(module: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` for ``python -m benchmarks.<module>`` with :class:`HelpFormatter`."""
    return argparse.ArgumentParser(
        prog=f"python -m benchmarks.{module}", description=description, formatter_class=HelpFormatter, **kwargs
    )


def runs_path(*parts: str) -> Path:
    """A default output path under :data:`RUNS_DIR`."""
    return RUNS_DIR.joinpath(*parts)


def missing_data_message(err, offline_hint: str = "") -> str:
    """One line for ``parser.error`` when a data set is not found: which flags to pass."""
    hint = f"; {offline_hint}" if offline_hint else ""
    return (
        f"no {err.name} data under {err.root}: pass --data-dir PATH (a folder with the data set, its idx "
        f".gz files or an image tar), set $RLOPT_DATA_DIR, or pass --download{hint}"
    )


def fail(ap: argparse.ArgumentParser, message: str) -> NoReturn:
    """Exit with status 2 and one line, ``<prog>: error: <message>``, without the (long) usage."""
    print(f"{ap.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)
