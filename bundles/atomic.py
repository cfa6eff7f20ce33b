"""Atomic file writes: a temporary sibling, written, flushed to disk and renamed over the target.

A reader never sees half a file and a failure (a full disk, Ctrl-C) leaves the previous file as it was. The result
gets the permissions of an ordinary ``open(path, "w")`` (``0o666`` minus the umask): ``mkstemp`` makes its file
private (0600), which would otherwise survive the rename. A full disk becomes a :class:`~bundles.errors.DiskFull`
naming the file and the space it needed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFull

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def current_umask() -> int:
    """The process umask (read by setting and restoring it: Python 3.11 has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Permissions of a file created by an ordinary write."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Permissions of a directory created by an ordinary ``mkdir``."""
    return 0o777 & ~current_umask()


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def disk_full(path: str | Path, exc: BaseException, needed: int | Callable[[], int] | None) -> DiskFull | None:
    """A :class:`DiskFull` for ``exc`` when it is a full disk or quota, else None. ``needed``: the bytes the write
    needed (or a function computing them, called only here)."""
    if not isinstance(exc, OSError) or exc.errno not in _NO_SPACE:
        return None
    path = Path(path)
    if callable(needed):
        needed = needed()
    free = _free_bytes(path)
    need = f"needs {human_bytes(needed)} ({needed} bytes)" if needed is not None else "needs more space"
    have = f", {human_bytes(free)} free there" if free is not None else ""
    reason = exc.strerror or "no space left on the device"
    return DiskFull(path, f"could not be written ({reason}): it {need}{have}",
                    hint="Free some space (or write elsewhere) and run again; the previous file, if any, is unchanged")


def _free_bytes(path: Path) -> int | None:
    for folder in (path.parent, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def atomic_write(path: str | Path, write: Callable[[Path], object],
                 needed: int | Callable[[], int] | None = None) -> Path:
    """Call ``write(tmp)`` to fill a temporary sibling of ``path``, then move it into place with ordinary
    permissions. On a full disk: :class:`DiskFull` (``needed`` bytes), ``path`` untouched, no temporary left."""
    path = Path(path)
    tmp: Path | None = None
    try:
        # ends in the target's suffix: some writers pick the format from it (matplotlib's savefig)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        with open(tmp, "rb+") as fh:  # a full disk on delayed allocation (or NFS) shows here, before the rename
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        full = disk_full(path, exc, needed)
        if full is not None:
            raise full from exc
        raise
    return path
