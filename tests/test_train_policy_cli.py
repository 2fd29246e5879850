"""The meta-training command line: every flag explained with its default, a run without --out
saves under ./runs/ (never into the installed package) and says where."""

from __future__ import annotations

import os
import re

import pytest

import rlopt
from rlopt.meta.train_policy import main


def test_help_explains_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    flags = set(re.findall(r"^\s+(--[a-z-]+)", text, flags=re.M)) - {"--help"}
    assert {"--out", "--episodes", "--register", "--seed"} <= flags
    for flag in flags:
        block = text.split(flag, 1)[1].split("\n  -", 1)[0]
        assert len(block.strip()) > 10, f"{flag} has no help text"
    assert "(default: 200)" in text and "runs/policies" in text


def test_a_run_without_out_saves_under_runs_and_not_into_the_package(tmp_path, monkeypatch, capsys):
    package = os.path.dirname(rlopt.__file__)
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(package) for p in fs}
    monkeypatch.chdir(tmp_path)
    result = main(["--episodes", "2", "--no-progress", "--quiet", "--task", "epochs=1"])
    saved = tmp_path / "runs" / "policies" / "switching-ppo-s0.pt"
    assert saved.is_file() and os.path.abspath(result.path) == str(saved)
    assert str(saved) in capsys.readouterr().out
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(package) for p in fs}
    assert {k: v for k, v in after.items() if not k.endswith(".pyc")} == {
        k: v for k, v in before.items() if not k.endswith(".pyc")
    }
    assert rlopt.load_policy(str(saved)).action_names == ("sgd", "sam")


def test_register_needs_an_explicit_out(capsys):
    with pytest.raises(SystemExit):
        main(["--register", "a description"])
    assert "--register needs an explicit --out" in capsys.readouterr().err


def test_help_lists_the_presets_the_budget_and_the_final_reward(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "--preset {classic,resnet}" in text and "--budget" in text and "final" in text and "--reference" in text


def test_an_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "nope"])
    assert "invalid choice" in capsys.readouterr().err
