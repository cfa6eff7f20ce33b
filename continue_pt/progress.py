"""Progress reports: the training bar counts optimizer steps out of ``--max-steps``; ``kmeans fit`` writes plain
lines when its stderr is not a terminal.

Lightning's bar counts micro-batches per epoch: a run bounded by steps over a small corpus showed ``Epoch 7/-2``
(max_epochs -1) and ``6/3`` under ``--accumulate 2``. Here one bar runs from the resumed step to ``max_steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``step 12/30, epoch 3`` with the logged metrics; one bar for the whole run (validation keeps its own)."""

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        self.train_progress_bar.n = trainer.global_step
        self.train_progress_bar.initial = trainer.global_step  # a resumed run's speed counts its own steps only
        self.train_progress_bar.set_description("step")
        self.train_progress_bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.train_progress_bar.set_description(f"step (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        bar = self.train_progress_bar
        if bar is not None and trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # one bar for the whole run: not closed at each epoch

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class PhaseProgress:
    """``progress(phase, done_seconds, total_seconds)`` for ``kmeans fit``: a line redrawn with ``\\r`` on a
    terminal; in a log file (not a terminal) plain lines, one per phase and tenth of it, instead of ``\\r`` noise."""

    def __init__(self, echo: Callable[[str, bool], None], is_terminal: bool) -> None:
        self.echo, self.is_terminal = echo, is_terminal
        self._last: tuple[str, int] | None = None
        self._drawn = False

    def __call__(self, phase: str, done: float, total: float) -> None:
        line = f"{phase}: {done / 3600:.2f} of {total / 3600:.2f} h"
        if self.is_terminal:
            self.echo("\r" + line, False)
            self._drawn = True
            return
        tenth = int(10 * done / total) if total > 0 else 0
        if self._last is None or self._last[0] != phase or tenth > self._last[1]:
            self._last = (phase, tenth)
            self.echo(line, True)

    def finish(self) -> None:
        """End the redrawn line (terminal only)."""
        if self._drawn:
            self.echo("", True)
            self._drawn = False
