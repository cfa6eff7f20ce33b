"""Is a downloaded file still the file that was downloaded? Checksums and the sidecar that records them.

Every downloaded file ``F`` gets a sidecar ``F.integrity.json`` with its size, sha256, mtime and where it came from.
A later use checks it cheaply: the size always; the sha256 again only when the file's size or mtime differ from the
record (someone or something wrote to it). Re-hashing on every use would cost a full read of a multi-gigabyte
checkpoint each time (about a second per GiB) for no gain over this check except against silent bit rot, which the
file system's own checks are better placed to catch. A pinned checksum (``--sha256``, or one a source publishes) is
always compared with the recorded one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from bundles.atomic import atomic_write

SIDECAR_SUFFIX = ".integrity.json"
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class IntegrityRecord:
    """What a file was when it was downloaded."""

    size: int
    sha256: str
    mtime_ns: int
    source: str
    """The URL it came from."""
    recorded: str
    """When it was recorded (ISO 8601, UTC)."""
    checksum_from: str
    """``pinned`` (given by the user or published by the source) or ``first download`` (trust on first use)."""


def sidecar_of(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


def is_sha256(text: str) -> bool:
    return bool(_SHA256.match(text))


def normalised_sha256(text: str | None) -> str | None:
    """``text`` as lower-case hex, or ValueError naming what is wrong with it."""
    if text is None:
        return None
    value = text.strip().lower()
    if not is_sha256(value):
        raise ValueError(f"{text!r} is not a sha256 (64 hexadecimal digits)")
    return value


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1_of_file(path: Path) -> str:
    """The id git (and so the Hugging Face hub, for files not in LFS) gives this file's content."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_record(path: Path) -> IntegrityRecord | None:
    """The sidecar of ``path``, or None when there is none or it is unreadable (then the file is hashed anew)."""
    try:
        data = json.loads(sidecar_of(path).read_text(encoding="utf-8"))
        return IntegrityRecord(**{name: data[name] for name in IntegrityRecord.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_record(path: Path, sha256: str, source: str, checksum_from: str,
                 content: Path | None = None) -> IntegrityRecord:
    """Record ``path`` as it is now (its size and mtime with ``sha256``) in its sidecar, atomically. ``content``:
    the file that is about to be renamed to ``path`` (a rename keeps size and mtime), so no reader ever sees
    ``path`` without its record."""
    stat = (content or path).stat()
    record = IntegrityRecord(size=stat.st_size, sha256=sha256, mtime_ns=stat.st_mtime_ns, source=source,
                             recorded=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                             checksum_from=checksum_from)
    text = json.dumps(asdict(record), indent=2) + "\n"
    atomic_write(sidecar_of(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return record


def remove_with_record(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar_of(path).unlink(missing_ok=True)


@dataclass(frozen=True)
class Mismatch:
    """The file is not what was expected: ``expected`` and ``got`` describe the difference in words."""

    expected: str
    got: str


def check_against_record(path: Path, record: IntegrityRecord, pinned: str | None) -> Mismatch | None:
    """Compare ``path`` with its record (and with ``pinned``): None when it is the file that was recorded."""
    stat = path.stat()
    if stat.st_size != record.size:
        return Mismatch(f"{record.size} bytes (recorded {record.recorded})", f"{stat.st_size} bytes")
    unchanged = stat.st_mtime_ns == record.mtime_ns
    actual = record.sha256 if unchanged else sha256_of_file(path)
    if actual != record.sha256:
        return Mismatch(f"sha256 {record.sha256} (recorded {record.recorded})", f"sha256 {actual}")
    if pinned is not None and actual != pinned:
        return Mismatch(f"sha256 {pinned} (pinned)", f"sha256 {actual}")
    if not unchanged:  # the same bytes, touched: remember the new mtime so the next use is quick again
        write_record(path, actual, record.source, record.checksum_from)
    return None


def verify_digest(digest: str, path: Path, pinned: str | None, record: IntegrityRecord | None) -> Mismatch | None:
    """A freshly downloaded file's sha256 ``digest`` against the pinned one, else against an earlier record."""
    if pinned is not None and digest != pinned:
        return Mismatch(f"sha256 {pinned} (pinned)", f"sha256 {digest}")
    if pinned is None and record is not None and digest != record.sha256:
        return Mismatch(f"sha256 {record.sha256} (recorded at its first download, {record.recorded})",
                        f"sha256 {digest}")
    return None
