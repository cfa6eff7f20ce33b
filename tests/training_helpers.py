"""Small pieces the continued pre-training tests of both families share."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
from torch import nn


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
