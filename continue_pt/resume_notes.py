"""What a resume does, said out loud, and the run's segments (data, steps) kept for the provenance.

A resumed run restores the schedule's position, but the schedule decays to 0 at the *new* ``max_steps``: extending
``--max-steps`` re-stretches it (a run that had ended at lr 0 warms back up to a higher lr). A resume may also
train on other data than the attempt before it. :func:`resume_notes` says both before training starts;
:class:`RunSegments` records every attempt's data and steps in the checkpoints, so the exported bundle's
provenance names all of them, not only the last ``--train-data``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from continue_pt.module_base import lr_factor

SEGMENTS_KEY = "continue_pt_segments"
"""Top-level checkpoint key: ``[{"data", "from_step", "to_step"}, ...]``, one entry per attempt of the run."""


def checkpoint_step(checkpoint: dict[str, Any]) -> int:
    return int(checkpoint.get("global_step", 0))


def earlier_segments(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The segments up to the checkpoint's step; a checkpoint of an older version (no record) gives one segment
    of unknown data."""
    step = checkpoint_step(checkpoint)
    stored = checkpoint.get(SEGMENTS_KEY)
    if not isinstance(stored, list):
        return [{"data": None, "from_step": 0, "to_step": step}] if step else []
    kept = [dict(s) for s in stored if isinstance(s, dict) and int(s.get("from_step", 0)) < step]
    if kept:
        kept[-1]["to_step"] = step
    return kept


class RunSegments(pl.Callback):
    """Adds the segments so far (earlier attempts + this one, up to the saved step) to every checkpoint."""

    def __init__(self, train_data: str, earlier: list[dict[str, Any]], start_step: int) -> None:
        self.train_data, self.earlier, self.start_step = str(train_data), earlier, start_step

    def segments(self, step: int) -> list[dict[str, Any]]:
        current = {"data": self.train_data, "from_step": self.start_step, "to_step": step}
        return [*self.earlier, current] if step > self.start_step or not self.earlier else self.earlier

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        checkpoint[SEGMENTS_KEY] = self.segments(trainer.global_step)


def _schedule_of(checkpoint: dict[str, Any]) -> tuple[float, float, int, str] | None:
    """(lr at the checkpoint, peak lr, warm-up steps, decay) from the checkpoint; None if it does not say."""
    try:
        lr_now = float(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"])
        peak = float(checkpoint["lr_schedulers"][0]["base_lrs"][0])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    options = (checkpoint.get("hyper_parameters") or {}).get("options") or {}
    return lr_now, peak, int(options.get("warmup_steps", 0)), str(options.get("schedule", "linear"))


def resume_notes(checkpoint_path: str | Path, checkpoint: dict[str, Any], max_steps: int,
                 train_data: str) -> list[str]:
    """Lines saying where the resumed run stands and what its schedule and data will be."""
    step = checkpoint_step(checkpoint)
    notes = [f"resuming {checkpoint_path} at optimizer step {step}; training to step {max_steps}"]
    schedule = _schedule_of(checkpoint)
    if schedule is not None:
        lr_now, peak, warmup, decay = schedule
        lr_next = peak * lr_factor(warmup, max_steps, decay)(step)
        if abs(lr_next - lr_now) > 1e-3 * peak:
            notes.append(f"learning rate: the checkpoint's schedule had it at {lr_now:.3g}; with --max-steps "
                         f"{max_steps} the {decay} schedule (peak {peak:.3g}) is stretched to end at step {max_steps}: "
                         f"it continues at {lr_next:.3g} and decays to 0 at step {max_steps}")
        else:
            notes.append(f"learning rate: continues at {lr_next:.3g} ({decay} decay to 0 at step {max_steps})")
    previous = [s.get("data") for s in earlier_segments(checkpoint)]
    if previous and previous[-1] is not None and str(previous[-1]) != str(train_data):
        notes.append(f"data: steps up to {step} were trained on {previous[-1]}; from here on {train_data} (both "
                     "are recorded in the bundle's provenance)")
    return notes


def resume_problems(checkpoint: dict[str, Any], max_steps: int) -> list[str]:
    step = checkpoint_step(checkpoint)
    if max_steps <= step:
        return [f"max_steps is {max_steps} but the checkpoint is already at step {step}: nothing to train; pass a "
                f"larger --max-steps (the total, not the additional steps)"]
    return []

