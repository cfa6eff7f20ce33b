"""``run_pretraining``: continue pre-training a HuBERT or wav2vec 2.0 bundle on your audio, then export the result as
a bundle. The objective follows the bundle's family: HuBERT's masked prediction of k-means targets
(:class:`~continue_pt.lightning_module.HubertContinuedPretraining`) or wav2vec 2.0's contrastive task
(:class:`~continue_pt.wav2vec2_module.Wav2Vec2ContinuedPretraining`).

``init_from`` (a bundle: weights only, fresh optimiser) and ``resume`` (a training checkpoint: full state) are
mutually exclusive, as in litgpt. Every problem with the options is reported at once, before anything starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from bundles.atomic import disk_full
from bundles.errors import BundleError
from bundles.loading import load_bundle
from continue_pt.checkpoint_io import AtomicCheckpointIO
from continue_pt.data import AudioDataModule
from continue_pt.export import export_checkpoint, read_training_checkpoint
from continue_pt.labels import bundle_label_rate
from continue_pt.lightning_module import HubertContinuedPretraining
from continue_pt.module_base import CHECKPOINT_KEY, ContinuedPretrainingBase
from continue_pt.options import PretrainOptions, PretrainOptionsError  # noqa: F401  (re-exported)
from continue_pt.run_output import removed_on_early_failure
from continue_pt.step_guard import TrainingStopped
from continue_pt.trainer_choice import choose_strategy
from continue_pt.trainer_config import built_trainer
from continue_pt.wav2vec2_module import Wav2Vec2ContinuedPretraining

MODULES: dict[str, type[ContinuedPretrainingBase]] = {
    "hubert": HubertContinuedPretraining,
    "wav2vec2": Wav2Vec2ContinuedPretraining,
}
"""The LightningModule that continues each bundle family."""

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    bundle_dir: Path
    checkpoint_dir: Path
    metrics_csv: Path


def build_module(options: PretrainOptions) -> ContinuedPretrainingBase:
    """The module for the bundle's family (``init_from``), or the one a checkpoint was written by (``resume``)."""
    if options.resume is not None:
        checkpoint = read_training_checkpoint(options.resume)
        hparams = checkpoint.get("hyper_parameters", {}).get("options")
        if not isinstance(hparams, dict):
            raise BundleError(options.resume, "has no module options", hint="Was it written by continue-pt?")
        family = checkpoint[CHECKPOINT_KEY].get("family", "hubert")  # older checkpoints: HuBERT only
        if family not in MODULES:
            raise BundleError(options.resume, f"was written for a {family!r} model, which this version cannot train")
        return MODULES[family](hparams)
    return MODULES[load_bundle(options.init_from).family](options.module_options())


def _point_last_at(final: Path) -> None:
    """Make ``checkpoints/last.ckpt`` the final state too (ModelCheckpoint only refreshes it every N steps), so
    ``--resume checkpoints/last.ckpt`` always continues from where the run ended."""
    last = final.with_name("last.ckpt")
    tmp = final.with_name(".last.ckpt.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(final, tmp)
        except OSError:
            shutil.copyfile(final, tmp)
        os.replace(tmp, last)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        full = disk_full(last, exc, lambda: final.stat().st_size)
        if full is not None:
            raise full from exc
        raise


def run_pretraining(options: PretrainOptions, callbacks: list[pl.Callback] | None = None) -> RunResult:
    """Validate, train, export ``output_dir/bundle``. ``callbacks`` are added to the Trainer's.

    A run that fails before its first checkpoint leaves nothing of what it created in ``output_dir``."""
    options.validate()
    with removed_on_early_failure(Path(options.output_dir)):
        return _train_and_export(options, callbacks)


def _train_and_export(options: PretrainOptions, callbacks: list[pl.Callback] | None) -> RunResult:
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(options.seed, workers=True, verbose=False)
    module = build_module(options)
    module.bad_steps.max_bad_steps = options.max_bad_steps
    datamodule = AudioDataModule(
        options.train_data, options.val_data, sample_rate=module.sample_rate,
        normalize=module.data_normalizes, max_batch_seconds=options.max_batch_seconds,
        max_sample_size=options.max_sample_size, min_seconds=options.min_seconds, val_fraction=options.val_fraction,
        train_labels=options.labels, val_labels=options.val_labels, label_dict=options.label_dict,
        label_rate=bundle_label_rate(module.bundle_config.objective),
        num_workers=options.num_workers, seed=options.seed)
    checkpoint_dir = out / "checkpoints"
    checkpointing = ModelCheckpoint(dirpath=checkpoint_dir, filename="step-{step}", save_last=True,
                                    every_n_train_steps=options.checkpoint_every, save_top_k=-1)
    csv_logger = CSVLogger(out, name="", version="")
    trainer = built_trainer(
        options.output_dir,
        accelerator=options.accelerator, devices=options.devices,
        strategy=choose_strategy(options.strategy, options.accelerator, options.devices, module,
                                 options.freeze_feature_extractor_steps),
        precision=options.resolved_precision(), max_steps=options.max_steps,
        accumulate_grad_batches=options.accumulate, gradient_clip_val=options.gradient_clip_val,
        use_distributed_sampler=False, logger=csv_logger, callbacks=[checkpointing, *(callbacks or [])],
        log_every_n_steps=options.log_every, val_check_interval=options.val_check_interval,
        check_val_every_n_epoch=None if options.val_check_interval else 1, num_sanity_val_steps=0,
        deterministic=options.resolved_deterministic(), enable_progress_bar=options.progress_bar,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],  # checkpoints written atomically; a full disk is a DiskFull error
        default_root_dir=out)
    with warnings.catch_warnings():
        # the frozen teacher is in eval mode on purpose; Lightning would warn about it at every start
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        # no held-out files (a small corpus, 2 % held out): the data module already says "validating on 0 files"
        warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero.*")
        # the modules move batches themselves (lengths stay on the CPU, continue_pt.device_batch), on purpose
        warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=options.resume)
    final = checkpoint_dir / "final.ckpt"
    # weights_only here means "leave out the optimiser and loop state"; the final checkpoint keeps them so it resumes.
    trainer.save_checkpoint(final, weights_only=False)  # allowed: a save flag, not an unsafe load
    if trainer.is_global_zero:
        _point_last_at(final)
    if module.stop_reason is not None:  # no bundle: the user resumes from last.ckpt with other settings
        raise TrainingStopped(checkpoint_dir / "last.ckpt", module.stop_reason,
                              hint=f"Resume: continue-pt pretrain --resume {checkpoint_dir / 'last.ckpt'} ...")
    bundle_dir = out / "bundle"
    if trainer.is_global_zero:
        export_checkpoint(final, bundle_dir, overwrite=options.overwrite or options.resume is not None,
                          train_data=str(options.train_data))
    return RunResult(out, bundle_dir, checkpoint_dir, out / "metrics.csv")
