"""What an installed wheel holds: every folder of the package with Python modules is a package
(a folder without ``__init__.py`` is left out of the wheel by ``packages = find:``)."""

from __future__ import annotations

import os

import setuptools

import rlopt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rlopt.__file__)))


def test_every_module_folder_is_a_package():
    found = set(setuptools.find_packages(ROOT, include=["rlopt", "rlopt.*"]))
    for folder, _, files in os.walk(os.path.join(ROOT, "rlopt")):
        if "__pycache__" in folder or not any(f.endswith(".py") for f in files):
            continue
        name = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        assert name in found, f"{name} has Python modules but no __init__.py: the wheel would leave it out"


def test_console_scripts_resolve():
    import configparser
    import importlib

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    scripts = [line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    assert scripts
    for name, target in scripts:
        module, func = target.strip().split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
