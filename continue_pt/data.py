"""The training data for Lightning: ``AudioDataModule`` ties corpus scanning (``corpus``), fairseq label files
(``labels``) and reading, cropping and length-bucketed batching (``batching``) together, and splits off the
validation files."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from bundles.errors import FileProblem
from continue_pt.batching import AudioDataset, BatchCollater, BucketBatchSampler
from continue_pt.corpus import AudioItem, ScanResult, not_audio_note
from continue_pt.labels import FrameLabels, read_label_file
from continue_pt.shard_format import data_source, is_shard_source
from continue_pt.shard_read import scan_source

logger = logging.getLogger(__name__)


def validation_share(name: str) -> float:
    """A stable number in [0, 1) for a file name (sha1): files below ``val_fraction`` are held out."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2 ** 64


MIN_FILES_TO_HOLD_OUT = 10
"""With at least this many files, the held-out split is never empty (one file is held out when the fraction rounds
to none); below it every file trains."""


def _no_validation_hint(num_files: int, val_fraction: float) -> str:
    why = (f"{num_files} files are too few to hold out {val_fraction:.0%}" if val_fraction > 0
           else "no fraction of the training files is held out")
    return (f": no validation loss will be logged ({why}); pass --val-data with held-out audio (a directory or "
            "a manifest) to validate")


def held_out_files(names: Sequence[str], val_fraction: float) -> list[bool]:
    """Which files the validation split holds out: those whose :func:`validation_share` is below ``val_fraction``
    (stable when files are added). When that holds out none of a corpus of at least :data:`MIN_FILES_TO_HOLD_OUT`
    files (2 % of 33 files is usually none), the file with the smallest share is held out, so a small corpus still
    gets a validation loss."""
    shares = [validation_share(name) for name in names]
    held_out = [share < val_fraction for share in shares]
    if val_fraction > 0 and not any(held_out) and len(names) >= MIN_FILES_TO_HOLD_OUT:
        held_out[shares.index(min(shares))] = True
    return held_out


class AudioDataModule(pl.LightningDataModule):
    """Training (and validation) audio for Lightning, with optional fairseq frame labels.

    Args:
        train_source: a directory of audio files, a fairseq manifest (``.tsv``) or a shard set (a directory with
            ``shards.json`` or its ``http(s)://`` base URL; see ``shard_format``).
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
        if train_labels is not None and is_shard_source(train_source):
            raise FileProblem(train_labels, "offline frame labels are not read with a shard set (their lines follow "
                              "a manifest's order)", "Train from shards with online targets (leave out "
                              "--labels), or give the audio as a directory or manifest")
        self.train_source = data_source(train_source)  # URLs of shard sets stay strings
        self.val_source = data_source(val_source) if val_source is not None else None
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
        self.train_collater: BatchCollater | None = None
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
            held_out = held_out_files([item.name for item in train.items], self.val_fraction)
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
                  f"{len(val_items)} files ({self._hours(val_items)} h)"
                  + ("" if val_items else _no_validation_hint(len(train_items), self.val_fraction)),
                  logging.INFO if val_items else logging.WARNING)
        self.train_dataset = AudioDataset(train_items, self.sample_rate, self.normalize, train_labels)
        self.val_dataset = AudioDataset(val_items, self.sample_rate, self.normalize, val_labels)

    def _scan(self, source: str | Path) -> ScanResult:
        scan = scan_source(source, self.sample_rate, self.min_seconds)  # a shard set's index is its scan
        for path, reason in scan.skipped:  # every file, named; text beside the audio only at debug level
            self._log(f"skipped {path}: {reason}",
                      logging.DEBUG if reason.startswith("not audio:") else logging.WARNING)
        left_out = not_audio_note(scan.skipped)
        if left_out:
            self._log(f"{source}: {left_out}", logging.INFO)
        problems = [reason for _, reason in scan.skipped if not reason.startswith("not audio:")]
        self._log(f"{source}: {scan.summary()}", logging.WARNING if problems else logging.INFO)
        note = scan.resampling_note(self.sample_rate)
        if note:
            self._log(f"{source}: {note}", logging.WARNING)
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
        self.train_collater = collater
        self.train_dataset.crop_planner = collater.crop  # decode only the crop windows
        return _ResumableLoader(self, self.train_dataset, batch_sampler=self.train_sampler, collate_fn=collater,
                                num_workers=self.num_workers, pin_memory=torch.cuda.is_available())

    def micro_batch_plans(self, first: int, stop: int) -> list[dict[str, Any]]:
        """The shapes of this rank's training batches ``first..stop-1`` of the current epoch, known before they are
        loaded (from the scanned lengths, the label lengths and the crop each batch will get): see
        :meth:`BatchCollater.plan`. The module counts the masks of a whole optimizer step from them before its
        first backward (``loss_norm="per-term"`` with gradient accumulation)."""
        sampler, collater, dataset = self.train_sampler, getattr(self, "train_collater", None), self.train_dataset
        if sampler is None or collater is None or dataset is None:
            raise RuntimeError("micro_batch_plans needs the training loader (call train_dataloader() first)")
        labels = dataset.labels
        plans = []
        for batch in sampler.epoch_batches(sampler.epoch)[first:stop]:
            indices = [int(i) for i in batch]
            label_lengths = None
            if labels is not None:
                if isinstance(labels, FrameLabels):
                    label_lengths = [int(labels.offsets[i + 1] - labels.offsets[i]) for i in indices]
                else:
                    label_lengths = [len(labels[i]) for i in indices]
            plans.append(collater.plan(indices, [dataset.items[i].num_samples for i in indices], label_lengths))
        return plans

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
        self.val_dataset.crop_planner = collater.crop
        return DataLoader(self.val_dataset, batch_sampler=sampler, collate_fn=collater, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())

    # ----------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """The training sampler's position, counting the batches the training loop has consumed.

        The loader runs ahead of the training step (Lightning prefetches a batch; workers prefetch more), so the
        sampler's own count is too high mid-epoch; the fit loop's count of batches taken is used instead.
        """
        source = {"train_source": str(self.train_source)}  # what `continue-pt inspect CKPT` reports as its data
        if self.train_sampler is None:
            return {"train_sampler": self._pending_sampler_state, **source} if self._pending_sampler_state else source
        state = self.train_sampler.state_dict()
        consumed = self._consumed_batches()
        if consumed is not None:
            state["batches_done"] = consumed
        return {"train_sampler": state, **source}

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
