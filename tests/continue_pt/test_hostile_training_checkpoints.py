"""A hostile training checkpoint (``.ckpt``) runs no code: every command that reads one refuses it cleanly.

Training checkpoints are shared too (a colleague's ``last.ckpt``, a downloaded run). ``export``, ``inspect`` and
``pretrain --resume`` read them with ``torch.load(weights_only=True)``: a pickle that asks for any other global is
refused, nothing it names is called, and nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from continue_pt.cli import cli


class _Payload:
    """Unpickling this would run ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path]:
    canary = tmp_path / "CANARY"
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "global_step": 3,
                "continue_pt": _Payload(os.system, f"touch {canary}")}, ckpt)
    return ckpt, canary


@pytest.mark.parametrize("command", ["export", "inspect", "pretrain --resume", "convert"])
def test_a_hostile_training_checkpoint_is_refused_and_runs_nothing(hostile, tmp_path, command):
    ckpt, canary = hostile
    out = tmp_path / "out"
    args = {"export": ["export", ckpt, "-o", out], "inspect": ["inspect", ckpt], "convert": ["convert", ckpt, "-o", out],
            "pretrain --resume": ["pretrain", "--resume", ckpt, "--train-data", tmp_path, "--output-dir", out]}[command]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # a message, not a traceback
    assert str(ckpt) in result.output and "Traceback" not in result.output
    assert not canary.exists(), "pickled code ran"
    assert not out.exists()
