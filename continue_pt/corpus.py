"""Find the training audio: a directory of audio files or a fairseq manifest (``.tsv``).

``scan_audio`` sets aside every file that cannot be used, with a one-line reason, instead of failing.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from bundles.errors import FileProblem
from continue_pt.audio import AudioError, audio_info, resampled_length

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".caf", ".w64", ".rf64")
"""What a directory scan reads: formats libsndfile (>= 1.1: MP3, Opus) decodes. Any other file is skipped and named."""
NOT_AUDIO_EXTENSIONS = (".txt", ".tsv", ".km", ".ltr", ".wrd", ".json", ".jsonl", ".csv", ".md", ".lab", ".textgrid",
                        ".yaml", ".yml", ".xml", ".lst", ".scp", ".trn", ".stm", ".log", ".pdf", ".html")
"""Transcripts, manifests, labels and notes that sit beside audio (LibriSpeech has a .trans.txt per chapter): counted
as "not audio" and reported in one line, not one warning per file."""
SOURCE_HINT = ("Give a directory of audio files (.wav, .flac, .ogg, .opus, .mp3, ...; searched recursively) or a "
               "fairseq manifest (.tsv: the root directory on line 1, then 'relative_path<TAB>num_frames' per file)")
MAX_LISTED_PROBLEMS = 20
_ZIP_SLICE = re.compile(r"\.zip:\d+:\d+$")




@dataclass(frozen=True)
class AudioItem:
    """One usable audio file.

    ``num_samples`` is its length at the *target* sample rate (after resampling). ``name`` is its path relative to
    the scanned directory or as the manifest lists it (stable across machines: the validation split hashes it).
    ``manifest_entry`` is its 0-based entry number in a manifest (= its line in a ``.km`` label file), else None.
    ``file_frames`` is its length in the file's own frames (at the file's own rate ``file_rate``): what a fairseq
    manifest lists for it (fairseq's ``wav2vec_manifest.py`` writes ``soundfile.info(path).frames``); None when
    unknown (a manifest scanned without reading headers). ``member``: where its bytes are in a tar shard
    (a :class:`continue_pt.shard_format.ShardMember`; ``path`` then only names it), else None.
    """

    path: Path
    num_samples: int
    name: str = ""
    manifest_entry: int | None = None
    file_frames: int | None = None
    file_rate: int | None = None
    member: Any = None


@dataclass
class ScanResult:
    """The usable files, in order, and the files set aside as ``(path, "category: detail")``."""

    items: list[AudioItem]
    skipped: list[tuple[Path, str]]
    source: Path | None = None
    manifest_entries: int | None = None  # number of file lines in a manifest (what a .km file must match)

    def summary(self) -> str:
        """One line, e.g. ``skipped 3 of 120 files: 2 unreadable, 1 shorter than 2.0 s``."""
        total = len(self.items) + len(self.skipped)
        if not self.skipped:
            return f"skipped 0 of {total} files"
        counts = Counter(reason.split(":", 1)[0] for _, reason in self.skipped)
        parts = ", ".join(f"{n} {category}" for category, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"skipped {len(self.skipped)} of {total} files: {parts}"

    def resampling_note(self, sample_rate: int) -> str | None:
        """One line when some usable files are at another rate than ``sample_rate`` (they are resampled when
        read, which the model needs and which costs data-loading time), else None."""
        rates = Counter(item.file_rate for item in self.items if item.file_rate not in (None, sample_rate))
        if not rates:
            return None
        listed = ", ".join(f"{n} at {rate} Hz" for rate, n in sorted(rates.items(), key=lambda kv: -kv[1]))
        return (f"{sum(rates.values())} of {len(self.items)} files are not at the model's {sample_rate} Hz "
                f"({listed}): they are resampled to {sample_rate} Hz each time they are read; resample them once "
                "beforehand to save data-loading time")


def scan_audio(source: str | Path, sample_rate: int, min_seconds: float = 2.0, *, read_headers: bool = True,
               num_threads: int = 16) -> ScanResult:
    """List the usable audio of ``source``: a directory (recursive) or a fairseq manifest (``.tsv``).

    Every file's header is read (not its samples) to learn its length and sample rate; files that are missing,
    unreadable, empty or shorter than ``min_seconds`` are set aside in ``skipped`` with a one-line reason and the
    scan goes on. For a manifest, ``read_headers=False`` trusts the listed frame counts (fairseq's behaviour: no
    file is opened, only checked to exist; the files must then be at ``sample_rate``). Raises
    :class:`FileProblem` only when ``source`` itself is unusable.
    """
    source = Path(source)
    if not source.exists():
        raise FileProblem(source, "does not exist", SOURCE_HINT)
    if source.is_dir():
        return _scan_directory(source, sample_rate, min_seconds, num_threads)
    if source.suffix.lower() == ".tsv":
        return _scan_manifest(source, sample_rate, min_seconds, read_headers, num_threads)
    raise FileProblem(source, "is neither a directory nor a fairseq manifest (.tsv)", SOURCE_HINT)


def _not_read(path: Path) -> str:
    """Why a file of a directory is not read: text beside the audio, or a format libsndfile does not decode."""
    if path.suffix.lower() in NOT_AUDIO_EXTENSIONS:
        return f"not audio: a {path.suffix} file (transcripts, manifests, labels and notes are left out)"
    return (f"unsupported: {path.suffix or 'a file without extension'} is not a format read here "
            f"({', '.join(AUDIO_EXTENSIONS)}); convert it, e.g. ffmpeg -i IN OUT.flac")


def not_audio_note(skipped: list[tuple[Path, str]]) -> str | None:
    """One line for the files left out as not audio (counted per extension, the first few named), else None."""
    paths = [path for path, reason in skipped if reason.startswith("not audio:")]
    if not paths:
        return None
    per_suffix = Counter(path.suffix.lower() for path in paths)
    counted = ", ".join(f"{suffix}: {n}" for suffix, n in per_suffix.most_common())
    named = ", ".join(path.name for path in paths[:3]) + (", ..." if len(paths) > 3 else "")
    files = "file that is" if len(paths) == 1 else "files that are"
    return f"left out {len(paths)} {files} not audio ({counted}): {named}"


def _scan_directory(source: Path, sample_rate: int, min_seconds: float, num_threads: int) -> ScanResult:
    files = sorted((p for p in source.rglob("*") if p.is_file()), key=lambda p: p.relative_to(source).as_posix())
    paths = [p for p in files if p.suffix.lower() in AUDIO_EXTENSIONS]
    others = [p for p in files if p.suffix.lower() not in AUDIO_EXTENSIONS]
    if not paths:
        found = f"; it holds {len(others)} other files ({_suffixes(others)})" if others else ""
        raise FileProblem(source, f"holds no audio files ({', '.join(AUDIO_EXTENSIONS)}), in it or below it{found}",
                          SOURCE_HINT)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        probes = list(pool.map(lambda p: _probe(p, sample_rate, min_seconds), paths))
    result = ScanResult([], [], source=source)
    # named, not silently left out: e.g. .m4a/.aac/.wma, which libsndfile does not decode
    result.skipped.extend((path, _not_read(path)) for path in others)
    for path, probe in zip(paths, probes):
        if probe.reason:
            result.skipped.append((path, probe.reason))
        else:
            result.items.append(AudioItem(path, probe.num_samples, path.relative_to(source).as_posix(),
                                          file_frames=probe.frames, file_rate=probe.rate))
    result.skipped.sort(key=lambda skipped: skipped[0].relative_to(source).as_posix())
    return result


def _scan_manifest(source: Path, sample_rate: int, min_seconds: float, read_headers: bool,
                   num_threads: int) -> ScanResult:
    """fairseq's manifest (``examples/wav2vec/wav2vec_manifest.py``): root, then ``name<TAB>frames`` lines."""
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise FileProblem(source, f"cannot be read as a text manifest ({error})", SOURCE_HINT) from error
    if not lines or not lines[0].strip():
        raise FileProblem(source, "is empty: line 1 should name the root directory of the listed files",
                          SOURCE_HINT)
    root = _manifest_root(source, lines[0].strip())
    entries, problems = [], []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.strip().split("\t")
        if len(fields) != 2 or not fields[1].isdigit():
            problems.append(f"line {number}: expected 'relative_path<TAB>num_frames', found {line!r}")
            continue
        entries.append((fields[0], int(fields[1])))
    if problems:
        raise FileProblem(source, capped(problems),
                          "fix or remove these lines (a .km label file must stay line-aligned with the manifest)")
    if not entries:
        raise FileProblem(source, "lists no audio files (only the root directory line)", SOURCE_HINT)

    def check(entry: tuple[str, int]) -> _Probe:
        name, frames = entry
        if _ZIP_SLICE.search(name):
            return _Probe(0, "unsupported: fairseq zip slices (file.zip:offset:length) are not read; unpack the audio")
        path = root / name
        if not read_headers:
            if not path.is_file():
                return _Probe(0, "missing: listed in the manifest but not found")
            if frames == 0:
                return _Probe(0, "empty: the manifest lists 0 frames")
            return _Probe(*_length_check(frames, min_seconds, sample_rate), frames=None, rate=None)
        return _probe(path, sample_rate, min_seconds, listed_frames=frames)

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        probes = list(pool.map(check, entries))
    result = ScanResult([], [], source=source, manifest_entries=len(entries))
    for entry, ((name, listed), probe) in enumerate(zip(entries, probes)):
        path = root / name
        if probe.reason:
            result.skipped.append((path, probe.reason))
        else:
            # without headers the listed frames are trusted to be at sample_rate (fairseq's behaviour)
            frames = probe.frames if read_headers else listed
            result.items.append(AudioItem(path, probe.num_samples, name, entry, file_frames=frames,
                                          file_rate=probe.rate))
    return result


def _manifest_root(source: Path, root_line: str) -> Path:
    """fairseq joins the root to the working directory when relative; we also try the manifest's directory."""
    root = Path(root_line).expanduser()
    candidates = [root] if root.is_absolute() else [Path.cwd() / root, source.parent / root]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileProblem(source, f"line 1 names the root directory {root_line!r}, which does not exist",
                      "The first line of a fairseq manifest is the directory the listed paths are relative to")


class _Probe(NamedTuple):
    """What a file's header says: its length at the model's rate, or why it is skipped (``reason``)."""

    num_samples: int
    reason: str
    frames: int | None = None
    rate: int | None = None


def _probe(path: Path, sample_rate: int, min_seconds: float, listed_frames: int | None = None) -> _Probe:
    """The file's length at ``sample_rate``, its own frames and rate; or the one-line reason it is unusable.

    A manifest's frame count is compared with the file's own frames (at its own rate), the convention of
    fairseq's manifests and of the ``.tsv`` that ``labels dump`` writes.
    """
    if not path.exists():
        missing = "missing: no such file" if listed_frames is None else "missing: listed in the manifest but not found"
        return _Probe(0, missing)
    try:
        frames, file_rate, _ = audio_info(path)
    except AudioError as error:
        return _Probe(0, f"unreadable: {error.problems[0]}")
    if frames == 0:
        return _Probe(0, "empty: 0 frames")
    if listed_frames is not None and listed_frames != frames:
        return _Probe(0, f"stale manifest entry: the manifest lists {listed_frames} frames, the file has {frames} "
                         f"at its own {file_rate} Hz (labels written for the listed audio would be misaligned)")
    num_samples, reason = _length_check(resampled_length(frames, file_rate, sample_rate), min_seconds, sample_rate)
    return _Probe(num_samples, reason, frames, file_rate)


def _length_check(num_samples: int, min_seconds: float, sample_rate: int) -> tuple[int, str]:
    if num_samples < min_seconds * sample_rate:
        return 0, f"shorter than {_seconds(min_seconds)} s: {num_samples / sample_rate:.2f} s"
    return num_samples, ""


def _suffixes(paths: list[Path]) -> str:
    counts = Counter(p.suffix.lower() or "no extension" for p in paths)
    return ", ".join(f"{n} {suffix}" for suffix, n in counts.most_common(5))


def _seconds(value: float) -> str:
    return f"{value:.1f}" if round(value, 1) == value else f"{value:g}"


def capped(problems: list[str]) -> list[str]:
    """At most ``MAX_LISTED_PROBLEMS`` of ``problems``, and how many more there are."""
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    return problems[:MAX_LISTED_PROBLEMS] + [f"... and {len(problems) - MAX_LISTED_PROBLEMS} more"]
