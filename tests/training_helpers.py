"""Small pieces the continued pre-training tests of both families share."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

REPO_ROOT = str(Path(__file__).resolve().parents[1])


def logged_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a run's ``metrics.csv`` that log a training step."""
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row.get("train/loss")]


class StopAt(pl.Callback):
    """Stop training after optimizer step ``step`` (an interrupted run, to be resumed)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def no_dropout(module: nn.Module) -> None:
    """Every dropout probability and layer drop of ``module`` (torchaudio's modules) set to 0, in place."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = 0.0
        if hasattr(m, "layer_drop"):
            m.layer_drop = 0.0


class SignalAfterMicroBatch(pl.Callback):
    """Sends ``signum`` to this process after the first micro-batch of optimizer step ``step`` (mid-accumulation)."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step, self.sent = signum, step, False

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.sent and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


def assert_ddp_gradients_match(script_text: str, bundle_dir: Path, tmp_path: Path, *extra_args: str) -> None:
    """Runs ``script_text`` (argv: bundle, devices, output file, repo root, *extra_args) with 1 and 2 processes;
    the loss and every gradient it saves must agree."""
    script = tmp_path / "ddp_step.py"
    script.write_text(script_text)
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"grads{devices}.pt"
        proc = subprocess.run([sys.executable, str(script), str(bundle_dir), str(devices), str(out), REPO_ROOT,
                               *extra_args], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = torch.load(out, weights_only=True)
    assert results[1]["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)
    one, two = results[1]["grads"], results[2]["grads"]
    assert set(one) == set(two)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)


class FixedBatches(pl.LightningDataModule):
    """Training batches given as they are, one per training step's micro-batch, in order."""

    def __init__(self, batches: list[dict]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)
