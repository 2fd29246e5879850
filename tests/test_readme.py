"""The README's self-contained examples (those that start with an import and print what they
did) run as pasted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if b.startswith("import ") and "print(" in b]


def test_there_are_runnable_examples():
    assert len(RUNNABLE) >= 3


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs_as_pasted(index, capsys, tmp_path, monkeypatch):
    block = RUNNABLE[index]
    for extra in ("optuna", "lightning", "transformers"):
        if f"import {extra}" in block or f"from {extra}" in block:
            pytest.importorskip(extra)
    monkeypatch.chdir(tmp_path)  # an example may write files (a study's database)
    exec(compile(block, f"README example {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # each prints what it did
