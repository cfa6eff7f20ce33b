"""``continue-pt labels dump``: label audio with a teacher + k-means and write fairseq's HuBERT label files
(``{split}.tsv``, ``{split}.km``, ``dict.km.txt``, through :func:`continue_pt.labels.write_label_files`).

The same labels :class:`continue_pt.teacher.OnlineTargets` computes during training, for whole files, in the files
fairseq's ``HubertPretrainingTask`` reads (``examples/hubert/simple_kmeans/dump_km_label.py`` and the manifest of
``examples/wav2vec/wav2vec_manifest.py``):

* ``{split}.tsv``: the root directory on line 1, then ``relative_path<TAB>num_frames`` per readable file, in scan
  order (``num_frames`` = the file's own frame count at its own rate, as fairseq's ``wav2vec_manifest.py`` writes
  and as ``scan_audio`` checks: a 48 kHz file lists its 48 kHz frames, while its ``.km`` line has the frames of the
  audio resampled to the teacher's rate, which is what training reads);
* ``{split}.km``: line i = the space-separated cluster ids of file i, one per frame of the convolutional front end
  run on the *whole* file (50 Hz for 16 kHz audio: ``(n - 400) // 320 + 1`` frames for BASE/LARGE);
* ``dict.km.txt``: ``c count`` for c = 0..K-1 in that order (fairseq's ``Dictionary`` format: symbol, space, count;
  symbol c then gets index c + 4 after ``<s> <pad> </s> <unk>``). Every cluster is listed, unused ones with count 0,
  so the dictionary always has K symbols whatever this split uses; the counts are this split's frame counts.

Each file is labelled whole, never chunked, so the labels are exactly what the teacher gives the whole utterance
(fairseq's ``HubertFeatureReader`` runs files longer than 100 s in 100 s chunks, whose features differ near the chunk
seams and whose frame count can be one or two lower per seam). Memory grows with the longest file (attention is
quadratic in its frames): split very long recordings before labelling. All three files are written to temporary
files beside their targets and renamed into place only when every file has been labelled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bundles.errors import BundleError, FileProblem
from bundles.kmeans import KMeansModel
from bundles.loading import Bundle
from continue_pt.audio import AudioError, read_audio
from continue_pt.corpus import AudioItem, scan_audio
from continue_pt.labels import manifest_root, write_label_files
from continue_pt.shard_format import is_shard_source
from continue_pt.teacher import OnlineTargets

logger = logging.getLogger(__name__)


@dataclass
class DumpResult:
    tsv: Path
    km: Path
    dict: Path
    files_labelled: int
    frames: int
    counts: list[int]
    """Frames per cluster id 0..K-1 (what ``dict.km.txt`` holds)."""
    files_skipped: list[tuple[Path, str]] = field(default_factory=list)


def dump_labels(teacher: Bundle, kmeans: KMeansModel | None, audio: str | Path, out_dir: str | Path,
                split: str = "train",
                *, layer: int | None = None, device: torch.device | str = "cpu", min_seconds: float = 0.0,
                progress: Callable[[int, int], None] | None = None) -> DumpResult:
    """Label every readable file of ``audio`` (directory or fairseq manifest) with ``teacher`` to layer
    ``kmeans.layer`` (or ``layer``, which must agree with it when the k-means records one) + nearest centroid,
    and write ``{split}.tsv``, ``{split}.km`` and ``dict.km.txt`` into ``out_dir``. ``kmeans=None``: the teacher
    bundle's own k-means (as ``kmeans check`` does).

    Unreadable files are skipped (not listed in the ``.tsv``) and reported in ``files_skipped``.
    ``progress(files_done, files_total)`` is called after each file.
    """
    if is_shard_source(audio):  # before Path(): a URL would lose its "//"
        raise FileProblem(audio, "is a shard set: label files follow a manifest's lines (fairseq's {split}.tsv names "
                          "audio files), which a shard set does not have",
                          "Train from the shards with online targets (`pretrain --train-data SHARDS --kmeans KM`), "
                          "or dump labels for the audio as a directory or manifest")
    audio, out_dir = Path(audio), Path(out_dir)
    if kmeans is None:
        if not teacher.has_kmeans:
            raise BundleError(teacher.path, "holds no k-means to label with",
                              hint="Pass --kmeans (a km.safetensors, or a fairseq .bin with --layer), or convert the "
                                   "teacher with --kmeans")
        kmeans = teacher.get_kmeans()
    if layer is not None:
        if kmeans.layer is not None and kmeans.layer != int(layer):
            raise ValueError(f"the k-means was fitted on layer {kmeans.layer}, not layer {layer}")
        kmeans = KMeansModel(kmeans.centroids, int(layer), dict(kmeans.metadata))
    if kmeans.layer is None:
        raise ValueError("the k-means model does not say which layer it clusters: give the layer")
    if not split or "/" in split or split.startswith("."):
        raise ValueError(f"split must be a plain name like 'train', got {split!r}")
    targets = OnlineTargets.from_bundle(teacher, kmeans).to(device)
    rate = teacher.sample_rate
    scan = scan_audio(audio, rate, min_seconds=min_seconds)
    if not scan.items:
        raise AudioError(audio, f"holds no usable audio ({scan.summary()})")
    out_dir.mkdir(parents=True, exist_ok=True)

    skipped = list(scan.skipped)
    counts = torch.zeros(kmeans.num_clusters, dtype=torch.long)
    entries: list[tuple[str, int, list[int]]] = []
    for done, item in enumerate(scan.items, start=1):
        labels = _label_file(targets, item, rate, device, skipped)
        if labels is not None:
            frames = item.file_frames if item.file_frames is not None else item.num_samples
            entries.append((item.name, frames, labels.tolist()))
            counts += torch.bincount(labels, minlength=kmeans.num_clusters)
        if progress:
            progress(done, len(scan.items))
    if not entries:
        raise AudioError(audio, "no file could be labelled", hint="; ".join(f"{p}: {r}" for p, r in skipped[:5]))

    paths = write_label_files(out_dir, split, manifest_root(scan), entries, counts.tolist())
    return DumpResult(paths["tsv"], paths["km"], paths["dict"], len(entries), int(counts.sum()), counts.tolist(),
                      skipped)


def _label_file(targets: OnlineTargets, item: AudioItem, rate: int, device, skipped: list) -> torch.Tensor | None:
    try:
        wav = read_audio(item.path, rate)
    except AudioError as error:
        skipped.append((item.path, f"unreadable: {error.problems[0]}"))
        logger.warning("%s; skipped", error)
        return None
    if len(wav) != item.num_samples:  # changed since the scan: the .tsv length would be wrong
        skipped.append((item.path, f"changed: {len(wav)} samples read, {item.num_samples} at scan time"))
        return None
    if targets.frames(len(wav)) == 0:
        skipped.append((item.path, f"too short: {len(wav)} samples make no feature frame"))
        return None
    return targets(wav[None].to(device))[0].cpu()
