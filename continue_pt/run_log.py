"""The run's ``metrics.csv`` across resumes, and how often it is written.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts ("Previous log files in this directory
will be deleted"), so a resumed run used to lose every step before the resume and ``curves.png`` started at the
resumed step. :class:`ResumableCSVLogger` keeps the rows of the steps before the checkpoint it resumes from and
appends the new ones: one file, the whole run, after any number of resumes (resumed into another output directory,
the earlier rows are copied from the checkpoint's run). Rows of steps at or after the resumed
step (an attempt that went on after its last checkpoint) are dropped: the resumed attempt trains them again.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


METRICS_FILE = "metrics.csv"


def rows_before(path: Path, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of ``path`` logged at steps < ``step`` (all rows without a step are dropped)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        kept = [row for row in reader if row.get("step") and int(float(row["step"])) < step]
    return header, kept


def _write_rows(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    """Replace ``path`` atomically: a crash while trimming must not lose the earlier steps."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer without the deletion: keeps the rows before ``resume_step`` and appends after them."""

    def __init__(self, log_dir: str, resume_step: int | None, earlier: Path | None) -> None:
        self.resume_step, self.earlier = resume_step, earlier
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file() and self.resume_step is not None and self.earlier is not None \
                and self.earlier.is_file():
            # resumed into another output directory: the run's earlier steps come along
            path.parent.mkdir(parents=True, exist_ok=True)
            header, kept = rows_before(self.earlier, self.resume_step)
            _write_rows(path, header, kept)
            self.metrics_keys = sorted(header)
            return
        if not path.is_file():
            return
        if self.resume_step is None:  # a new run in the same directory (--overwrite): its own metrics only
            path.unlink()
            return
        header, kept = rows_before(path, self.resume_step)
        _write_rows(path, header, kept)
        self.metrics_keys = sorted(header)  # new columns make the writer rewrite the header with the old rows


class ResumableCSVLogger(CSVLogger):
    """``OUTPUT/metrics.csv`` for the whole run: with ``resume_step`` (the global step of the checkpoint a run
    resumes from) the earlier steps' rows are kept and the new ones appended."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None, earlier: Path | None = None) -> None:
        super().__init__(save_dir, name="", version="")
        self.resume_step = resume_step
        self.earlier = earlier
        """The resumed run's ``metrics.csv`` when it was in another directory (copied up to ``resume_step``)."""
        self.trainer: pl.Trainer | None = None
        """Set: rows are stamped with the optimizer step just done (``global_step - 1``) instead of Lightning's
        ``_batches_that_stepped``, which drifts from it after a resume from an end-of-epoch checkpoint (and the
        rows of the next attempt are trimmed by the optimizer step)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.trainer is not None:
            step = max(self.trainer.global_step - 1, 0)
        super().log_metrics(metrics, step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(self.log_dir, self.resume_step, self.earlier)
        return self._experiment


class FirstAndLastStepLogged(pl.Callback):
    """Log the first and the last optimizer step whatever ``log_every_n_steps`` is: a run's curve starts and ends
    where the run does. Lightning decides per step from ``trainer.log_every_n_steps``; it is 1 during those two
    steps and the chosen interval otherwise."""

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        edge = trainer.global_step == 0 or (trainer.max_steps > 0 and trainer.global_step == trainer.max_steps - 1)
        trainer.log_every_n_steps = 1 if edge else self.log_every
