"""Training checkpoints written atomically, with ordinary permissions and a clear error on a full disk.

Lightning's ``ModelCheckpoint`` and ``trainer.save_checkpoint`` write through the strategy's ``CheckpointIO``.
:class:`AtomicCheckpointIO` writes each checkpoint to a temporary sibling (``torch.save`` straight into the file,
no in-memory copy of the whole checkpoint), flushes it to disk and renames it over the target: a full disk, a crash
or Ctrl-C mid-write leave ``last.ckpt`` and every earlier checkpoint as they were, and the failure is a
:class:`~bundles.errors.DiskFull` naming the checkpoint and about how many bytes it needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from bundles.atomic import atomic_write


def checkpoint_bytes(obj: Any) -> int:
    """The bytes of the tensor storages in ``obj`` (nested dicts, lists, tuples), each storage once: about the size
    of ``torch.save(obj)``."""
    seen: set[tuple[str, int]] = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (str(item.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


def write_checkpoint(checkpoint: dict[str, Any], tmp: Path) -> None:
    """``torch.save`` into the temporary file (a function of its own so that tests can make the disk full)."""
    with open(tmp, "wb") as fh:
        torch.save(checkpoint, fh)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic; loading is Lightning's."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: write_checkpoint(checkpoint, tmp), needed=lambda: checkpoint_bytes(checkpoint))
