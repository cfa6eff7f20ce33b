"""fairseq's HuBERT label files, read and written: ``{split}.tsv`` (the manifest), ``{split}.km`` (cluster ids per
frame, one line per file) and ``dict.km.txt`` (the label dictionary), as fairseq's ``HubertPretrainingTask`` reads
them and ``examples/hubert/simple_kmeans/dump_km_label.py`` writes them."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bundles.atomic import disk_full, file_mode
from bundles.errors import FileProblem
from continue_pt.corpus import AudioItem, ScanResult, capped

logger = logging.getLogger(__name__)


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
        raise FileProblem(dict_path, capped(problems), "Give fairseq's dict.km.txt: one 'symbol count' line per "
                                                        "cluster id")
    return symbols


def label_set_size(dict_path: str | Path) -> int:
    """K of the label set ``dict_path`` (fairseq's ``dict.km.txt``) describes: the label head needs a row for every
    cluster id it lists, so K = the largest id + 1 (= the number of symbols when it lists 0..K-1, as ``labels dump``
    and fairseq's recipes write it)."""
    return max(read_label_dictionary(dict_path).values()) + 1


def label_head_problems(dict_path: str | Path, head_classes: int | None, bundle_name: str,
                        reinit_label_head: bool) -> list[str]:
    """What is wrong with training the label head of ``bundle_name`` (``head_classes`` rows) on the offline labels
    of ``dict_path``: another K is a different label set, as with a k-means of another K (the ids would index rows
    the head lacks, or rows of the old clusters)."""
    try:
        k = label_set_size(dict_path)
    except FileProblem as error:
        return [str(error)]
    if reinit_label_head or head_classes is None or k == head_classes:
        return []
    return [f"the label dictionary {dict_path} lists {k} clusters but the label head of {bundle_name} has "
            f"{head_classes}: these are different label sets; pass --reinit-label-head to train a new label head "
            "for them (with --head-only-steps N to warm it up first)"]


DEFAULT_LABEL_RATE = 50.0
"""fairseq's HuBERT label rate (``label_rate: 50`` in every published HuBERT configuration: k-means of 20 ms
features); used when a checkpoint's configuration gives none."""


def bundle_label_rate(objective: dict[str, Any] | None) -> float:
    """The label rate (Hz) of a bundle's ``objective``; :data:`DEFAULT_LABEL_RATE`, with a warning, when the
    checkpoint it was converted from had none (then ``label_rate`` is missing or null in ``config.json``)."""
    value = (objective or {}).get("label_rate")
    if value is None or float(value) <= 0:
        logger.warning("the bundle's configuration gives no label_rate; assuming fairseq's %g Hz (one label per "
                       "20 ms feature frame)", DEFAULT_LABEL_RATE)
        return DEFAULT_LABEL_RATE
    return float(value)


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
        raise FileProblem(km_path, capped(problems),
                          "Write the .km file for this manifest (fairseq's dump_km_label.py)")
    mismatched = []
    for item, ids in zip(items, sequences):
        audio_seconds = item.num_samples / sample_rate
        label_seconds = len(ids) / label_rate
        if abs(audio_seconds - label_seconds) > tolerance_seconds:
            mismatched.append(f"line {item.manifest_entry + 1}: {len(ids)} labels at {label_rate:g} Hz = "
                              f"{label_seconds:.2f} s, but {item.name} is {audio_seconds:.2f} s")
    if mismatched:
        raise FileProblem(km_path, capped(mismatched),
                          f"Label and audio durations differ by more than {tolerance_seconds:g} s. Check label_rate "
                          f"(now {label_rate:g} Hz; HuBERT feature labels are 50 Hz, MFCC labels 100 Hz) and that "
                          "the .km file was written for this manifest, line by line")
    return FrameLabels.from_sequences(sequences)


# ------------------------------------------------------------------------------------------------ writing


def manifest_root(scan: ScanResult) -> Path:
    """The directory the items' names are relative to (the scanned directory, or the manifest's root line)."""
    if scan.source is not None and scan.source.is_dir():
        return Path(os.path.abspath(scan.source))
    item = scan.items[0]
    depth = len(Path(item.name).parts)
    return Path(os.path.abspath(item.path.parents[depth - 1])) if depth else Path(os.path.abspath(item.path.parent))


def write_label_files(out_dir: Path, split: str, root: Path, entries: Sequence[tuple[str, int, list[int]]],
                      counts: Sequence[int]) -> dict[str, Path]:
    """Write ``{split}.tsv`` (``root``, then ``name<TAB>frames`` per entry), ``{split}.km`` (each entry's cluster
    ids) and ``dict.km.txt`` (``c count`` for every cluster c = 0..K-1, unused ones with count 0) into ``out_dir``,
    all renamed into place together; returns their paths by kind (``tsv``, ``km``, ``dict``)."""
    paths = {"tsv": out_dir / f"{split}.tsv", "km": out_dir / f"{split}.km", "dict": out_dir / "dict.km.txt"}
    texts = {"tsv": "\n".join([str(root)] + [f"{name}\t{frames}" for name, frames, _ in entries]) + "\n",
             "km": "\n".join(" ".join(map(str, labels)) for _, _, labels in entries) + "\n",
             "dict": "".join(f"{c} {int(n)}\n" for c, n in enumerate(counts))}
    write_texts_atomically({paths[key]: texts[key] for key in paths})
    return paths


def write_texts_atomically(files: dict[Path, str]) -> None:
    """Write each text to a temporary sibling, then rename them all into place (none is left half-written)."""
    temps: dict[Path, str] = {}
    path = next(iter(files))
    try:
        for path, text in files.items():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps[path] = tmp
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, file_mode())  # mkstemp's 0600 would survive the rename: give the umask's permissions
        for path, tmp in temps.items():
            os.replace(tmp, path)
    except OSError as exc:
        full = disk_full(path, exc, len(files[path].encode("utf-8")))
        if full is not None:
            raise full from exc
        raise
    finally:
        for tmp in temps.values():
            Path(tmp).unlink(missing_ok=True)
