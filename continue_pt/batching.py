"""Read, crop and batch utterances as fairseq's HuBERT dataset does, with a resumable length-bucketed sampler.

``AudioDataset`` reads (resamples, optionally normalises) one file; ``collate_audio`` crops a batch to its
shortest utterance like fairseq's ``HubertDataset.collater`` (``pad_audio=False, random_crop=True``), labels
included; ``BucketBatchSampler`` groups utterances of similar length under an audio budget per batch and can
resume in the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset, Sampler

from continue_pt.audio import AudioError
from continue_pt.shard_read import read_item, read_item_window

logger = logging.getLogger(__name__)


from continue_pt.corpus import AudioItem


class AudioDataset(Dataset):
    """``dataset[i]`` = ``{"index": i, "waveform": 1-D float32, "labels": int64 frames or None}``, or None.

    The file is read at ``sample_rate`` (resampled if needed) and, when ``normalize``, normalised over the whole
    utterance before any cropping (fairseq: ``F.layer_norm(wav, wav.shape)``). A file that cannot be read any
    more (deleted or corrupted after the scan) gives None: one warning line names it, ``failures`` counts it (in
    shared memory, so reads in data-loader workers count too) and the collater drops it.

    With a ``crop_planner`` (the loaders set :meth:`BatchCollater.crop`), a batch fetched whole (``__getitems__``,
    which the DataLoader calls with each batch of the batch sampler) decodes only each utterance's crop window,
    the crop the collater would otherwise cut from the whole file (same seed, epoch and indices), and marks it
    with ``crop_start``. Normalised data need the whole utterance's mean and variance: a file is read whole the
    first time, its statistics kept (float64), and every window is normalised with them as
    ``(x - mean) / sqrt(var + 1e-5)`` (``F.layer_norm``'s formula; equal to it within float32 rounding), whether
    the file was read whole or not, so a resumed run gets the same samples.
    """

    crop_planner: Callable[[Sequence[int], Sequence[int]], tuple[int, list[int]]] | None = None

    def __init__(self, items: Sequence[AudioItem], sample_rate: int, normalize: bool,
                 labels: Sequence[Tensor] | None = None):
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"{len(labels)} label sequences for {len(items)} audio items")
        self.items = list(items)
        self.sample_rate = sample_rate
        self.normalize = normalize
        self.labels = labels
        self._failures = torch.zeros(1, dtype=torch.int64).share_memory_()
        # per file: whole-utterance mean and variance (float64) once known, for normalising crop windows; in shared
        # memory, so what one data-loader worker learns the others use
        self._norm_stats = torch.zeros(max(1, len(self.items)), 2, dtype=torch.float64).share_memory_()
        self._norm_known = torch.zeros(max(1, len(self.items)), dtype=torch.bool).share_memory_()

    @property
    def failures(self) -> int:
        return int(self._failures.item())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            waveform = read_item(item, self.sample_rate)
        except AudioError as error:
            self._failures += 1
            logger.warning("%s; left out of its batch (%d read failures so far)", error, self.failures)
            return None
        if self.normalize:
            with torch.no_grad():
                waveform = F.layer_norm(waveform, waveform.shape)
        labels = self.labels[index] if self.labels is not None else None
        return {"index": index, "waveform": waveform, "labels": labels}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any] | None]:
        """A whole batch: only the crop windows are decoded when a ``crop_planner`` is set (see the class)."""
        if self.crop_planner is None or not indices:
            return [self[i] for i in indices]
        audio_size, starts = self.crop_planner(indices, [self.items[i].num_samples for i in indices])
        return [self._window(i, start, audio_size) for i, start in zip(indices, starts)]

    def _window(self, index: int, start: int, size: int) -> dict[str, Any] | None:
        item = self.items[index]
        try:
            if self.normalize and not bool(self._norm_known[index]):
                whole = read_item(item, self.sample_rate)  # once: the statistics need every sample
                self._norm_stats[index] = torch.stack([whole.double().mean(), whole.double().var(correction=0)])
                self._norm_known[index] = True
                waveform = whole[start:start + size]  # = read_audio_window(...), bit for bit
                if len(waveform) != size:
                    raise AudioError(item.path, f"holds {len(whole)} samples, fewer than the window {start}.."
                                                f"{start + size} it was scanned for", "Restart the run to rescan it")
            else:
                waveform = read_item_window(item, self.sample_rate, start, size)
        except AudioError as error:
            self._failures += 1
            logger.warning("%s; left out of its batch (%d read failures so far)", error, self.failures)
            return None
        if self.normalize:
            mean, var = self._norm_stats[index]
            waveform = ((waveform.double() - mean) / torch.sqrt(var + 1e-5)).float()
        labels = self.labels[index] if self.labels is not None else None
        return {"index": index, "waveform": waveform, "labels": labels, "crop_start": start}


def crop_window(lengths: Sequence[int], max_sample_size: int, rng: np.random.Generator) -> tuple[int, list[int]]:
    """The crop :func:`collate_audio` takes of utterances of ``lengths`` samples: ``(audio_size, starts)``, the
    common length (the shortest, at most ``max_sample_size``) and each utterance's random offset."""
    audio_size = min(min(int(n) for n in lengths), max_sample_size)
    starts = []
    for length in lengths:
        diff = int(length) - audio_size
        starts.append(int(rng.integers(0, diff + 1)) if diff > 0 else 0)
    return audio_size, starts


def label_window(starts: Sequence[int], audio_size: int, label_lengths: Sequence[int], label_rate: float,
                 sample_rate: int) -> tuple[list[int], int]:
    """The label frames that go with a crop: ``(frame_starts, frame_size)`` (see :func:`collate_audio`)."""
    samples_to_frames = label_rate / sample_rate
    frame_starts = [int(round(s * samples_to_frames)) for s in starts]
    frame_size = int(round(audio_size * samples_to_frames))
    frame_size = max(0, min(frame_size, *(int(n) - s for n, s in zip(label_lengths, frame_starts))))
    return frame_starts, frame_size


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
    if all("crop_start" in s for s in samples):  # read as crop windows already (AudioDataset.__getitems__)
        audio_size, starts = min(len(w) for w in waveforms), [int(s["crop_start"]) for s in samples]
        batch_waveforms = torch.stack([w[:audio_size] for w in waveforms])
    else:
        audio_size, starts = crop_window([len(w) for w in waveforms], max_sample_size, rng)
        batch_waveforms = torch.stack([w[s:s + audio_size] for w, s in zip(waveforms, starts)])

    labels = [s["labels"] for s in samples]
    if all(t is None for t in labels):
        batch_labels = None
    elif any(t is None for t in labels):
        raise ValueError("some samples of the batch have labels and some do not")
    else:
        frame_starts, frame_size = label_window(starts, audio_size, [len(t) for t in labels], label_rate,
                                                sample_rate)
        batch_labels = torch.stack([t[s:s + frame_size].long() for t, s in zip(labels, frame_starts)])

    return {
        "waveforms": batch_waveforms,
        "lengths": torch.full((len(samples),), audio_size, dtype=torch.long),
        "labels": batch_labels,
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "starts": torch.tensor(starts, dtype=torch.long),
    }


def empty_batch() -> dict[str, Tensor | None]:
    """A batch of no utterance (every file of it failed to load): the modules add nothing for it to the step, but
    take part in the step's collectives (``continue_pt.empty_batch``)."""
    none = torch.zeros(0, dtype=torch.long)
    return {"waveforms": torch.zeros(0, 0), "lengths": none, "labels": None, "indices": none, "starts": none.clone()}


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

    def _rng(self, indices: Sequence[int]) -> np.random.Generator:
        epoch = self.sampler.epoch if self.sampler is not None else 0
        return np.random.default_rng([self.seed, epoch, *(int(i) for i in indices)])

    def __call__(self, samples: Sequence[dict[str, Any] | None]) -> dict[str, Tensor | None]:
        """The cropped batch; :func:`empty_batch` when every file failed to load (Lightning would skip a None
        batch on this rank only, and the other ranks would wait for it forever)."""
        indices = [s["index"] for s in samples if s is not None]
        batch = collate_audio(samples, self.max_sample_size, self.label_rate, self.sample_rate, self._rng(indices))
        return batch if batch is not None else empty_batch()

    def crop(self, indices: Sequence[int], lengths: Sequence[int]) -> tuple[int, list[int]]:
        """The crop ``__call__`` takes of the batch ``indices`` (utterances of ``lengths`` samples), known before
        any audio is read: ``(audio_size, starts)`` (see :func:`crop_window`)."""
        return crop_window(lengths, self.max_sample_size, self._rng(indices))

    def plan(self, indices: Sequence[int], lengths: Sequence[int],
             label_lengths: Sequence[int] | None = None) -> dict[str, Any]:
        """The shape of the batch ``__call__`` will make of ``indices`` (utterances of ``lengths`` samples and
        ``label_lengths`` label frames), without reading any audio: ``{"indices": [B] long tensor, "batch_size":
        B, "num_samples": crop length, "label_frames": label frames or None}``. Exact when every file loads with
        its scanned length; the same random crop as ``__call__`` (same seed, epoch and indices)."""
        audio_size, starts = crop_window(lengths, self.max_sample_size, self._rng(indices))
        label_frames = None
        if label_lengths is not None:
            label_frames = label_window(starts, audio_size, label_lengths, self.label_rate, self.sample_rate)[1]
        return {"indices": torch.as_tensor([int(i) for i in indices], dtype=torch.long),
                "batch_size": len(indices), "num_samples": int(audio_size), "label_frames": label_frames}



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
        self._cached_batches: tuple[tuple[int, int], list[np.ndarray]] | None = None

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
        """This rank's batches of ``epoch``, in order (the last epoch's list is kept)."""
        cached = self._cached_batches
        if cached is not None and cached[0] == (epoch, self.seed):
            return cached[1]
        batches = self._epoch_batches(epoch)
        self._cached_batches = ((epoch, self.seed), batches)
        return batches

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
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
                "num_batches": len(self), "fingerprint": self.fingerprint, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration starts at batch ``batches_done`` of ``epoch``."""
        replicas = state.get("num_replicas", self.num_replicas)  # checkpoints before it was recorded: unknown
        if replicas != self.num_replicas:
            logger.warning("the checkpoint was written by a run of %d processes (devices x nodes), this one has %d: "
                           "it continues, but not exactly: the position in epoch %d (%d batches) was counted per "
                           "process, so part of that epoch is trained on again or skipped; resume with the same "
                           "number of processes for an exact continuation",
                           replicas, self.num_replicas, state["epoch"], state["batches_done"])
        elif state.get("fingerprint") != self.fingerprint:
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
