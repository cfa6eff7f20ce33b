"""The command line as a package: one small module per verb group, every command on the group, a light import and
``python -m continue_pt.cli`` (how torchrun starts it on each node)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import click

from continue_pt.cli import cli

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "continue_pt" / "cli"
MAX_LINES = 300  # the house rule is ~400 a module; the verb groups stay well below it


def _command_modules() -> list[str]:
    return sorted(f"continue_pt.cli.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem not in {"__init__", "__main__"})


def test_every_module_of_the_cli_is_small():
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.glob("*.py")}
    assert len(sizes) >= 6, sizes  # the group and its verb modules: the scan sees the package
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_every_command_defined_in_a_module_is_on_the_group():
    """A command written in a verb module but never added to the group would silently not exist."""
    top_level = {}
    for name in _command_modules():
        module = importlib.import_module(name)
        subcommands = {id(c) for v in vars(module).values() if isinstance(v, click.Group) for c in v.commands.values()}
        top_level.update({v.name: v for v in vars(module).values()
                          if isinstance(v, click.Command) and id(v) not in subcommands})
    assert top_level, "no command found in the verb modules"
    assert {name: cli.commands.get(name) for name in top_level} == top_level
    assert set(cli.commands) == set(top_level)  # and nothing on the group comes from elsewhere


def _run(code: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_importing_the_cli_imports_nothing_heavy():
    """`continue-pt --help` and option errors answer at once: torch, Lightning and the converters are imported by
    the commands that use them, when they run."""
    done = _run(["-c", "import sys, continue_pt.cli; print(sorted({m.split('.')[0] for m in sys.modules} & "
                       "{'torch', 'lightning', 'pytorch_lightning', 'converters', 'tqdm', 'yaml', 'numpy'}))"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_python_dash_m_runs_the_command_line():
    done = _run(["-m", "continue_pt.cli", "kmeans", "--help"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: continue-pt kmeans") and "fit" in done.stdout and "check" in done.stdout
    done = _run(["-m", "continue_pt.cli", "no-such-verb"])
    assert done.returncode == 2 and "No such command 'no-such-verb'" in done.stderr
