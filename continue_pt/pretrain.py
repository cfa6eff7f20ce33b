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
import shlex
import shutil
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from bundles.errors import BundleError, FileProblem
from bundles.kmeans import load_kmeans
from bundles.loading import load_bundle
from continue_pt.data import AudioDataModule
from continue_pt.export import export_checkpoint, read_training_checkpoint, training_teacher
from continue_pt.hubert_objective import LOSS_MODES
from continue_pt.interruption import RunInterrupted, StopOnSignal
from continue_pt.lightning_module import HubertContinuedPretraining
from continue_pt.masking import HubertMasking
from continue_pt.module_base import CHECKPOINT_KEY, DEFAULT_PEAK_LR, ContinuedPretrainingBase, ModuleOptions
from continue_pt.progress import StepProgressBar
from continue_pt.resume_notes import RunSegments, checkpoint_step, earlier_segments, resume_notes, resume_problems
from continue_pt.run_log import FirstAndLastStepLogged, ResumableCSVLogger, auto_log_every
from continue_pt.wav2vec2_module import Wav2Vec2ContinuedPretraining, unsupported_wav2vec2_options

MODULES: dict[str, type[ContinuedPretrainingBase]] = {
    "hubert": HubertContinuedPretraining,
    "wav2vec2": Wav2Vec2ContinuedPretraining,
}
"""The LightningModule that continues each bundle family."""
_HUBERT_ONLY = ("teacher", "kmeans", "labels", "label_dict", "val_labels", "reinit_label_head", "head_only_steps",
                "unmasked_weight")

logger = logging.getLogger(__name__)


class PretrainOptionsError(FileProblem, ValueError):
    """The options cannot work; ``problems`` lists every reason."""


@dataclass
class PretrainOptions:
    """Options of ``continue-pt pretrain`` (one field per flag)."""

    train_data: str
    """A directory of audio files or a fairseq manifest (.tsv)."""
    output_dir: str
    """Gets ``metrics.csv`` (CSVLogger), ``checkpoints/`` and the exported ``bundle/``."""
    init_from: str | None = None
    """Bundle to start from (weights only; a fresh optimiser). Exclusive with ``resume``."""
    resume: str | None = None
    """A training checkpoint (``checkpoints/last.ckpt``) to continue, with optimiser, schedule and data position."""
    val_data: str | None = None
    max_steps: int = 10_000
    lr: float = DEFAULT_PEAK_LR
    warmup_steps: int = 1000
    schedule: str = "linear"
    max_batch_seconds: float = 87.5
    max_sample_size: int = 250_000
    min_seconds: float = 2.0
    accumulate: int = 1
    precision: str | None = None
    """None: "bf16-mixed" on CUDA, "32-true" on CPU. "16-mixed" is allowed with a warning (fp16 goes NaN)."""
    devices: int | str = 1
    accelerator: str = "auto"
    strategy: str = "auto"
    seed: int = 0
    loss_norm: str = "fairseq"
    unmasked_weight: float | None = None
    """Weight of the unmasked frames' loss (fairseq's pred_nomask_weight); None: the checkpoint's (0 for HuBERT)."""
    feature_penalty_weight: float | None = None
    """Weight of the feature penalty (fairseq's loss_weights[0] for HuBERT, [1] for wav2vec 2.0); None: the
    checkpoint's criterion, else 10."""
    diversity_weight: float | None = None
    """wav2vec 2.0: weight of the codebook diversity loss (fairseq's loss_weights[0]); None: the checkpoint's."""
    num_negatives: int | None = None
    """wav2vec 2.0: distractors per masked frame; None: the checkpoint's (100 in the published recipes)."""
    codebook_warn_threshold: float = 0.1
    """wav2vec 2.0: warn when the code perplexity falls below this fraction of the usable codewords."""
    teacher: str | None = None
    kmeans: str | None = None
    """A k-means ``.safetensors`` (``continue-pt convert --kmeans``); None: the teacher bundle's."""
    labels: str | None = None
    """fairseq frame labels for ``train_data`` (a .km file) instead of online targets; needs ``label_dict``."""
    label_dict: str | None = None
    val_labels: str | None = None
    reinit_label_head: bool = False
    head_only_steps: int = 0
    freeze_feature_extractor_steps: int = 0
    feature_grad_mult: float | None = None
    masking: dict[str, Any] = field(default_factory=dict)
    gradient_clip_val: float | None = 10.0
    num_workers: int | None = None
    """Data-loader workers per device; None: as many as the CPUs allow, at most 4 (see ``resolved_num_workers``)."""
    val_check_interval: int | None = None
    checkpoint_every: int = 1000
    log_every: int | None = None
    """Log every N optimizer steps (the first and last step always); None: ``min(50, max(1, max_steps // 50))``,
    every step of a run up to 100 steps."""
    overwrite: bool = False
    deterministic: bool | str = "warn"
    progress_bar: bool = True

    def resolved_precision(self) -> str:
        if self.precision is not None:
            return self.precision
        on_gpu = self.accelerator in ("gpu", "cuda") or (self.accelerator == "auto" and torch.cuda.is_available())
        return "bf16-mixed" if on_gpu else "32-true"

    def resolved_log_every(self) -> int:
        return self.log_every if self.log_every is not None else auto_log_every(self.max_steps)

    def resolved_num_workers(self) -> int:
        """The CPUs this process may use, shared by the devices of this node, at most 4 per device (more do not
        speed up reading and cropping audio; more than the CPUs makes torch warn and can stall the loader)."""
        if self.num_workers is not None:
            return self.num_workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        devices = self.devices if isinstance(self.devices, int) and self.devices > 0 else 1
        return max(0, min(4, cpus // devices))

    def validate(self) -> None:
        """Raise one :class:`PretrainOptionsError` listing every problem."""
        problems: list[str] = []
        if (self.init_from is None) == (self.resume is None):
            problems.append("give exactly one of init_from (a bundle: weights only, fresh optimiser) and resume "
                            "(a training checkpoint: full state)" if self.init_from is not None
                            else "give init_from (a bundle) or resume (a training checkpoint)")
        bundle = None
        if self.init_from is not None:
            try:
                bundle = load_bundle(self.init_from)
            except BundleError as exc:
                problems.append(str(exc))
            if bundle is not None:
                if bundle.kind == "ctc":
                    problems.append(f"{self.init_from} is a fine-tuned (CTC) model: it has no pre-training heads; "
                                    "continue from the pre-trained checkpoint it was fine-tuned from (e.g. "
                                    "hubert_large_ll60k for hubert_large_ll60k_ft_ls960), or fine-tune it instead")
                elif bundle.family not in MODULES:
                    problems.append(f"{self.init_from} is a {bundle.family} bundle; continuation is implemented "
                                    f"for {sorted(MODULES)}")
                elif bundle.family == "wav2vec2":
                    problems += self._wav2vec2_problems(bundle)
            if bundle is not None and bundle.family == "hubert" and (self.diversity_weight is not None
                                                                      or self.num_negatives is not None):
                problems.append("diversity_weight and num_negatives are wav2vec 2.0 options; HuBERT has no "
                                "quantizer or negatives")
        if self.resume is not None:
            try:
                problems += resume_problems(read_training_checkpoint(self.resume), self.max_steps)
            except BundleError as exc:
                problems.append(str(exc))
        for name in ("train_data", "val_data", "teacher", "kmeans", "labels", "label_dict", "val_labels"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                problems.append(f"{name}: {value} does not exist")
        if (self.labels is None) != (self.label_dict is None):
            problems.append("labels (a .km file) and label_dict (dict.km.txt) go together")
        if self.labels is not None and (self.teacher is not None or self.kmeans is not None):
            problems.append("labels (offline targets) exclude teacher/kmeans (online targets)")
        if self.loss_norm not in LOSS_MODES:
            problems.append(f"loss_norm is {self.loss_norm!r}; expected one of {LOSS_MODES}")
        for name in ("max_steps", "accumulate", "checkpoint_every", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.lr <= 0:
            problems.append("warmup_steps must be >= 0 and lr > 0")
        if self.head_only_steps and not self.reinit_label_head:
            problems.append("head_only_steps warms up a re-initialised label head: add reinit_label_head")
        if self.resolved_precision() in ("16-mixed", "16", "16-true"):
            warnings.warn("fp16 training of HuBERT/wav2vec 2.0 is known to go NaN (pytorch/audio#2947, "
                          "fairseq#3750); bf16-mixed is the maintainers' advice", stacklevel=2)
        if bundle is not None and bundle.family == "hubert" and self.teacher is None and self.labels is None:
            previous = training_teacher(bundle.config)
            if previous is not None:
                warnings.warn(f"{self.init_from} was continued on targets from the features of {previous}; without "
                              "teacher this run labels with its own, moved, features: other ids than the label head "
                              f"learnt. Pass teacher {previous} to keep the same targets", stacklevel=2)
        # K mismatch between the k-means and the label head
        if bundle is not None and bundle.kind == "pretrain" and bundle.family == "hubert" \
                and not self.reinit_label_head and self.labels is None:
            k_head = (bundle.config.pretrain_args or {}).get("num_classes")
            k_means = None
            try:
                if self.kmeans is not None and Path(self.kmeans).exists():
                    k_means = load_kmeans(self.kmeans).num_clusters
                elif self.teacher is None:
                    k_means = bundle.get_kmeans().num_clusters if bundle.has_kmeans else None
                    if not bundle.has_kmeans:
                        problems.append(f"{self.init_from} holds no k-means: pass kmeans (a .safetensors k-means) "
                                        "or labels")
            except BundleError as exc:
                problems.append(str(exc))
            if k_means is not None and k_head is not None and k_means != k_head:
                problems.append(f"the k-means has {k_means} clusters but the label head of {self.init_from} has "
                                f"{k_head}: these are different label sets; pass --reinit-label-head to train a "
                                "new label head (with --head-only-steps N to warm it up first)")
        out = Path(self.output_dir)
        if self.resume is None and (out / "bundle").exists() and not self.overwrite:
            problems.append(f"{out / 'bundle'} already exists; choose another output_dir or pass --overwrite")
        if problems:
            raise PretrainOptionsError(self.output_dir, problems, hint="Nothing was started")

    def _wav2vec2_problems(self, bundle: Any) -> list[str]:
        problems = [f"{name} is a HuBERT option; wav2vec 2.0 learns from its own quantizer (no k-means, labels or "
                    "label head)" for name in _HUBERT_ONLY if getattr(self, name)]
        if self.loss_norm != "fairseq":
            problems.append(f"loss_norm {self.loss_norm!r} is a HuBERT option; wav2vec 2.0's loss is normalised by "
                            "the step's masked frames (fairseq's sample_size)")
        try:
            masking = HubertMasking.from_options({**(bundle.config.objective or {}), **self.masking})
        except TypeError as exc:
            return problems + [f"masking: {exc}"]
        return problems + [f"{self.init_from}: {p}" for p in
                           unsupported_wav2vec2_options(bundle.config.objective or {}, masking)]

    def module_options(self) -> ModuleOptions:
        return ModuleOptions(
            bundle=str(Path(self.init_from).resolve()), teacher=self.teacher, kmeans=self.kmeans,
            offline_labels=self.labels is not None, reinit_label_head=self.reinit_label_head,
            head_only_steps=self.head_only_steps, loss_norm=self.loss_norm,
            unmasked_weight=self.unmasked_weight, feature_penalty_weight=self.feature_penalty_weight,
            masking=dict(self.masking),
            feature_grad_mult=self.feature_grad_mult, diversity_weight=self.diversity_weight,
            num_negatives=self.num_negatives, codebook_warn_threshold=self.codebook_warn_threshold,
            freeze_feature_extractor_steps=self.freeze_feature_extractor_steps, lr=self.lr,
            warmup_steps=self.warmup_steps, schedule=self.schedule, seed=self.seed)


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
    tmp = final.with_name(".last.ckpt.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(final, tmp)
    except OSError:
        shutil.copyfile(final, tmp)
    os.replace(tmp, last)


def _resume_command(options: PretrainOptions, checkpoint: Path) -> str:
    """The command that continues this run from ``checkpoint``: ``--resume`` with the run's other options, which
    are written (the ones that differ from the defaults) to ``OUTPUT/resume.yaml``, since not every option has a
    flag."""
    import yaml

    defaults = PretrainOptions(train_data="", output_dir="")
    values = {f.name: str(v) if isinstance(v, Path) else v for f in fields(PretrainOptions)
              if f.name not in ("init_from", "resume") and (v := getattr(options, f.name)) != getattr(defaults, f.name)}
    config = Path(options.output_dir) / "resume.yaml"
    tmp = config.with_name(".resume.yaml.tmp")
    tmp.write_text("# written when the run was interrupted: its options, for --resume\n"
                   + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")
    os.replace(tmp, config)
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


def run_pretraining(options: PretrainOptions, callbacks: list[pl.Callback] | None = None) -> RunResult:
    """Validate, train, export ``output_dir/bundle``. ``callbacks`` are added to the Trainer's."""
    options.validate()
    out = Path(options.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(options.seed, workers=True, verbose=False)
    module = build_module(options)
    datamodule = AudioDataModule(
        options.train_data, options.val_data, sample_rate=module.sample_rate,
        normalize=module.data_normalizes, max_batch_seconds=options.max_batch_seconds,
        max_sample_size=options.max_sample_size, min_seconds=options.min_seconds,
        train_labels=options.labels, val_labels=options.val_labels, label_dict=options.label_dict,
        label_rate=float((module.bundle_config.objective or {}).get("label_rate", 50.0)),
        num_workers=options.resolved_num_workers(), seed=options.seed)
    checkpoint_dir = out / "checkpoints"
    checkpointing = ModelCheckpoint(dirpath=checkpoint_dir, filename="step-{step}", save_last=True,
                                    every_n_train_steps=options.checkpoint_every, save_top_k=-1)
    stop, lifecycle, csv_logger = _lifecycle(options, out, checkpoint_dir)
    trainer = pl.Trainer(
        accelerator=options.accelerator, devices=options.devices, strategy=options.strategy,
        precision=options.resolved_precision(), max_steps=options.max_steps,
        accumulate_grad_batches=options.accumulate, gradient_clip_val=options.gradient_clip_val,
        use_distributed_sampler=False, logger=csv_logger, callbacks=[checkpointing, *lifecycle, *(callbacks or [])],
        log_every_n_steps=options.resolved_log_every(), val_check_interval=options.val_check_interval,
        check_val_every_n_epoch=None if options.val_check_interval else 1, num_sanity_val_steps=0,
        deterministic=options.deterministic, enable_progress_bar=options.progress_bar, enable_model_summary=False,
        default_root_dir=out)
    csv_logger.trainer = trainer
    with warnings.catch_warnings():
        # the frozen teacher is in eval mode on purpose; Lightning would warn about it at every start
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        # no held-out files (a small corpus, 2 % held out): the data module already says "validating on 0 files"
        warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero.*")
        # Lightning's own code calls a deprecated torch API; nothing a user can act on
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        # the first and last steps are always logged (FirstAndLastStepLogged), whatever the interval
        warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging "
                                                  r"interval.*")
        if options.resume is not None:  # resuming into the same checkpoints/ is the point; nothing is overwritten
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=options.resume)
    if stop.saved is not None:
        if trainer.is_global_zero:
            _point_last_at(stop.saved)
        command = _resume_command(options, checkpoint_dir / "last.ckpt") if trainer.is_global_zero else ""
        raise RunInterrupted(stop.signum, stop.step, checkpoint_dir / "last.ckpt", command, trainer.is_global_zero)
    final = checkpoint_dir / "final.ckpt"
    # weights_only here means "leave out the optimiser and loop state"; the final checkpoint keeps them so it resumes.
    trainer.save_checkpoint(final, weights_only=False)  # allowed: a save flag, not an unsafe load
    if trainer.is_global_zero:
        _point_last_at(final)
    bundle_dir = out / "bundle"
    if trainer.is_global_zero:
        export_checkpoint(final, bundle_dir, overwrite=options.overwrite or options.resume is not None,
                          train_data=str(options.train_data))
    return RunResult(out, bundle_dir, checkpoint_dir, out / "metrics.csv", trainer.is_global_zero)
