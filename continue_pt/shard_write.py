"""``continue-pt shards write``: a directory of audio or a fairseq manifest -> tar shards + ``shards.json``.

The corpus is scanned like the training data (``corpus.scan_audio``: sorted relative paths, unreadable and empty
files set aside with their reason) and written in that order, so a shard set trains exactly like the directory it
came from. Each shard is written to a temporary sibling and renamed into place when complete; the index comes last,
so a set without ``shards.json`` is never mistaken for a complete one. On any failure the shards this run wrote are
removed. The tars are reproducible: the same corpus gives byte-identical shards (fixed mtime, owner and mode).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import soundfile

from bundles.atomic import atomic_write, disk_full, file_mode
from continue_pt.corpus import AudioItem, scan_audio
from continue_pt.shard_format import (INDEX_NAME, ITEM_COLUMNS, MIN_SHARD_SIZE, SHARD_FORMATS, ShardError,
                                      ShardIndex)

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
FLAC_LOSSLESS = frozenset({"PCM_16", "PCM_24"})
"""Subtypes FLAC stores bit for bit; other sources (float, 32-bit, lossy codecs) are kept as they are."""
WAV_SUBTYPES = {"PCM_16": "int16", "PCM_24": "int32", "PCM_32": "int32", "FLOAT": "float32", "DOUBLE": "float64"}
"""WAV subtypes written from a source of that subtype, read as the dtype that holds it exactly; others: FLOAT."""


@dataclass
class ShardWriteReport:
    """What ``write_shards`` did: the shard files, the utterances per format, what was set aside and why."""

    out_dir: Path
    shards: list[str] = field(default_factory=list)
    items: int = 0
    total_bytes: int = 0
    seconds: float = 0.0
    kept_original: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    formats: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {ext}" for ext, n in self.formats.most_common())
        text = (f"wrote {self.items} utterances ({self.seconds / 3600:.2f} h; {kinds}) into {len(self.shards)} "
                f"shards ({self.total_bytes / 1e6:.1f} MB) and {self.out_dir / INDEX_NAME}")
        if self.kept_original:
            text += f"; {self.kept_original} kept in their own format (not stored losslessly in the one asked for)"
        unusable = [reason for _, reason in self.skipped if not reason.startswith("not audio:")]
        if unusable:
            text += f"; skipped {len(unusable)} unusable files"
        return text


def write_shards(source: str | Path, out_dir: str | Path, shard_size: int, fmt: str = "original") -> ShardWriteReport:
    """Write the usable audio of ``source`` (directory or ``.tsv`` manifest) as tar shards of at most
    ``shard_size`` bytes (a single larger utterance gets a shard of its own) into ``out_dir`` (new or empty).

    ``fmt``: ``original`` (the files' bytes as they are), ``flac`` (16/24-bit PCM re-encoded losslessly; anything
    else kept as it is) or ``wav`` (the source's PCM/float subtype, else 32-bit float). Either way every utterance
    decodes to the same samples as its source. Raises :class:`ShardError` for unusable arguments.
    """
    out_dir = Path(out_dir)
    _check_arguments(source, out_dir, shard_size, fmt)
    scan = scan_audio(source, 16000, min_seconds=0.0)  # every readable file; training applies its own minimum
    if not scan.items:
        raise ShardError(source, f"holds no readable audio ({scan.summary()})",
                         "Check the files named with their reasons (continue-pt pretrain lists them too)")
    report = ShardWriteReport(out_dir, skipped=list(scan.skipped))
    created_dir = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        columns = _write_all(scan.items, out_dir, shard_size, fmt, report)
        index = ShardIndex(
            shards=report_shards(out_dir, report.shards, columns["shard"]), items=columns,
            info={"source": str(source), "stored_as": fmt})
        report.total_bytes = sum(s["bytes"] for s in index.shards)
        atomic_write(out_dir / INDEX_NAME,
                     lambda tmp: tmp.write_text(json.dumps(index.to_json(), separators=(",", ":")), encoding="utf-8"))
    except BaseException:
        for name in report.shards:
            (out_dir / name).unlink(missing_ok=True)
        for tmp in out_dir.glob(".shard-*.tmp"):  # the shard being written when it failed
            tmp.unlink(missing_ok=True)
        if created_dir:
            try:
                out_dir.rmdir()
            except OSError:
                pass
        raise
    return report


def _check_arguments(source: str | Path, out_dir: Path, shard_size: int, fmt: str) -> None:
    problems = []
    if fmt not in SHARD_FORMATS:
        problems.append(f"--format {fmt!r} is not one of {', '.join(SHARD_FORMATS)}")
    if shard_size < MIN_SHARD_SIZE:
        problems.append(f"--shard-size {shard_size} bytes is below the smallest useful size, {MIN_SHARD_SIZE} bytes "
                        "(write e.g. 1GB or 500MB)")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        problems.append(f"the output {out_dir} already exists and is not an empty directory; choose a new one")
    elif not out_dir.exists():
        parent = next((p for p in out_dir.parents if p.exists()), Path("."))
        if not parent.is_dir():
            problems.append(f"the output {out_dir} cannot be created: {parent} is a file, not a directory")
        elif not os.access(parent, os.W_OK):
            problems.append(f"the output {out_dir} cannot be created: {parent} is not writable")
    elif not os.access(out_dir, os.W_OK):
        problems.append(f"the output {out_dir} is not writable")
    if problems:
        raise ShardError(out_dir, problems,
                         "continue-pt shards write SRC -o NEW_DIR --shard-size 1GB [--format original|flac|wav]")


def _write_all(items: list[AudioItem], out_dir: Path, shard_size: int, fmt: str,
               report: ShardWriteReport) -> dict[str, list]:
    columns: dict[str, list] = {c: [] for c in ITEM_COLUMNS}
    writer: _ShardWriter | None = None
    for number, item in enumerate(items):
        ext, data, kept = encoded(item.path, fmt)
        info = soundfile.info(io.BytesIO(data))
        meta = json.dumps({"name": item.name, "frames": int(info.frames), "sample_rate": int(info.samplerate),
                           "channels": int(info.channels)}).encode()
        key = f"{number:09d}"
        if writer is not None and not writer.fits(len(data), len(meta), shard_size):
            report.shards.append(writer.close())
            writer = None
        if writer is None:
            writer = _ShardWriter(out_dir, f"shard-{len(report.shards):06d}.tar")
        offset = writer.add(f"{key}.{ext}", data)
        writer.add(f"{key}.json", meta)
        for column, value in zip(ITEM_COLUMNS, (item.name, len(report.shards), offset, len(data), int(info.frames),
                                                int(info.samplerate), int(info.channels))):
            columns[column].append(value)
        report.items += 1
        report.kept_original += kept and fmt != "original"
        report.formats[ext] += 1
        report.seconds += info.frames / info.samplerate
    if writer is not None:
        report.shards.append(writer.close())
    return columns


def encoded(path: Path, fmt: str) -> tuple[str, bytes, bool]:
    """``(extension, bytes, kept_as_is)`` of the file at ``path`` stored as ``fmt``; decodes to the same samples."""
    original = path.suffix.lstrip(".").lower() or "audio"
    info = soundfile.info(str(path))
    if fmt == "original" or (fmt == "flac" and info.format == "FLAC") or (fmt == "wav" and info.format == "WAV"):
        return original, path.read_bytes(), True
    if fmt == "flac":
        if info.subtype not in FLAC_LOSSLESS:
            return original, path.read_bytes(), True
        dtype, subtype = ("int16", "PCM_16") if info.subtype == "PCM_16" else ("int32", "PCM_24")
        return "flac", _reencoded(path, "FLAC", subtype, dtype), False
    subtype = info.subtype if info.subtype in WAV_SUBTYPES else "FLOAT"
    return "wav", _reencoded(path, "WAV", subtype, WAV_SUBTYPES[subtype]), False


def _reencoded(path: Path, container: str, subtype: str, dtype: str) -> bytes:
    samples, rate = soundfile.read(str(path), dtype=dtype, always_2d=True)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=container, subtype=subtype)
    return buffer.getvalue()


def report_shards(out_dir: Path, names: list[str], item_shards: list[int]) -> list[dict]:
    """The index's shard list: name, bytes, sha256 and number of utterances of each written shard."""
    counts = Counter(item_shards)
    return [{"name": name, "bytes": (out_dir / name).stat().st_size, "sha256": file_sha256(out_dir / name),
             "members": counts[i]} for i, name in enumerate(names)]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _padded(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _ShardWriter:
    """One tar shard growing in a temporary sibling; :meth:`close` flushes it and renames it into place."""

    def __init__(self, out_dir: Path, name: str):
        self.path = out_dir / name
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
        self.tmp = Path(tmp)
        self.file = os.fdopen(fd, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)

    def fits(self, audio_bytes: int, meta_bytes: int, shard_size: int) -> bool:
        """Would the shard, closed after this utterance, stay within ``shard_size`` bytes?"""
        end = self.tar.offset + 2 * _BLOCK + _padded(audio_bytes, _BLOCK) + _padded(meta_bytes, _BLOCK)
        return _padded(end + 2 * _BLOCK, _RECORD) <= shard_size

    def add(self, name: str, data: bytes) -> int:
        """Append a member; returns the byte offset of its data in the shard."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
        try:
            self.tar.addfile(info, io.BytesIO(data))
        except BaseException as exc:
            self._discard()
            full = disk_full(self.path, exc, len(data))
            if full is not None:
                raise full from exc
            raise
        return self.tar.offset - _padded(len(data), _BLOCK)

    def close(self) -> str:
        try:
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.chmod(self.tmp, file_mode())
            os.replace(self.tmp, self.path)
        except BaseException as exc:
            self._discard()
            full = disk_full(self.path, exc, None)
            if full is not None:
                raise full from exc
            raise
        return self.path.name

    def _discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)
