"""Lightning's ``Trainer`` built at one place, where its (and torch's) configuration refusals become option problems.

``pl.Trainer`` refuses combinations only it can judge (``devices=2`` on a machine with one GPU, a strategy the
accelerator lacks) with ``MisconfigurationException``, ``ValueError`` or ``RuntimeError`` and a traceback. Here they
become :class:`~continue_pt.options.PretrainOptionsError`: one message naming the options, before training starts.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.exceptions import MisconfigurationException

from continue_pt.options import PretrainOptions, PretrainOptionsError

_REFUSALS = (MisconfigurationException, ValueError, RuntimeError, TypeError)
_HARDWARE_OPTIONS = ("accelerator", "devices", "strategy", "precision")


def built_trainer(output_dir: str | Path, **trainer_args: Any) -> pl.Trainer:
    """``pl.Trainer(**trainer_args)``; a refused configuration raises :class:`PretrainOptionsError`."""
    try:
        return pl.Trainer(**trainer_args)
    except _REFUSALS as exc:
        raise PretrainOptionsError(output_dir, _reworded(exc, trainer_args),
                                   hint="Nothing was started; check --devices, --precision and the accelerator "
                                        "against the machine") from None


def trainer_problems(options: PretrainOptions) -> list[str]:
    """What the Trainer would refuse in the hardware options, found by building one that runs nothing."""
    args = {"accelerator": options.accelerator, "devices": options.devices, "strategy": options.strategy,
            "precision": options.resolved_precision()}
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # its "GPU available: ..." lines belong to the real run
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real Trainer says it again where it matters
            pl.Trainer(**args, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                       enable_model_summary=False)
    except _REFUSALS as exc:
        return [_reworded(exc, args)]
    finally:
        quiet.setLevel(level)
    return []


def _reworded(exc: BaseException, args: dict[str, Any]) -> str:
    given = ", ".join(f"{name} {args[name]!r}" for name in _HARDWARE_OPTIONS if name in args)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"Lightning cannot train with {given} on this machine: {reason}"
