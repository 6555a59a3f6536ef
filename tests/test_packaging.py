"""Packaging: the conda environment matches pyproject.toml; the command runs as a module."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

import crystalmapping

ROOT = Path(__file__).resolve().parents[1]
#: pip name -> conda-forge name, where they differ
CONDA_NAME = {"msgpack": "msgpack-python", "matplotlib": "matplotlib-base"}


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)$", requirement).groups()
    return CONDA_NAME.get(name.lower(), name.lower()), spec.replace(" ", "")


def test_environment_yml_lists_what_pyproject_requires_with_the_same_ranges():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = dict(_split(r) for r in project["dependencies"] + project["optional-dependencies"]["test"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = dict(_split(d) for d in env["dependencies"]
                  if isinstance(d, str) and not d.startswith(("python", "pip")))
    assert listed == wanted
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python.replace(" ", "") == "python" + project["requires-python"]


def test_python_m_crystalmapping_and_version():
    out = subprocess.run([sys.executable, "-m", "crystalmapping", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"crystalmapping {crystalmapping.__version__}"
