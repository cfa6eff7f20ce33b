"""``run_pretraining``: continue pre-training a HuBERT, wav2vec 2.0 or data2vec 2.0 bundle on your audio, then export
the result as a bundle. The objective follows the bundle's family (``continue_pt.families``): HuBERT's masked
prediction of k-means targets (:class:`~continue_pt.hubert.module.HubertContinuedPretraining`), wav2vec 2.0's
contrastive task (:class:`~continue_pt.wav2vec2.module.Wav2Vec2ContinuedPretraining`) or data2vec 2.0's regression
of its EMA teacher's layers (:class:`~continue_pt.data2vec2.module.Data2Vec2ContinuedPretraining`).

``init_from`` (a bundle: weights only, fresh optimiser) and ``resume`` (a training checkpoint: full state) are
mutually exclusive, as in litgpt. Every problem with the options is reported at once, before anything starts.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from bundles.atomic import atomic_write, disk_full
from bundles.errors import BundleError
from bundles.loading import load_bundle
from continue_pt.checkpoint_io import AtomicCheckpointIO
from continue_pt.data import AudioDataModule
from continue_pt.export import export_checkpoint, read_training_checkpoint
from continue_pt.families import FAMILIES
from continue_pt.interruption import RunInterrupted, StopOnSignal
from continue_pt.labels import DEFAULT_LABEL_RATE, bundle_label_rate
from continue_pt.module_base import CHECKPOINT_KEY, ContinuedPretrainingBase
from continue_pt.options import PretrainOptions
from continue_pt.out_of_memory import is_out_of_memory, out_of_memory_error
from continue_pt.progress import StepProgressBar
from continue_pt.resume_notes import RunSegments, checkpoint_step, earlier_segments, resume_notes
from continue_pt.run_log import FirstAndLastStepLogged, ResumableCSVLogger
from continue_pt.run_output import removed_on_early_failure
from continue_pt.sharding import checkpoint_layers, replace_directory, sharded_strategy
from continue_pt.step_guard import TrainingStopped
from continue_pt.trainer_choice import choose_strategy
from continue_pt.trainer_config import built_trainer

MODULES: dict[str, type[ContinuedPretrainingBase]] = {name: f.module_class() for name, f in FAMILIES.items()}
"""The LightningModule that continues each bundle family (from the one table, ``continue_pt.families``)."""

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    output_dir: Path
    bundle_dir: Path
    checkpoint_dir: Path
    metrics_csv: Path
    is_global_zero: bool = True
    """False in the other DDP processes: only rank 0 reports."""


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
    if final.is_dir():  # a sharded checkpoint (--strategy fsdp)
        replace_directory(final, last)
        return
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


def _resume_command(options: PretrainOptions, checkpoint: Path) -> str:
    """The command that continues this run from ``checkpoint``: ``--resume`` with the run's other options, which
    are written (the ones that differ from the defaults) to ``OUTPUT/resume.yaml``, since not every option has a
    flag."""
    import yaml

    defaults = PretrainOptions(train_data="", output_dir="")
    values = {f.name: str(v) if isinstance(v, Path) else v for f in fields(PretrainOptions)
              if f.name not in ("init_from", "resume") and (v := getattr(options, f.name)) != getattr(defaults, f.name)}
    config = Path(options.output_dir) / "resume.yaml"
    text = ("# written when the run stopped early: its options (those not at their defaults), for --resume\n"
            + yaml.safe_dump(values, sort_keys=False))
    atomic_write(config, lambda tmp: tmp.write_text(text, encoding="utf-8"), needed=len(text.encode("utf-8")))
    return " ".join(["continue-pt", "pretrain", "--resume", shlex.quote(str(checkpoint)),
                     "--config", shlex.quote(str(config))])


class _DropLitloggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _drop_litlogger_tip() -> None:
    """Lightning advertises its cloud logger at every Trainer start; a user cannot act on it (once per process)."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitloggerTip) for f in tips.filters):
        tips.addFilter(_DropLitloggerTip())


def _lifecycle(options: PretrainOptions, out: Path, checkpoint_dir: Path
               ) -> tuple[StopOnSignal, list[pl.Callback], ResumableCSVLogger]:
    """The run's lifecycle around the Trainer: a stop at a step boundary on SIGINT/SIGTERM, the log interval, the
    data segments for the provenance, the step progress bar, a metrics.csv that survives resumes; a resume says
    what it will do."""
    resumed = read_training_checkpoint(options.resume) if options.resume is not None else None
    start_step = checkpoint_step(resumed) if resumed is not None else 0
    if resumed is not None:
        for note in resume_notes(options.resume, resumed, options.max_steps, str(options.train_data)):
            rank_zero_info(note)
    stop = StopOnSignal(checkpoint_dir)
    callbacks: list[pl.Callback] = [
        stop, FirstAndLastStepLogged(options.resolved_log_every()),
        RunSegments(str(options.train_data), earlier_segments(resumed) if resumed else [], start_step)]
    if options.progress_bar:
        callbacks.append(StepProgressBar())
    # metrics.csv keeps the steps before the resumed checkpoint: curves.png shows the whole run
    earlier_metrics = Path(options.resume).parent.parent / "metrics.csv" if options.resume is not None else None
    csv_logger = ResumableCSVLogger(out, resume_step=start_step if options.resume is not None else None,
                                    earlier=earlier_metrics)
    _drop_litlogger_tip()
    return stop, callbacks, csv_logger


def _strategy_and_precision(options: PretrainOptions, module: ContinuedPretrainingBase) -> tuple[object, str | None]:
    """Lightning's strategy and precision flag: ``--strategy fsdp`` is continue-pt's per-layer FSDP, which carries
    its own precision plugin and checkpoints its layers itself; otherwise the DDP choice of ``choose_strategy``,
    with each transformer layer wrapped here under ``--activation-checkpointing``."""
    sharded = sharded_strategy(options.strategy, options.resolved_precision(), options.activation_checkpointing)
    if sharded is not None:
        return sharded, None
    if options.activation_checkpointing:
        rank_zero_info(f"activation checkpointing: {checkpoint_layers(module)} transformer layers recompute their "
                       "activations in the backward")
    return choose_strategy(options.strategy, options.accelerator, options.devices, module,
                           options.freeze_feature_extractor_steps, num_nodes=options.num_nodes), \
        options.resolved_precision()


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
        # only offline label files are read at a label rate (wav2vec 2.0 and online targets have none to ask for)
        label_rate=bundle_label_rate(module.bundle_config.objective) if options.labels else DEFAULT_LABEL_RATE,
        num_workers=options.resolved_num_workers(), seed=options.seed)
    checkpoint_dir = out / "checkpoints"
    checkpointing = ModelCheckpoint(dirpath=checkpoint_dir, filename="step-{step}", save_last=True,
                                    every_n_train_steps=options.checkpoint_every, save_top_k=-1)
    stop, lifecycle, csv_logger = _lifecycle(options, out, checkpoint_dir)
    strategy, precision = _strategy_and_precision(options, module)
    trainer = built_trainer(
        options.output_dir,
        accelerator=options.accelerator, devices=options.devices, num_nodes=options.num_nodes, strategy=strategy,
        precision=precision, max_steps=options.max_steps,
        accumulate_grad_batches=options.accumulate, gradient_clip_val=options.gradient_clip_val,
        use_distributed_sampler=False, logger=csv_logger, callbacks=[checkpointing, *lifecycle, *(callbacks or [])],
        log_every_n_steps=options.resolved_log_every(), val_check_interval=options.val_check_interval,
        check_val_every_n_epoch=None if options.val_check_interval else 1, num_sanity_val_steps=0,
        deterministic=options.resolved_deterministic(), enable_progress_bar=options.progress_bar,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],  # checkpoints written atomically; a full disk is a DiskFull error
        default_root_dir=out)
    csv_logger.trainer = trainer
    with warnings.catch_warnings():
        # the frozen teacher is in eval mode on purpose; Lightning would warn about it at every start
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        # no held-out files (a small corpus, 2 % held out): the data module already says "validating on 0 files"
        warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero.*")
        # the modules move batches themselves (lengths stay on the CPU, continue_pt.device_batch), on purpose
        warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`.*")
        # Lightning's own code calls a deprecated torch API; nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        # the first and last steps are always logged (FirstAndLastStepLogged), whatever the interval
        warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging "
                                                  r"interval.*")
        if options.resume is not None:  # resuming into the same checkpoints/ is the point; nothing is overwritten
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty.*")
            # resuming into another --output-dir: its checkpoints/ is new on purpose (the earlier metrics are copied)
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from .*")
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=options.resume)
        except RuntimeError as error:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(error):
                raise
            last = checkpoint_dir / "last.ckpt"
            command = _resume_command(options, last) if last.exists() and trainer.is_global_zero else None
            raise out_of_memory_error(error, out, trainer.global_step, options.max_batch_seconds, options.accumulate,
                                      activation_checkpointing=options.activation_checkpointing,
                                      precision=str(precision), resume_command=command) from error
    if stop.saved is not None:
        if trainer.is_global_zero:
            _point_last_at(stop.saved)
        trainer.strategy.barrier("last_ckpt_in_place")  # no rank may go on (e.g. resume) while last.ckpt is swapped
        command = _resume_command(options, checkpoint_dir / "last.ckpt") if trainer.is_global_zero else ""
        raise RunInterrupted(stop.signum, stop.step, checkpoint_dir / "last.ckpt", command, trainer.is_global_zero)
    final = checkpoint_dir / "final.ckpt"
    # weights_only here means "leave out the optimiser and loop state"; the final checkpoint keeps them so it resumes.
    trainer.save_checkpoint(final, weights_only=False)  # allowed: a save flag, not an unsafe load
    if trainer.is_global_zero:
        _point_last_at(final)
    trainer.strategy.barrier("last_ckpt_in_place")  # a sharded last.ckpt is swapped in by two renames, not one
    if module.stop_reason is not None:  # no bundle: the user resumes from last.ckpt with other settings
        command = (_resume_command(options, checkpoint_dir / "last.ckpt") if trainer.is_global_zero
                   else f"continue-pt pretrain --resume {checkpoint_dir / 'last.ckpt'} ...")
        raise TrainingStopped(checkpoint_dir / "last.ckpt", module.stop_reason,
                              hint=f"Resume, after changing what the message suggests (in OUTPUT/resume.yaml or as "
                                   f"flags): {command}")
    bundle_dir = out / "bundle"
    if trainer.is_global_zero:
        export_checkpoint(final, bundle_dir, overwrite=options.overwrite or options.resume is not None,
                          train_data=str(options.train_data))
    return RunResult(out, bundle_dir, checkpoint_dir, out / "metrics.csv", trainer.is_global_zero)
