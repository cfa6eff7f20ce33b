"""A run that fails before it has written a checkpoint leaves nothing half-made in its output directory.

Training writes into ``--output-dir`` as it goes (the k-means it labels with, hparams, checkpoints, metrics). If it
fails before the first checkpoint (no readable audio, a device that is not there, Ctrl-C while loading), what it
created is of no use and would only make the next run stop at "already exists" or resume from nothing: it is
removed. Once a checkpoint (or a logged metric) exists the run is resumable or worth reading, and everything stays.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_WORTH_KEEPING = (".ckpt", "metrics.csv")


@contextmanager
def removed_on_early_failure(output_dir: str | Path) -> Iterator[None]:
    """Undo what the block created under ``output_dir`` (the directory itself, and any parents, if it was new)
    when the block raises before any checkpoint or metric was written. Files that existed before are never touched."""
    output_dir = Path(output_dir)
    top_new = _first_missing(output_dir)
    before = _entries(output_dir)
    try:
        yield
    except BaseException:
        created = _entries(output_dir) - before
        if not any(str(path).endswith(_WORTH_KEEPING) for path in created):
            if top_new is not None:
                shutil.rmtree(top_new, ignore_errors=True)
            else:
                _remove(created)
        raise


def _first_missing(path: Path) -> Path | None:
    """The outermost of ``path`` and its parents that does not exist yet (what ``mkdir(parents=True)`` creates)."""
    missing = None
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _entries(directory: Path) -> set[Path]:
    return set(directory.rglob("*")) if directory.is_dir() else set()


def _remove(created: set[Path]) -> None:
    for path in sorted(created, key=lambda p: len(p.parts), reverse=True):  # contents before their directories
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
