"""The benchmark command lines: help text, where default runs write, errors that name flags.

Contract (benchmarks/cli.py): every flag has a help string that shows its default; a run without
``--out`` writes under the git-ignored ``benchmarks/runs/`` whatever the working directory, never
into tracked files; a missing data set ends with one line naming the flags to pass.
"""

import argparse
import importlib
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchvision")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cli import RUNS_DIR  # noqa: E402

#: every ``python -m benchmarks.<module>`` command with a ``main(argv)``
MODULES = [
    "demo",
    "overhead",
    "speed",
    "table",
    "train",
    "lr_control",
    "policy_eval",
    "policy_probe",
    "sam_payoff",
    "make_subset",
]
#: scripts run as files (``PYTHONPATH=. python benchmarks/scripts/<name>``)
SCRIPTS = ["count_step_ops.py", "step_host_cost.py", "diff_tables.py"]


class _Parsed(Exception):
    pass


def _parser_of(module, monkeypatch):
    """The ArgumentParser ``main`` builds, caught at ``parse_args`` (nothing runs)."""
    seen = {}

    def catch(self, *args, **kwargs):
        seen["parser"] = self
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(_Parsed):
        importlib.import_module(f"benchmarks.{module}").main([])
    return seen["parser"]


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}
    return env


@pytest.mark.parametrize("module", MODULES)
def test_every_flag_has_help_with_its_default(module, monkeypatch, capsys):
    ap = _parser_of(module, monkeypatch)
    assert issubclass(ap.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    formatter = ap.formatter_class(prog=ap.prog)
    for action in ap._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{module}: {name} has no help text"
        if action.option_strings:  # positionals are required: no default to show
            shown = formatter._get_help_string(action) % {**vars(action), "prog": ap.prog}
            assert "default" in shown, f"{module}: {name}'s help does not show its default: {shown!r}"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as end:
        importlib.import_module(f"benchmarks.{module}").main(["--help"])
    assert end.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m benchmarks.{module}")


@pytest.mark.parametrize("module", MODULES)
def test_outputs_default_to_the_ignored_runs_folder(module, monkeypatch):
    ap = _parser_of(module, monkeypatch)
    outs = [a for a in ap._actions if a.dest in ("out", "out_dir")]
    for a in outs:  # None: the script picks a name under benchmarks/runs/ (checked by a run below for one)
        assert a.default is None or Path(a.default).resolve().is_relative_to(RUNS_DIR), (module, a.default)
        assert "benchmarks/runs" in (a.help or "") or a.default is not None


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_shows_defaults(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as end:
        runpy.run_path(str(ROOT / "benchmarks" / "scripts" / script), run_name="__main__")
    assert end.value.code == 0
    text = capsys.readouterr().out
    entries = []  # one per option: its first line and the deeper-indented lines after it
    for line in text.split("options:")[-1].splitlines():
        if line.startswith("  -"):
            entries.append(line)
        elif entries and line.startswith("    "):
            entries[-1] += line
    flags = [e for e in entries if not e.lstrip().startswith("-h")]
    assert flags and all("default" in e for e in flags), text


def _tracked_status():
    res = subprocess.run(
        ["git", "status", "--porcelain", "--", "benchmarks/results", "benchmarks/data"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    return res.stdout if res.returncode == 0 else None


def test_default_run_writes_only_ignored_files_from_any_directory(tmp_path):
    if _tracked_status() is None:
        pytest.skip("not a git checkout")
    before = _tracked_status()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.overhead",
            "--cases",
            "mlp",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--block",
            "4",
            "--warmup",
            "1",
            "--threads",
            "1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    wrote = res.stdout.strip().splitlines()[-1]
    assert wrote.startswith("wrote "), res.stdout
    paths = [Path(w.strip(",")) for w in wrote.split()[1:] if w.strip(",").endswith((".md", ".json"))]
    assert paths and all(p.is_file() and p.resolve().is_relative_to(RUNS_DIR) for p in paths), wrote
    ignored = subprocess.run(["git", "check-ignore", "-q", str(paths[0])], cwd=ROOT)
    assert ignored.returncode == 0, f"{paths[0]} is not git-ignored"
    assert not list(tmp_path.iterdir()), "wrote into the working directory"
    assert _tracked_status() == before
    for p in paths:
        p.unlink()


@pytest.mark.parametrize(
    "module,hint", [("table", "--smoke"), ("train", "--dataset fmnist-subset"), ("speed", "--download")]
)
def test_missing_data_fails_with_one_line_naming_the_flags(module, hint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLOPT_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as end:
        importlib.import_module(f"benchmarks.{module}").main([])  # no arguments at all
    assert end.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"python -m benchmarks.{module}: error: no cifar10 data")
    assert "--data-dir" in lines[0] and hint in lines[0]
    assert "data_dir=" not in err and "download=True" not in err
