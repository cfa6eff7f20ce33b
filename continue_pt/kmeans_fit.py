"""Fit a HuBERT k-means on a teacher's layer-L features, streaming: features are never all held, never written.

fairseq's recipe (``examples/hubert/simple_kmeans``) dumps every frame's features to disk and fits scikit-learn's
``MiniBatchKMeans`` on a subset held in RAM. Here the teacher (:class:`continue_pt.teacher.Teacher`) runs over the
corpus twice and only a bounded sample is ever kept:

1. pass 1 runs the teacher over the corpus and keeps a uniform *reservoir* sample of at most ``reservoir_size``
   frames (Algorithm R); k-means++ (scikit-learn's greedy variant) seeds K centroids on it and a few Lloyd
   iterations refine them (empty clusters re-seeded at the worst-fitted frames);
2. pass 2 runs the teacher again and applies mini-batch k-means updates (scikit-learn's ``MiniBatchKMeans``
   rule: each centroid is the running mean of the frames assigned to it, learning rate 1/count), starting from
   the reservoir's counts so the refined start is not thrown away by the first batch.

Everything is plain torch and runs on ``device`` (the GPU when there is one); the memory held is the reservoir
(``reservoir_size x D``) plus one k-means mini-batch (``batch_seconds`` of frames) plus one file's features,
whatever the corpus size. The reported inertia is the mean squared distance of a frame to its nearest final
centroid, measured on the reservoir (a uniform sample of the frames seen).

The teacher runs on one file at a time, on the whole file (files longer than ``max_chunk_seconds`` in
pieces): HuBERT BASE's feature extractor group-normalises over the time axis, so zero-padding files into one
batch would change every frame's features.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from bundles.kmeans import KMeansModel, highest_matmul_precision
from bundles.loading import Bundle
from continue_pt.audio import AudioError
from continue_pt.corpus import AudioItem
from continue_pt.frames import conv_layers_of, conv_stride
from continue_pt.shard_format import data_source
from continue_pt.shard_read import read_item, scan_source
from continue_pt.teacher import Teacher

logger = logging.getLogger(__name__)

LLOYD_ITERATIONS = 10
MAX_CHUNK_SECONDS = 100.0  # fairseq's HubertFeatureReader.max_chunk: 1,600,000 samples at 16 kHz


def default_reservoir_size(k: int) -> int:
    """At least 10,000 frames and 20 per cluster (K=500: 10,000 frames; x 768 dims x 4 bytes = 31 MB)."""
    return max(20 * int(k), 10_000)


@dataclass
class FitResult:
    kmeans: KMeansModel
    inertia: float
    """Mean squared Euclidean distance of a frame to its nearest centroid (on the reservoir sample)."""
    hours_seen: float
    """Audio the streaming pass (pass 2) went through, in hours."""
    frames_seen: int
    files_skipped: list[tuple[Path, str]] = field(default_factory=list)
    """``(path, "category: detail")`` for every file set aside by the scan or failing to read."""
    reservoir_frames: int = 0
    """Frames in the reservoir (at most ``reservoir_size``)."""
    peak_buffer_frames: int = 0
    """Most frames held at once in the mini-batch buffer (bounded by the batch size plus one file chunk)."""


# ---------------------------------------------------------------------------------------------------------------
# k-means arithmetic (torch, any device)
# ---------------------------------------------------------------------------------------------------------------

def _sq_distances(x: Tensor, c: Tensor, c_sq: Tensor | None = None) -> Tensor:
    """``[n, K]`` squared Euclidean distances, float32, clamped at 0."""
    if c_sq is None:
        c_sq = (c * c).sum(1)
    d = torch.addmm(c_sq[None, :], x, c.T, beta=1.0, alpha=-2.0)
    d += (x * x).sum(1, keepdim=True)
    return d.clamp_(min=0.0)


def _assign(x: Tensor, c: Tensor, chunk: int = 16_384) -> tuple[Tensor, Tensor]:
    """(labels, squared distance to the nearest centroid) of each row of ``x``."""
    c_sq = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        d = _sq_distances(x[s:s + chunk], c, c_sq)
        dist[s:s + chunk], labels[s:s + chunk] = d.min(dim=1)
    return labels, dist


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """scikit-learn's greedy k-means++ seeding (2 + ln K candidate centres per step, keep the best)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"{n} frames are too few to seed {k} clusters")
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centers[0] = x[first]
    closest = ((x - x[first]) ** 2).sum(1)
    potential = closest.sum()
    for c in range(1, k):
        r = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential.double()
        candidates = torch.searchsorted(torch.cumsum(closest.double(), 0), r).clamp_(max=n - 1)
        d = (x_sq[None, :] + x_sq[candidates][:, None] - 2.0 * x[candidates] @ x.T).clamp_(min=0.0)
        d = torch.minimum(closest[None, :], d)
        potentials = d.sum(1)
        best = int(potentials.argmin())
        closest, potential = d[best], potentials[best]
        centers[c] = x[candidates[best]]
    return centers


def lloyd(x: Tensor, centers: Tensor, iterations: int = LLOYD_ITERATIONS) -> tuple[Tensor, Tensor]:
    """A few full k-means iterations on ``x`` (the reservoir): ``(centers, counts)``. An empty cluster is moved to
    the frame farthest from its centroid."""
    k = centers.shape[0]
    centers = centers.clone()
    counts = torch.zeros(k, dtype=torch.float64, device=x.device)
    for _ in range(iterations):
        labels, dist = _assign(x, centers)
        counts = torch.bincount(labels, minlength=k).double()
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = dist.topk(len(empty)).indices
            labels[far] = empty
            counts = torch.bincount(labels, minlength=k).double()
        sums = torch.zeros_like(centers, dtype=torch.float64).index_add_(0, labels, x.double())
        new = (sums / counts[:, None]).to(centers.dtype)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= 1e-10 * float((x * x).sum(1).mean()):
            break
    return centers, counts


def minibatch_update(centers: Tensor, counts: Tensor, batch: Tensor) -> None:
    """One ``MiniBatchKMeans`` step in place: every centroid becomes the running mean of all frames ever
    assigned to it (``c <- c + (sum_batch - n c) / (count + n)``, i.e. learning rate 1/count per frame)."""
    labels, _ = _assign(batch, centers)
    k = centers.shape[0]
    n = torch.bincount(labels, minlength=k).double()
    sums = torch.zeros(k, batch.shape[1], dtype=torch.float64, device=batch.device).index_add_(0, labels,
                                                                                              batch.double())
    new_counts = counts + n
    hit = n > 0
    updated = (centers.double() * counts[:, None] + sums) / new_counts.clamp(min=1)[:, None]
    centers[hit] = updated[hit].to(centers.dtype)
    counts.copy_(new_counts)


class Reservoir:
    """A uniform sample of at most ``capacity`` rows of a stream (Algorithm R, vectorised per batch)."""

    def __init__(self, capacity: int, dim: int, device: torch.device | str, generator: torch.Generator):
        self.capacity = int(capacity)
        self.rows = torch.empty(self.capacity, dim, dtype=torch.float32, device=device)
        self.filled = 0
        self.seen = 0
        self.generator = generator

    def add(self, batch: Tensor) -> None:
        batch = batch.to(self.rows.device, torch.float32)
        n = batch.shape[0]
        free = min(self.capacity - self.filled, n)
        if free > 0:
            self.rows[self.filled:self.filled + free] = batch[:free]
            self.filled += free
        rest = batch[free:]
        if len(rest):
            index = torch.arange(self.seen + free, self.seen + n, dtype=torch.float64)  # 0-based stream index
            slot = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * (index + 1)).long()
            keep = slot < self.capacity
            if bool(keep.any()):
                slots, rows = slot[keep], torch.nonzero(keep).flatten()
                # sequential semantics: when two rows of the batch draw the same slot, the later one wins
                winner = torch.full((self.capacity,), -1, dtype=torch.long).scatter_reduce_(0, slots, rows, "amax")
                taken = (winner >= 0).nonzero().flatten()
                self.rows[taken.to(self.rows.device)] = rest[winner[taken].to(rest.device)]
        self.seen += n

    @property
    def sample(self) -> Tensor:
        return self.rows[:self.filled]


def fit_stream(batches: Callable[[], Iterable[Tensor]], k: int, *, seed: int = 0, batch_frames: int = 3000,
               reservoir_size: int | None = None, device: torch.device | str = "cpu",
               on_pass: Callable[[int], None] | None = None) -> tuple[Tensor, float, dict[str, int]]:
    """The streaming fit on any re-iterable source of ``[n, D]`` feature blocks (called once per pass).

    Returns ``(centroids [K, D] float32 on CPU, inertia on the reservoir, stats)``.
    """
    if k < 2:
        raise ValueError(f"k must be at least 2, got {k}")
    capacity = reservoir_size or default_reservoir_size(k)
    if capacity < k:
        raise ValueError(f"reservoir_size {capacity} is smaller than k={k}")
    generator = torch.Generator().manual_seed(int(seed))
    device = torch.device(device)
    with highest_matmul_precision(), torch.no_grad():
        reservoir = None
        if on_pass:
            on_pass(1)
        for block in batches():
            if reservoir is None:
                reservoir = Reservoir(capacity, block.shape[1], device, generator)
            reservoir.add(block)
        if reservoir is None or reservoir.filled < k:
            raise ValueError(f"{0 if reservoir is None else reservoir.filled} frames are too few for k={k} clusters")
        sample = reservoir.sample
        centers, counts = lloyd(sample, kmeans_plus_plus(sample, k, generator))

        if on_pass:
            on_pass(2)
        buffer, held, peak, frames = [], 0, 0, 0
        for block in batches():
            buffer.append(block.to(device, torch.float32))
            held += block.shape[0]
            peak = max(peak, held)
            if held >= batch_frames:
                batch = torch.cat(buffer)
                minibatch_update(centers, counts, batch)
                frames += batch.shape[0]
                buffer, held = [], 0
        if buffer:
            batch = torch.cat(buffer)
            minibatch_update(centers, counts, batch)
            frames += batch.shape[0]
        _, dist = _assign(sample, centers)
        inertia = float(dist.double().mean())
    stats = {"reservoir_frames": reservoir.filled, "peak_buffer_frames": peak, "frames_seen": frames,
             "frames_pass1": reservoir.seen}
    return centers.cpu(), inertia, stats


@torch.no_grad()
def inertia_of(kmeans: KMeansModel, features: Tensor) -> float:
    """Mean squared Euclidean distance of each row of ``features`` ``[n, D]`` to its nearest centroid."""
    x = features.reshape(-1, kmeans.dim).to(torch.float32)
    with highest_matmul_precision():
        _, dist = _assign(x, kmeans.centroids.to(x.device))
    return float(dist.double().mean())


# ---------------------------------------------------------------------------------------------------------------
# the teacher over a corpus
# ---------------------------------------------------------------------------------------------------------------

class _CorpusFeatures:
    """Re-iterable: the teacher's features file by file (long files in chunks), within ``max_hours``."""

    def __init__(self, items: list[AudioItem], teacher: Teacher, sample_rate: int,
                 device: torch.device, max_hours: float | None, max_chunk_seconds: float,
                 progress: Callable[[str, float, float], None] | None):
        self.items, self.teacher = items, teacher
        self.sample_rate, self.device = sample_rate, device
        self.max_samples = None if max_hours is None else int(max_hours * 3600 * sample_rate)
        self.chunk = max(int(max_chunk_seconds * sample_rate), 400)
        self.progress = progress
        self.failed: dict[Path, str] = {}
        self.samples_seen = 0
        self.phase = "pass 1"
        total = sum(i.num_samples for i in items)
        self.total_seconds = (total if self.max_samples is None else min(total, self.max_samples)) / sample_rate

    def __call__(self) -> Iterator[Tensor]:
        self.samples_seen = 0
        for item in self.items:
            if self.max_samples is not None and self.samples_seen >= self.max_samples:
                break
            if item.path in self.failed:
                continue
            try:
                wav = read_item(item, self.sample_rate)
            except AudioError as error:
                self.failed[item.path] = f"unreadable: {error.problems[0]}"
                logger.warning("%s; skipped", error)
                continue
            if self.teacher.frames(len(wav)) == 0:
                self.failed[item.path] = f"too short: {len(wav)} samples make no feature frame"
                continue
            for start in range(0, len(wav), self.chunk):
                piece = wav[start:start + self.chunk]
                if self.teacher.frames(len(piece)) == 0:
                    break
                yield self.teacher.features(piece.to(self.device)).float()
            self.samples_seen += len(wav)
            if self.progress:
                self.progress(self.phase, self.samples_seen / self.sample_rate, self.total_seconds)


def fit_kmeans(teacher: Bundle, layer: int, audio: str | Path, k: int, *, max_hours: float | None = None,
               seed: int = 0, batch_seconds: float = 60.0, device: torch.device | str = "cpu",
               reservoir_size: int | None = None, min_seconds: float = 0.0,
               max_chunk_seconds: float = MAX_CHUNK_SECONDS,
               progress: Callable[[str, float, float], None] | None = None) -> FitResult:
    """Fit ``k`` centroids on ``teacher``'s layer ``layer`` (1-based) output over the audio of ``audio``.

    ``audio`` is a directory, a fairseq manifest or a shard set (see :func:`continue_pt.shard_read.scan_source`);
    unusable files are skipped and listed in ``files_skipped``. ``max_hours`` bounds the audio used (the first files in scan order);
    ``batch_seconds`` of frames make one mini-batch update (60 s = 3,000 frames at 50 Hz); ``reservoir_size``
    frames (default ``max(20 K, 10,000)``) are sampled for seeding. ``progress(phase, seconds_done,
    seconds_total)`` is called after each file. Save the result with :func:`bundles.kmeans.save_kmeans`.
    """
    audio = data_source(audio)  # a shard set's URL stays a string
    device = torch.device(device)
    frozen = Teacher.from_bundle(teacher, layer).to(device)
    rate = teacher.sample_rate
    scan = scan_source(audio, rate, min_seconds=min_seconds)
    if not scan.items:
        raise AudioError(audio, f"holds no usable audio ({scan.summary()})")
    frame_rate = rate / conv_stride(conv_layers_of(frozen.teacher))
    corpus = _CorpusFeatures(scan.items, frozen, rate, device, max_hours, max_chunk_seconds, progress)

    def on_pass(number: int) -> None:
        corpus.phase = f"pass {number}"

    centroids, inertia, stats = fit_stream(corpus, k, seed=seed, batch_frames=max(1, int(batch_seconds * frame_rate)),
                                           reservoir_size=reservoir_size, device=device, on_pass=on_pass)
    hours = corpus.samples_seen / rate / 3600
    prov = teacher.config.provenance or {}
    metadata = {
        "fitted_by": "continue-pt kmeans fit (streaming mini-batch k-means, k-means++ on a reservoir)",
        # the bundle whose features were clustered, as the user named it (a continued bundle is not its source file)
        "teacher_bundle": str(teacher.path),
        "teacher_num_updates": str(teacher.num_updates),
        "teacher_source_file": str(prov.get("source_file", "")),
        "teacher_sha256": str(prov.get("sha256", "")),
        "n_clusters": str(int(k)),
        "inertia": repr(inertia),
        "hours_seen": f"{hours:.6f}",
        "frames_seen": str(stats["frames_seen"]),
        "seed": str(int(seed)),
        "audio": str(audio),
    }
    kmeans = KMeansModel(centroids, int(layer), metadata)
    skipped = list(scan.skipped) + list(corpus.failed.items())
    return FitResult(kmeans, inertia, hours, stats["frames_seen"], skipped, stats["reservoir_frames"],
                     stats["peak_buffer_frames"])
