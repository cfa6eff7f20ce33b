"""Ctrl-C and SIGTERM (what a cluster sends before preemption) stop a run at the next optimizer-step boundary
with a resumable ``checkpoints/last.ckpt``, instead of losing everything since the last periodic checkpoint.

Lightning's own handling is not used: its SIGTERM handler raises at the end of the next *micro*-batch (in the
middle of an accumulated step, where no exact resume is possible) and its Ctrl-C path saves nothing. Here the
signal only sets a flag; after the micro-batch that completes an optimizer step, every rank agrees (any rank
signalled -> all stop, so DDP ranks save the same step), the checkpoint is saved exactly as the periodic ones are
(from ``on_train_batch_end``, so a resume continues the data order, the schedule and the seeds) and training stops.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, *((signal.SIGUSR1,) if hasattr(signal, "SIGUSR1") else ()))
"""SIGUSR1 is what SLURM jobs are usually told to send before their time limit (``#SBATCH --signal=USR1@120``);
Lightning's own SLURM auto-requeue, which would save mid-step, is off (``continue_pt.trainer_config``)."""


class RunInterrupted(Exception):
    """Training stopped on a signal; ``checkpoint`` resumes it. ``exit_code`` is the shell's 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: Path, resume_command: str,
                 is_global_zero: bool = True) -> None:
        self.signum, self.step, self.checkpoint, self.resume_command = signum, step, checkpoint, resume_command
        self.is_global_zero = is_global_zero  # only rank 0 reports it
        self.exit_code = 128 + int(signum)
        super().__init__(f"{signal.Signals(signum).name} received: stopped after optimizer step {step}; saved "
                         f"{checkpoint}\nresume with: {resume_command}")


class _IgnoreStopSignals:
    """A data-loader worker_init_fn: workers leave SIGINT/SIGTERM to the main process (Ctrl-C reaches the whole
    process group; a worker dying first would make the loader fail before the step boundary), then run the
    loader's own init function (Lightning's worker seeding)."""

    def __init__(self, then: Callable[[int], Any] | None) -> None:
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.then is not None:
            self.then(worker_id)


class StopOnSignal(pl.Callback):
    """On SIGINT/SIGTERM: finish the current optimizer step, save ``checkpoint_dir/last.ckpt`` (atomically, via
    ``interrupted-step=N.ckpt``), stop training. A second Ctrl-C aborts at once, without saving."""

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.signum: int | None = None
        self.saved: Path | None = None
        self.step = 0
        self._previous: dict[int, Any] = {}
        self._step_before_batch = 0

    # -- signal handlers: installed after Lightning's (which it registers when fit starts), restored at the end
    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step to end
        self.signum = signum
        rank_zero_info(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this optimizer "
                       "step, then stopping" + (" (Ctrl-C again to abort without saving)" if signum == signal.SIGINT
                                                else ""))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        loader = trainer.train_dataloader
        if isinstance(loader, DataLoader) and loader.num_workers and not isinstance(loader.worker_init_fn,
                                                                                     _IgnoreStopSignals):
            loader.worker_init_fn = _IgnoreStopSignals(loader.worker_init_fn)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    # -- the step boundary
    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self._step_before_batch:
            return  # accumulating: the optimizer has not stepped; resuming from here would not be exact
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the last step is done: the run ends normally (export included) rather than asking for a resume
        if not trainer.strategy.reduce_boolean_decision(self.signum is not None, all=False):
            return
        if self.signum is None:  # another rank was signalled: this one stops with it
            self.signum = signal.SIGTERM
        self.signum = int(trainer.strategy.broadcast(int(self.signum)))
        self.step = trainer.global_step
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        target = self.checkpoint_dir / f"interrupted-step={self.step}.ckpt"
        trainer.save_checkpoint(target, weights_only=False)  # allowed: a save flag (full state: it resumes)
        self.saved = target
        trainer.should_stop = True
