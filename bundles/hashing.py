"""The sha256 of a file, read in 8 MiB pieces (``hashlib`` releases the GIL on large updates, so a thread hashing a
checkpoint overlaps the reads and writes of a conversion)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK_BYTES = 8 << 20


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()
