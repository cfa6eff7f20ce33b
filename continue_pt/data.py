"""The training data pipeline: find the audio, read it, batch it by length, crop it as fairseq's HuBERT does.

``scan_audio`` lists a directory of audio files or a fairseq manifest (``.tsv``) and sets aside every file that
cannot be used, with a reason, instead of failing. ``read_label_file`` reads fairseq's frame labels (``.km`` +
``dict.km.txt``) as *cluster ids*. ``AudioDataset`` reads (and resamples, and optionally normalises) one file;
``collate_audio`` crops a batch to its shortest utterance exactly like fairseq's ``HubertDataset.collater``
(``pad_audio=False, random_crop=True``), labels included; ``BucketBatchSampler`` groups utterances of similar
length under an audio budget per batch and can resume in the middle of an epoch; ``AudioDataModule`` ties them
together for Lightning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from bundles.errors import FileProblem
from continue_pt.audio import AudioError, audio_info, read_audio, resampled_length

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
SOURCE_HINT = ("Give a directory of audio files (.wav, .flac, .ogg; searched recursively) or a fairseq manifest "
               "(.tsv: the root directory on line 1, then 'relative_path<TAB>num_frames' per file)")
MAX_LISTED_PROBLEMS = 20
_ZIP_SLICE = re.compile(r"\.zip:\d+:\d+$")


# --------------------------------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class AudioItem:
    """One usable audio file.

    ``num_samples`` is its length at the *target* sample rate (after resampling). ``name`` is its path relative to
    the scanned directory or as the manifest lists it (stable across machines: the validation split hashes it).
    ``manifest_entry`` is its 0-based entry number in a manifest (= its line in a ``.km`` label file), else None.
    """

    path: Path
    num_samples: int
    name: str = ""
    manifest_entry: int | None = None


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


def _scan_directory(source: Path, sample_rate: int, min_seconds: float, num_threads: int) -> ScanResult:
    paths = sorted((p for p in source.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()),
                   key=lambda p: p.relative_to(source).as_posix())
    if not paths:
        raise FileProblem(source, f"holds no audio files ({', '.join(AUDIO_EXTENSIONS)}), in it or below it",
                          SOURCE_HINT)
    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        probes = list(pool.map(lambda p: _probe(p, sample_rate, min_seconds), paths))
    result = ScanResult([], [], source=source)
    for path, (num_samples, reason) in zip(paths, probes):
        if reason:
            result.skipped.append((path, reason))
        else:
            result.items.append(AudioItem(path, num_samples, path.relative_to(source).as_posix()))
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
        raise FileProblem(source, _capped(problems),
                          "fix or remove these lines (a .km label file must stay line-aligned with the manifest)")
    if not entries:
        raise FileProblem(source, "lists no audio files (only the root directory line)", SOURCE_HINT)

    def check(entry: tuple[str, int]) -> tuple[int, str]:
        name, frames = entry
        if _ZIP_SLICE.search(name):
            return 0, "unsupported: fairseq zip slices (file.zip:offset:length) are not read; unpack the audio"
        path = root / name
        if not read_headers:
            if not path.is_file():
                return 0, "missing: listed in the manifest but not found"
            if frames == 0:
                return 0, "empty: the manifest lists 0 frames"
            return _length_check(frames, min_seconds, sample_rate)
        num_samples, reason = _probe(path, sample_rate, min_seconds, listed_frames=frames)
        return num_samples, reason

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
        probes = list(pool.map(check, entries))
    result = ScanResult([], [], source=source, manifest_entries=len(entries))
    for entry, ((name, _), (num_samples, reason)) in enumerate(zip(entries, probes)):
        path = root / name
        if reason:
            result.skipped.append((path, reason))
        else:
            result.items.append(AudioItem(path, num_samples, name, entry))
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


def _probe(path: Path, sample_rate: int, min_seconds: float, listed_frames: int | None = None) -> tuple[int, str]:
    """``(num_samples at sample_rate, "")`` for a usable file, else ``(0, "category: detail")``."""
    if not path.exists():
        return 0, "missing: no such file" if listed_frames is None else "missing: listed in the manifest but not found"
    try:
        frames, file_rate, _ = audio_info(path)
    except AudioError as error:
        return 0, f"unreadable: {error.problems[0]}"
    if frames == 0:
        return 0, "empty: 0 frames"
    if listed_frames is not None and listed_frames != frames:
        return 0, (f"stale manifest entry: the manifest lists {listed_frames} frames, the file has {frames} "
                   "(labels written for the listed audio would be misaligned)")
    return _length_check(resampled_length(frames, file_rate, sample_rate), min_seconds, sample_rate)


def _length_check(num_samples: int, min_seconds: float, sample_rate: int) -> tuple[int, str]:
    if num_samples < min_seconds * sample_rate:
        return 0, f"shorter than {_seconds(min_seconds)} s: {num_samples / sample_rate:.2f} s"
    return num_samples, ""


def _seconds(value: float) -> str:
    return f"{value:.1f}" if round(value, 1) == value else f"{value:g}"


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_LISTED_PROBLEMS:
        return problems
    return problems[:MAX_LISTED_PROBLEMS] + [f"... and {len(problems) - MAX_LISTED_PROBLEMS} more"]


# --------------------------------------------------------------------------------------------------- labels


class FrameLabels(Sequence):
    """Frame labels (cluster ids) of a list of items: ``labels[i]`` is item i's 1-D int64 tensor.

    Stored as one flat int16/int32 array with offsets (2 bytes a label for K ≤ 32768: 960 h at 50 Hz is 346 MB
    instead of 1.4 GB, and data-loader workers share it instead of pickling a million small tensors).
    """

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self.flat = flat
        self.offsets = offsets

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]]) -> FrameLabels:
        arrays = [np.asarray(s) for s in sequences]
        offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays], dtype=np.int64)]).astype(np.int64)
        top = max((int(a.max()) for a in arrays if a.size), default=0)
        dtype = np.int16 if top < 2 ** 15 else np.int32
        flat = np.concatenate(arrays, dtype=dtype, casting="same_kind") if arrays else np.zeros(0, dtype)
        return cls(flat, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return torch.from_numpy(self.flat[self.offsets[index]:self.offsets[index + 1]].astype(np.int64))

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, indices: Sequence[int]) -> FrameLabels:
        """The labels of the given items, in that order."""
        return FrameLabels.from_sequences([self.flat[self.offsets[i]:self.offsets[i + 1]] for i in indices])


def read_label_dictionary(dict_path: str | Path) -> dict[str, int]:
    """fairseq's ``dict.km.txt`` (``symbol count`` lines) as ``{symbol: cluster id}``.

    fairseq maps a label symbol to its *row* in the dictionary (4 specials first, then the file's order, so row =
    c + 4 only when the file lists 0..K-1 in order). Our models use the cluster id itself (symbol ``"c"`` is cluster
    c: torchaudio's ``HuBERTPretrainModel`` and our bundles index label embeddings by cluster id), so every symbol
    must be a cluster id written as a plain non-negative integer.
    """
    dict_path = Path(dict_path)
    try:
        lines = dict_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise FileProblem(dict_path, f"cannot be read as a label dictionary ({error})",
                          "Give fairseq's dict.km.txt: one 'symbol count' line per cluster") from error
    symbols: dict[str, int] = {}
    problems = []
    for number, line in enumerate(lines, start=1):
        fields = line.rstrip().split(" ")
        if fields and fields[-1] == "#fairseq:overwrite":
            fields = fields[:-1]
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            problems.append(f"line {number}: expected 'symbol count', found {line!r}")
            continue
        symbol = fields[0]
        if not symbol.isdigit() or str(int(symbol)) != symbol:
            problems.append(f"line {number}: symbol {symbol!r} is not a cluster id (a non-negative integer)")
        elif symbol in symbols:
            problems.append(f"line {number}: symbol {symbol!r} is listed twice")
        else:
            symbols[symbol] = int(symbol)
    if not symbols and not problems:
        problems.append("lists no symbols")
    if problems:
        raise FileProblem(dict_path, _capped(problems), "Give fairseq's dict.km.txt: one 'symbol count' line per "
                                                        "cluster id")
    return symbols


def read_label_file(km_path: str | Path, dict_path: str | Path, items: Sequence[AudioItem], *, label_rate: float,
                    sample_rate: int, manifest_entries: int | None = None,
                    tolerance_seconds: float = 0.1) -> FrameLabels:
    """The frame labels of ``items`` from fairseq's ``.km`` file, as cluster ids (see :func:`read_label_dictionary`).

    The ``.km`` file has one line of space-separated symbols per manifest entry, in manifest order (items carry
    their entry number, so skipped files are simply not read). A symbol missing from the dictionary is refused
    with its line (fairseq silently maps it to ``<unk>``). Label and audio durations must agree within
    ``tolerance_seconds`` (fairseq's ``verify_label_lengths``, which only warns; a larger gap means a wrong
    ``label_rate`` or a ``.km`` written for other audio). Every problem is reported at once.
    """
    km_path = Path(km_path)
    lookup = read_label_dictionary(dict_path)
    if any(item.manifest_entry is None for item in items):
        raise FileProblem(km_path, "frame labels need the audio listed in a fairseq manifest (.tsv)",
                          "Scan the manifest the .km file was written for, not a directory")
    wanted: dict[int, list[int]] = {}
    for position, item in enumerate(items):
        wanted.setdefault(item.manifest_entry, []).append(position)
    sequences: list[Any] = [None] * len(items)
    problems = []
    num_lines = 0
    try:
        with km_path.open(encoding="utf-8") as stream:
            for line_index, line in enumerate(stream):
                num_lines += 1
                positions = wanted.get(line_index)
                if positions is None:
                    continue
                tokens = line.split()
                try:
                    ids = np.fromiter((lookup[t] for t in tokens), dtype=np.int32, count=len(tokens))
                except KeyError as missing:
                    problems.append(f"line {line_index + 1}: symbol {missing.args[0]!r} is not in "
                                    f"{Path(dict_path).name}")
                    ids = np.zeros(0, np.int32)
                for position in positions:
                    sequences[position] = ids
    except (OSError, UnicodeDecodeError) as error:
        raise FileProblem(km_path, f"cannot be read as a label file ({error})",
                          "Give fairseq's .km file: one line of space-separated labels per manifest line") from error
    if manifest_entries is not None and num_lines != manifest_entries:
        problems.append(f"has {num_lines} lines but the manifest lists {manifest_entries} files (one line per "
                        "manifest file, in order, is needed)")
    elif wanted and max(wanted) >= num_lines:
        problems.append(f"has {num_lines} lines but the manifest lists at least {max(wanted) + 1} files")
    if problems:
        raise FileProblem(km_path, _capped(problems),
                          "Write the .km file for this manifest (fairseq's dump_km_label.py)")
    mismatched = []
    for item, ids in zip(items, sequences):
        audio_seconds = item.num_samples / sample_rate
        label_seconds = len(ids) / label_rate
        if abs(audio_seconds - label_seconds) > tolerance_seconds:
            mismatched.append(f"line {item.manifest_entry + 1}: {len(ids)} labels at {label_rate:g} Hz = "
                              f"{label_seconds:.2f} s, but {item.name} is {audio_seconds:.2f} s")
    if mismatched:
        raise FileProblem(km_path, _capped(mismatched),
                          f"Label and audio durations differ by more than {tolerance_seconds:g} s. Check label_rate "
                          f"(now {label_rate:g} Hz; HuBERT feature labels are 50 Hz, MFCC labels 100 Hz) and that "
                          "the .km file was written for this manifest, line by line")
    return FrameLabels.from_sequences(sequences)


# --------------------------------------------------------------------------------------------------- dataset


class AudioDataset(Dataset):
    """``dataset[i]`` = ``{"index": i, "waveform": 1-D float32, "labels": int64 frames or None}``, or None.

    The file is read at ``sample_rate`` (resampled if needed) and, when ``normalize``, normalised over the whole
    utterance before any cropping (fairseq: ``F.layer_norm(wav, wav.shape)``). A file that cannot be read any
    more (deleted or corrupted after the scan) gives None: one warning line names it, ``failures`` counts it (in
    shared memory, so reads in data-loader workers count too) and the collater drops it.
    """

    def __init__(self, items: Sequence[AudioItem], sample_rate: int, normalize: bool,
                 labels: Sequence[Tensor] | None = None):
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"{len(labels)} label sequences for {len(items)} audio items")
        self.items = list(items)
        self.sample_rate = sample_rate
        self.normalize = normalize
        self.labels = labels
        self._failures = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def failures(self) -> int:
        return int(self._failures.item())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            waveform = read_audio(item.path, self.sample_rate)
        except AudioError as error:
            self._failures += 1
            logger.warning("%s; left out of its batch (%d read failures so far)", error, self.failures)
            return None
        if self.normalize:
            with torch.no_grad():
                waveform = F.layer_norm(waveform, waveform.shape)
        labels = self.labels[index] if self.labels is not None else None
        return {"index": index, "waveform": waveform, "labels": labels}


def collate_audio(samples: Sequence[dict[str, Any] | None], max_sample_size: int, label_rate: float,
                  sample_rate: int, rng: np.random.Generator) -> dict[str, Tensor | None] | None:
    """Crop a batch to its shortest utterance (at most ``max_sample_size``) at random offsets, labels along.

    fairseq's ``HubertDataset.collater`` with ``pad_audio=False, random_crop=True``: no padding and no file is
    dropped. The label window starts at frame ``int(round(start * label_rate / sample_rate))`` and is
    ``int(round(size * label_rate / sample_rate))`` frames long, shortened to what every utterance still has.
    Returns ``waveforms [B, T]``, ``lengths [B]`` (all T), ``labels [B, frames]`` or None, ``indices [B]``,
    ``starts [B]`` (crop offsets in samples); None when every sample failed to load.
    """
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    waveforms = [s["waveform"] for s in samples]
    audio_size = min(min(len(w) for w in waveforms), max_sample_size)
    starts = []
    for waveform in waveforms:
        diff = len(waveform) - audio_size
        starts.append(int(rng.integers(0, diff + 1)) if diff > 0 else 0)
    batch_waveforms = torch.stack([w[s:s + audio_size] for w, s in zip(waveforms, starts)])

    labels = [s["labels"] for s in samples]
    if all(t is None for t in labels):
        batch_labels = None
    elif any(t is None for t in labels):
        raise ValueError("some samples of the batch have labels and some do not")
    else:
        samples_to_frames = label_rate / sample_rate
        frame_starts = [int(round(s * samples_to_frames)) for s in starts]
        frame_size = int(round(audio_size * samples_to_frames))
        frame_size = max(0, min(frame_size, *(len(t) - s for t, s in zip(labels, frame_starts))))
        batch_labels = torch.stack([t[s:s + frame_size].long() for t, s in zip(labels, frame_starts)])

    return {
        "waveforms": batch_waveforms,
        "lengths": torch.full((len(samples),), audio_size, dtype=torch.long),
        "labels": batch_labels,
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "starts": torch.tensor(starts, dtype=torch.long),
    }


class BatchCollater:
    """``collate_audio`` with crop offsets drawn from ``(seed, epoch, the batch's indices)``.

    Deterministic per batch, so a resumed run crops the same batches the same way; in data-loader worker
    processes as in the main one. The epoch is read from ``sampler`` (None: always epoch 0, for validation).
    """

    def __init__(self, max_sample_size: int, label_rate: float, sample_rate: int, seed: int,
                 sampler: BucketBatchSampler | None = None):
        self.max_sample_size = max_sample_size
        self.label_rate = label_rate
        self.sample_rate = sample_rate
        self.seed = seed
        self.sampler = sampler

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Tensor | None] | None:
        epoch = self.sampler.epoch if self.sampler is not None else 0
        indices = [s["index"] for s in samples if s is not None]
        rng = np.random.default_rng([self.seed, epoch, *indices])
        return collate_audio(samples, self.max_sample_size, self.label_rate, self.sample_rate, rng)


# --------------------------------------------------------------------------------------------------- batching


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of utterances of similar length, each holding at most ``max_batch_seconds`` of audio.

    A batch's cost is ``len(batch) * min(longest, max_sample_size)`` samples (it is cropped to its shortest, so it
    holds at most that) and stays ≤ ``max_batch_seconds * sample_rate``; a single utterance over the budget still
    forms a batch of one (cropped to ``max_sample_size``). Lengths are rounded up to ``bucket_seconds``; within each
    rounded length the order is drawn anew each epoch (fairseq's ``ordered_indices``: sort by capped length, random
    tie-break) and the batches are shuffled. The batch *boundaries* depend only on the rounded lengths, so every
    epoch has the same number of batches (Lightning counts them once). Deterministic for ``(seed, epoch)``.

    Distributed: each of ``num_replicas`` ranks takes every ``num_replicas``-th batch; the epoch is padded by
    repeating its first batches so every rank gets as many (or trimmed, with ``drop_last``), as
    ``DistributedSampler`` does. Use ``Trainer(use_distributed_sampler=False)``.

    ``state_dict()`` holds the epoch, the seed and how many batches of the epoch were already yielded; after
    ``load_state_dict()`` the next iteration continues with the next batch, in the same order.
    """

    def __init__(self, num_samples: Sequence[int], max_batch_seconds: float, sample_rate: int,
                 max_sample_size: int, shuffle: bool, seed: int, drop_last: bool = False, *,
                 num_replicas: int = 1, rank: int = 0, bucket_seconds: float = 0.25):
        budget = int(max_batch_seconds * sample_rate)
        if budget < 1:
            raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in range for {num_replicas} replicas")
        self.sample_rate = sample_rate
        self.max_sample_size = int(max_sample_size)
        self.budget = budget
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        # Lightning calls ``set_epoch`` on ``loader.sampler`` and ``loader.batch_sampler.sampler`` at each epoch
        # start, never on a batch sampler itself (lightning.fabric.utilities.data._set_sampler_epoch, 2.6)
        self.sampler = _EpochSetter(self)
        self._resume_at = 0  # batches of self.epoch to skip at the next iteration (set by load_state_dict)
        self._yielded = 0  # batches of self.epoch yielded so far

        capped = np.minimum(np.asarray(num_samples, dtype=np.int64), self.max_sample_size)
        quantum = max(1, int(round(bucket_seconds * sample_rate)))
        self.keys = np.maximum(np.minimum(-(-capped // quantum) * quantum, self.max_sample_size), 1)  # ≥ crop
        self._bounds = self._batch_bounds(np.sort(self.keys)[::-1])
        digest = hashlib.sha1(self.keys.tobytes())
        digest.update(repr((self.budget, self.max_sample_size, num_replicas, drop_last)).encode())
        self.fingerprint = digest.hexdigest()

    def _batch_bounds(self, descending_keys: np.ndarray) -> list[tuple[int, int]]:
        bounds, start = [], 0
        while start < len(descending_keys):
            size = max(1, self.budget // int(descending_keys[start]))  # the first key is the batch's longest
            end = min(start + size, len(descending_keys))
            bounds.append((start, end))
            start = end
        return bounds

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_at = 0
            self._yielded = 0
        self.epoch = epoch

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch``, in order."""
        n = len(self.keys)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.lexsort((rng.permutation(n), -self.keys))
        else:
            order = np.lexsort((np.arange(n), -self.keys))
        batches = [order[a:b] for a, b in self._bounds]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.num_replicas > 1:
            if self.drop_last:
                batches = batches[:len(batches) - len(batches) % self.num_replicas]
            elif batches and len(batches) % self.num_replicas:
                padding = self.num_replicas - len(batches) % self.num_replicas
                batches = batches + [batches[i % len(batches)] for i in range(padding)]
            batches = batches[self.rank::self.num_replicas]
        return batches

    def __len__(self) -> int:
        total = len(self._bounds)
        if self.num_replicas == 1:
            return total
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def __iter__(self):
        batches = self.epoch_batches(self.epoch)
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield batch.tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "seed": self.seed, "batches_done": self._yielded,
                "num_batches": len(self), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration starts at batch ``batches_done`` of ``epoch``."""
        if state.get("fingerprint") != self.fingerprint:
            logger.warning("the training data or batching settings changed since the checkpoint: resuming epoch %d "
                           "after %d batches, but the batch order differs from the interrupted run's",
                           state["epoch"], state["batches_done"])
        if int(state["seed"]) != self.seed:
            logger.warning("using the checkpoint's data seed %d instead of %d to continue its batch order",
                           state["seed"], self.seed)
            self.seed = int(state["seed"])
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self):  # the checkpoint was taken at the end of an epoch
            epoch, done = epoch + 1, 0
        self.epoch = epoch
        self._resume_at = done
        self._yielded = done


class _EpochSetter:
    """What Lightning finds at ``batch_sampler.sampler``: forwards ``set_epoch`` to the batch sampler."""

    def __init__(self, owner: BucketBatchSampler):
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


# --------------------------------------------------------------------------------------------------- Lightning


def validation_share(name: str) -> float:
    """A stable number in [0, 1) for a file name (sha1): files below ``val_fraction`` are held out."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2 ** 64


class AudioDataModule(pl.LightningDataModule):
    """Training (and validation) audio for Lightning, with optional fairseq frame labels.

    Args:
        train_source: a directory of audio files or a fairseq manifest (``.tsv``).
        val_source: the same for validation. When None, ``val_fraction`` of the training files is held out,
            chosen by a hash of each file's name, so the split stays the same when files are added.
        sample_rate: the model's rate; other rates are resampled when read.
        normalize: normalise each utterance to zero mean and unit variance (fairseq's ``task.normalize``: True
            for HuBERT LARGE/XLARGE, wav2vec 2.0 LV-60k and XLS-R; the bundle's ``normalize_waveform``).
        max_batch_seconds: audio per batch (per device) before cropping; fairseq's HuBERT BASE uses
            1.4M samples = 87.5 s.
        max_sample_size: utterances are cropped to at most this many samples (fairseq: 250k); none is dropped.
        min_seconds: shorter files are skipped. fairseq's ``min_sample_size`` is 32000 samples = 2 s at 16 kHz;
            lower it for corpora of short utterances (a batch is cropped to its shortest utterance, and masking
            needs at least a few hundred milliseconds).
        train_labels, val_labels, label_dict, label_rate: fairseq frame labels (``.km`` files, one line per
            manifest line, and ``dict.km.txt``), read as cluster ids; ``val_labels`` is needed with a separate
            ``val_source``. ``label_rate`` in Hz (50 for HuBERT feature labels, 100 for MFCC labels).
        num_workers: data-loader worker processes.
        seed: the batch order and crop offsets are drawn from it (and the epoch).
        bucket_seconds: lengths are grouped in steps of this size before batching (see BucketBatchSampler).

    ``state_dict()`` (saved in Lightning checkpoints) records how many batches of the current epoch the training
    loop has *consumed*, so ``trainer.fit(..., ckpt_path=...)`` continues with the next batch in the same order.
    """

    def __init__(self, train_source: str | Path, val_source: str | Path | None = None, *, sample_rate: int = 16000,
                 normalize: bool = False, max_batch_seconds: float = 87.5, max_sample_size: int = 250_000,
                 min_seconds: float = 2.0, val_fraction: float = 0.02, train_labels: str | Path | None = None,
                 val_labels: str | Path | None = None, label_dict: str | Path | None = None,
                 label_rate: float = 50.0, num_workers: int = 4, seed: int = 0, bucket_seconds: float = 0.25):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if (train_labels is None) != (label_dict is None):
            given = train_labels if train_labels is not None else label_dict
            raise FileProblem(given, "frame labels need both a .km file and its dictionary",
                              "Pass train_labels=<split>.km together with label_dict=dict.km.txt")
        if val_source is not None and train_labels is not None and val_labels is None:
            raise FileProblem(val_source, "has no frame labels while the training audio has",
                              "Pass val_labels=<the .km written for this manifest>")
        self.train_source = Path(train_source)
        self.val_source = Path(val_source) if val_source is not None else None
        self.sample_rate = sample_rate
        self.normalize = normalize
        self.max_batch_seconds = max_batch_seconds
        self.max_sample_size = max_sample_size
        self.min_seconds = min_seconds
        self.val_fraction = val_fraction
        self.train_labels = Path(train_labels) if train_labels is not None else None
        self.val_labels = Path(val_labels) if val_labels is not None else None
        self.label_dict = Path(label_dict) if label_dict is not None else None
        self.label_rate = label_rate
        self.num_workers = num_workers
        self.seed = seed
        self.bucket_seconds = bucket_seconds
        self.train_dataset: AudioDataset | None = None
        self.val_dataset: AudioDataset | None = None
        self.train_sampler: BucketBatchSampler | None = None
        self._pending_sampler_state: dict[str, Any] | None = None
        self._loaded_sampler_state: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------------------- setup

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        train = self._scan(self.train_source)
        train_labels = self._labels(self.train_labels, train)
        if self.val_source is not None:
            val = self._scan(self.val_source)
            val_items, val_labels = val.items, self._labels(self.val_labels, val)
            train_items = train.items
        else:
            held_out = [validation_share(item.name) < self.val_fraction for item in train.items]
            train_positions = [i for i, out in enumerate(held_out) if not out]
            val_positions = [i for i, out in enumerate(held_out) if out]
            train_items = [train.items[i] for i in train_positions]
            val_items = [train.items[i] for i in val_positions]
            val_labels = train_labels.select(val_positions) if train_labels is not None else None
            train_labels = train_labels.select(train_positions) if train_labels is not None else None
        if not train_items:
            raise FileProblem(self.train_source, "leaves no training audio once the validation files are held out",
                              "Add audio or lower val_fraction")
        self._log(f"training on {len(train_items)} files ({self._hours(train_items)} h), validating on "
                  f"{len(val_items)} files ({self._hours(val_items)} h)")
        self.train_dataset = AudioDataset(train_items, self.sample_rate, self.normalize, train_labels)
        self.val_dataset = AudioDataset(val_items, self.sample_rate, self.normalize, val_labels)

    def _scan(self, source: Path) -> ScanResult:
        scan = scan_audio(source, self.sample_rate, self.min_seconds)
        for path, reason in scan.skipped:
            self._log(f"skipped {path}: {reason}", logging.WARNING)
        self._log(f"{source}: {scan.summary()}", logging.WARNING if scan.skipped else logging.INFO)
        if not scan.items:
            raise FileProblem(source, f"holds no usable audio ({scan.summary()})",
                              "See the reasons logged above for each file")
        return scan

    def _labels(self, km_path: Path | None, scan: ScanResult) -> FrameLabels | None:
        if km_path is None:
            return None
        return read_label_file(km_path, self.label_dict, scan.items, label_rate=self.label_rate,
                               sample_rate=self.sample_rate, manifest_entries=scan.manifest_entries)

    def _hours(self, items: Sequence[AudioItem]) -> str:
        return f"{sum(item.num_samples for item in items) / self.sample_rate / 3600:.2f}"

    def _log(self, message: str, level: int = logging.INFO) -> None:
        trainer = self.trainer
        if trainer is None or trainer.is_global_zero:
            logger.log(level, message)

    # ----------------------------------------------------------------------------------------------- loaders

    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        assert self.train_dataset is not None, "call setup() first"
        num_replicas, rank = self._replicas()
        self.train_sampler = BucketBatchSampler(
            [item.num_samples for item in self.train_dataset.items], self.max_batch_seconds, self.sample_rate,
            self.max_sample_size, shuffle=True, seed=self.seed, num_replicas=num_replicas, rank=rank,
            bucket_seconds=self.bucket_seconds)
        if self._pending_sampler_state is not None:
            self.train_sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        collater = BatchCollater(self.max_sample_size, self.label_rate, self.sample_rate, self.seed,
                                 self.train_sampler)
        return _ResumableLoader(self, self.train_dataset, batch_sampler=self.train_sampler, collate_fn=collater,
                                num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader | list:
        assert self.val_dataset is not None, "call setup() first"
        if len(self.val_dataset) == 0:
            return []
        num_replicas, rank = self._replicas()
        sampler = BucketBatchSampler(
            [item.num_samples for item in self.val_dataset.items], self.max_batch_seconds, self.sample_rate,
            self.max_sample_size, shuffle=False, seed=self.seed, num_replicas=num_replicas, rank=rank,
            bucket_seconds=self.bucket_seconds)
        collater = BatchCollater(self.max_sample_size, self.label_rate, self.sample_rate, self.seed)
        return DataLoader(self.val_dataset, batch_sampler=sampler, collate_fn=collater, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())

    # ----------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position, counting the batches the training loop has consumed.

        The loader runs ahead of the training step (Lightning prefetches a batch; workers prefetch more), so the
        sampler's own count is too high mid-epoch; the fit loop's count of batches taken is used instead.
        """
        if self.train_sampler is None:
            return {"train_sampler": self._pending_sampler_state} if self._pending_sampler_state else {}
        state = self.train_sampler.state_dict()
        consumed = self._consumed_batches()
        if consumed is not None:
            state["batches_done"] = consumed
        return {"train_sampler": state}

    def _consumed_batches(self) -> int | None:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Lightning calls this before it asks for the loaders; the sampler takes the state when it is built."""
        state = state_dict.get("train_sampler")
        if not state or state == self._loaded_sampler_state:
            return
        self._loaded_sampler_state = dict(state)
        if self.train_sampler is not None:
            self.train_sampler.load_state_dict(state)
        else:
            self._pending_sampler_state = dict(state)


class _ResumableLoader(DataLoader):
    """The training loader, resumable in Lightning's eyes (``state_dict``/``load_state_dict``).

    Lightning restores the DataModule's state on every resume and, on a mid-epoch resume, a resumable loader's
    state as well (and warns that results are unreliable when the loader is not resumable). Both carry the same
    sampler position: the loader delegates to its DataModule, which applies a state once.
    """

    def __init__(self, datamodule: AudioDataModule, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.datamodule = datamodule

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)
