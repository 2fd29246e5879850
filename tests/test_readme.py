"""The README's self-contained examples run as pasted."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
RUNNABLE = [b for b in BLOCKS if "import torch" in b and "from rlopt import" in b]


def test_there_are_runnable_examples():
    assert len(RUNNABLE) >= 2


@pytest.mark.parametrize("index", range(len(RUNNABLE)))
def test_readme_example_runs_as_pasted(index, capsys):
    exec(compile(RUNNABLE[index], f"README example {index}", "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out  # each prints what it did
