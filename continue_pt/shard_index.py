"""``continue-pt shards index``: the ``shards.json`` of WebDataset tar shards someone else wrote.

Corpora published as WebDataset shards (plain tars of ``KEY.flac`` / ``KEY.wav`` / ... beside ``KEY.json``,
``KEY.txt``, ...) have no index; training plans its batches from one (``shard_read``). This module writes it without
copying the audio: each tar is walked with :mod:`tarfile` (headers only: it seeks over the data), each audio member's
data offset and size are taken from its header and its frames, rate and channels from the audio header, read by
soundfile through a window onto the member (a few KiB, not the whole member decoded).

Members are grouped into samples by WebDataset's own convention (its ``base_plus_ext`` and ``group_by_keys``: the
key is the member's path up to the first dot of its file name, consecutive members with the same key are one
sample); the tests check the grouping against ``webdataset`` itself. ``webdataset`` is not used at run time: its tar
iteration reads every member's bytes and does not give their offsets, which is all the index needs, and the key
rule is one line (importing webdataset for it would cost a runtime dependency and ~2 s of imports).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import soundfile

from bundles.atomic import atomic_write
from continue_pt.corpus import AUDIO_EXTENSIONS, capped
from continue_pt.shard_format import INDEX_NAME, ITEM_COLUMNS, ShardError, ShardIndex, is_url, parse_index
from continue_pt.shard_write import report_shards

_AUDIO = frozenset(ext.lstrip(".") for ext in AUDIO_EXTENSIONS)
_COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar.zstd")
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""WebDataset's ``base_plus_ext``: ``dir/KEY.a.b`` -> (``dir/KEY``, ``a.b``)."""
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_OWN_META = frozenset({"name", "frames", "sample_rate", "channels"})
"""The ``KEY.json`` that ``shards write`` puts beside each utterance: its ``name`` is the utterance's name."""
HINT = "continue-pt shards index DIR_OF_TARS [-o INDEX_DIR] [--base-url URL]"


@dataclass
class ShardIndexReport:
    """What ``index_shards`` found: the utterances indexed, and what it ignored or set aside, and why."""

    index_path: Path
    shards: int = 0
    items: int = 0
    seconds: float = 0.0
    formats: Counter = field(default_factory=Counter)
    other_members: Counter = field(default_factory=Counter)
    skipped: list[str] = field(default_factory=list)
    second_audio: list[str] = field(default_factory=list)
    renamed: int = 0

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {ext}" for ext, n in self.formats.most_common())
        return (f"indexed {self.items} utterances ({self.seconds / 3600:.2f} h; {kinds}) in {self.shards} shards "
                f"into {self.index_path}")

    def notes(self) -> list[str]:
        """One line per kind of thing set aside (each unreadable member named, capped)."""
        lines = []
        if self.other_members:
            kinds = ", ".join(f"{n} .{ext}" for ext, n in self.other_members.most_common(8))
            lines.append(f"left out {sum(self.other_members.values())} members that are not audio ({kinds})")
        if self.second_audio:
            lines.append(f"{len(self.second_audio)} samples have more than one audio member; the first is indexed, "
                         "left out: " + "; ".join(capped(self.second_audio)))
        if self.renamed:
            lines.append(f"{self.renamed} keys repeat an earlier shard's key; named SHARD/KEY.EXT to keep names "
                         "unique")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable audio members: " + "; ".join(capped(self.skipped)))
        return lines


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard patterns: ``train-{000000..000099}.tar`` (zero-padded as written), ``{a,b}``; several
    groups expand left to right, in the order written (the order ``braceexpand`` gives)."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[:match.start()], match.group(1), pattern[match.end():]
    span = _RANGE.match(body)
    if span:
        first, last = int(span.group(1)), int(span.group(2))
        width = len(span.group(1)) if span.group(1).lstrip("-").startswith("0") else 0
        step = 1 if last >= first else -1
        choices = [f"{n:0{width}d}" for n in range(first, last + step, step)]
    else:
        choices = body.split(",")
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def find_tars(source: str | Path) -> tuple[Path, list[Path]]:
    """``(directory, tar paths)`` of ``source``: a directory (its ``*.tar``, sorted by name) or a brace pattern of
    local tar files (in the pattern's order). Compressed tars are refused: their members cannot be read by byte
    range."""
    text = str(source)
    if is_url(text):
        raise ShardError(text, "is remote; shards index reads local tar files",
                         "Index them where they are stored (or a local copy) with --base-url URL naming where "
                         f"they are served: {HINT}")
    if "{" in text:
        paths = [Path(p) for p in expand_braces(text)]
        directory = paths[0].parent
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise ShardError(text, f"names {len(paths)} files, {len(missing)} of them missing: "
                                   + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
                             "Check the pattern (train-{000000..000099}.tar: both ends included)")
    else:
        directory = Path(text)
        if not directory.exists():
            raise ShardError(directory, "does not exist", f"Give the directory holding the .tar shards: {HINT}")
        if not directory.is_dir():
            raise ShardError(directory, "is not a directory", f"Give the directory holding the .tar shards, or a "
                                                               f"brace pattern of them: {HINT}")
        paths = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(".tar"))
        compressed = sorted(p.name for p in directory.iterdir() if p.name.lower().endswith(_COMPRESSED_SUFFIXES))
        if compressed:
            raise ShardError(directory, f"holds compressed tars ({', '.join(compressed[:5])}"
                                        + (" ..." if len(compressed) > 5 else "") + "): their members cannot be "
                                        "read by byte range", _COMPRESSED_HINT)
        if not paths:
            others = sorted(p.name for p in directory.iterdir())
            found = f"; it holds {', '.join(others[:5])}" + (" ..." if len(others) > 5 else "") if others else ""
            raise ShardError(directory, f"holds no .tar shards{found}",
                             "Give the directory of WebDataset .tar shards, or write shards from audio files with "
                             "`continue-pt shards write SRC -o DIR`")
    return directory, paths


_DAMAGED_HINT = "Replace the damaged shard (or leave it out of the directory) and run again"
_COMPRESSED_HINT = ("Decompress them (gunzip / unxz / unzstd each: the plain .tar are what training reads), or "
                    "write shards from the extracted audio with `continue-pt shards write SRC -o DIR`")


def index_shards(source: str | Path, out_dir: str | Path | None = None,
                 base_url: str | None = None) -> ShardIndexReport:
    """Write ``shards.json`` for the WebDataset tars of ``source`` (a directory or a brace pattern) into
    ``out_dir`` (default: the tars' directory), atomically. The index names each shard by its path relative to
    ``out_dir`` (its file name when the index sits beside the tars) or, with ``base_url``, by ``base_url/NAME``
    (the tars served over http(s)). Raises :class:`ShardError` for unusable input, every problem together."""
    directory, tars = find_tars(source)
    index_dir = Path(out_dir) if out_dir is not None else directory
    _check_output(index_dir, out_dir is None)
    if base_url is not None and not is_url(base_url):
        raise ShardError(base_url, "is not an http(s):// URL", f"--base-url names where the tars are served: {HINT}")
    problems = [problem for path in tars for problem in _tar_problems(path)]
    if problems:
        raise ShardError(directory, capped(problems), _COMPRESSED_HINT if any("compressed" in p for p in problems)
                         else _DAMAGED_HINT)
    report = ShardIndexReport(index_dir / INDEX_NAME, shards=len(tars))
    columns: dict[str, list] = {c: [] for c in ITEM_COLUMNS}
    seen: set[str] = set()
    for number, path in enumerate(tars):
        _index_tar(path, number, columns, seen, report)
    if not columns["name"]:
        raise ShardError(directory, f"its {len(tars)} tars hold no readable audio member ("
                                    + ", ".join(sorted(_AUDIO)) + ")" + "".join(f"; {n}" for n in report.notes()),
                         "Check that these are WebDataset shards of audio")
    shards = report_shards(Path("."), [str(p.resolve()) for p in tars], columns["shard"])  # absolute: Path joins
    for shard in shards:
        shard["name"] = _shard_reference(Path(shard["name"]), index_dir, base_url)
    index = ShardIndex(shards=shards, items=columns, info={"source": str(source), "stored_as": "original"})
    index_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(index_dir / INDEX_NAME,
                 lambda tmp: tmp.write_text(json.dumps(index.to_json(), separators=(",", ":")), encoding="utf-8"))
    return report


def _check_output(index_dir: Path, beside: bool) -> None:
    """Refuse an index that could not be written before reading any shard (a large set takes a while)."""
    target = index_dir / INDEX_NAME
    hint = ("Write the index elsewhere with -o INDEX_DIR (it then names the shards by their path from there, or "
            "by URL with --base-url)") if beside else f"Choose a writable directory: {HINT}"
    if index_dir.exists() and not index_dir.is_dir():
        raise ShardError(index_dir, "is a file, not a directory", hint)
    existing = next((p for p in (index_dir, *index_dir.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ShardError(index_dir, f"cannot be created: {existing} is a file, not a directory", hint)
    if not os.access(existing, os.W_OK):
        raise ShardError(index_dir, f"is not writable ({existing} is read-only)", hint)
    if target.exists():
        try:
            parse_index(target, target.read_bytes())
        except (ShardError, OSError) as error:
            raise ShardError(target, "exists and is not a continue-pt shard index; it is left as it is",
                             "Move it away, or write the index elsewhere with -o INDEX_DIR") from error


def _tar_problems(path: Path) -> list[str]:
    """Why the file at ``path`` is not a plain, non-empty tar ([] when it is)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as error:
        return [f"{path.name} cannot be read ({error.strerror or error})"]
    kind = next((name for magic, name in _COMPRESSED_MAGIC.items() if head.startswith(magic)), None)
    if kind:
        return [f"{path.name} is {kind}-compressed: its members cannot be read by byte range"]
    if not head.strip(b"\0"):
        return [f"{path.name} is empty (no members)"]
    try:
        with tarfile.open(path, mode="r:") as tar:
            tar.next()
    except (tarfile.TarError, OSError) as error:
        return [f"{path.name} is not a tar file ({error})"]
    return []


def _shard_reference(path: Path, index_dir: Path, base_url: str | None) -> str:
    if base_url is not None:
        return base_url.rstrip("/") + "/" + path.name
    return Path(os.path.relpath(path.resolve(), index_dir.resolve())).as_posix()


@dataclass
class _Sample:
    key: str
    audio: list[tarfile.TarInfo] = field(default_factory=list)
    meta: tarfile.TarInfo | None = None


def _samples(tar: tarfile.TarFile, report: ShardIndexReport) -> list[_Sample]:
    """The tar's samples in order, grouped as WebDataset's ``group_by_keys`` does; non-audio members counted."""
    samples: list[_Sample] = []
    for info in tar:
        match = _KEY.match(info.name)
        if not info.isreg() or match is None:
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if not samples or samples[-1].key != key:
            samples.append(_Sample(key))
        extension = suffix.rsplit(".", 1)[-1]
        if extension in _AUDIO:
            samples[-1].audio.append(info)
        elif suffix == "json":
            samples[-1].meta = info
            report.other_members[extension] += 1
        else:
            report.other_members[extension] += 1
    return samples


def _index_tar(path: Path, number: int, columns: dict[str, list], seen: set[str],
               report: ShardIndexReport) -> None:
    end = path.stat().st_size
    with open(path, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
        try:
            samples = _samples(tar, report)
            fh.seek(tar.offset)
            tail = fh.read(min(end - tar.offset, tarfile.RECORDSIZE))
        except (tarfile.TarError, OSError) as error:
            raise ShardError(path, f"cannot be read to its end as a tar ({error})", _DAMAGED_HINT) from error
        if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b"\0"):
            # tarfile ends its walk quietly at a damaged or cut-off header: the rest of the shard would be lost
            raise ShardError(path, f"cannot be read to its end as a tar: after byte {tar.offset} of {end} there is "
                                   "no end-of-archive marker (a truncated or damaged shard)", _DAMAGED_HINT)
        for sample in samples:
            if not sample.audio:
                continue
            audio = sample.audio[0]
            report.second_audio += [f"{path.name}:{extra.name}" for extra in sample.audio[1:]]
            if audio.issparse():
                report.skipped.append(f"{path.name}:{audio.name} (a sparse member: its bytes are not contiguous)")
                continue
            try:
                info = soundfile.info(_MemberWindow(fh, audio.offset_data, audio.size))
            except Exception as error:  # libsndfile's errors about unreadable data have no common type
                report.skipped.append(f"{path.name}:{audio.name} ({str(error).strip() or type(error).__name__})")
                continue
            frames, rate, channels = int(info.frames), int(info.samplerate), int(info.channels)
            name = _own_name(fh, sample.meta, frames, rate) or audio.name
            if name in seen:
                name = f"{path.name}/{name}"
                report.renamed += 1
            seen.add(name)
            for column, value in zip(ITEM_COLUMNS, (name, number, audio.offset_data, audio.size, frames, rate,
                                                    channels)):
                columns[column].append(value)
            report.items += 1
            report.formats[audio.name.rsplit(".", 1)[-1].lower()] += 1
            report.seconds += frames / rate if rate else 0.0


def _own_name(fh: BinaryIO, meta: tarfile.TarInfo | None, frames: int, rate: int) -> str | None:
    """The utterance's name recorded by ``shards write`` in ``KEY.json``, when this is such a shard (its four
    fields, matching the audio): re-indexing our own shards gives back their index. Else None."""
    if meta is None or meta.size > 4096:
        return None
    fh.seek(meta.offset_data)
    try:
        data = json.loads(fh.read(meta.size).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if (isinstance(data, dict) and set(data) == _OWN_META and isinstance(data["name"], str)
            and data["frames"] == frames and data["sample_rate"] == rate):
        return data["name"]
    return None


class _MemberWindow:
    """A read-only, seekable view of ``size`` bytes at ``offset`` of an open file: soundfile reads the audio
    header through it without the member being read whole. (No ``readinto``: soundfile then calls ``read``.)"""

    def __init__(self, fh: BinaryIO, offset: int, size: int):
        self._fh, self._offset, self._size, self._pos = fh, offset, size, 0

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        if end <= self._pos:
            return b""
        self._fh.seek(self._offset + self._pos)
        data = self._fh.read(end - self._pos)
        self._pos += len(data)
        return data
