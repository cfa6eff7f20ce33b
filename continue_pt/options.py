"""``PretrainOptions``: the options of ``continue-pt pretrain`` and every check on them.

This module imports neither torch nor Lightning (they take seconds to import): the CLI shows the defaults in
``--help`` and reports argument mistakes from here at once. The checks run in two phases, both before anything
starts: :meth:`PretrainOptions.structural_problems` (types, ranges, choices, exclusive and required options, paths
that must exist; no import) and :meth:`PretrainOptions.validate`, which adds what needs the bundles read (family,
kind, the k-means' K, layer and width against the label head and the teacher).
"""

from __future__ import annotations

import difflib
import os
import typing
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from bundles.errors import BundleError, FileProblem
from continue_pt.families import FAMILIES, family_of_option
from continue_pt.hubert.options import LOSS_NORMS
from continue_pt.lightning_choices import devices_problem, strategy_problem
from continue_pt.shard_format import SHARD_OPTIONS, is_url, shard_option_problems
from continue_pt.option_types import coerce, type_problem

DEFAULT_PEAK_LR = 5e-5
"""Default peak learning rate for *continued* pre-training: 10x below the HuBERT BASE recipe's 5e-4. The
published models are already at the end of a decayed schedule; a fresh optimiser with warm-up to a lower peak is
the advice for continuing (facebookresearch/fairseq#2840), and a full-size peak tends to undo what the model has
learnt before it adapts (and makes fp16 runs diverge, pytorch/audio#2947)."""

TRAINABLE_FAMILIES = tuple(FAMILIES)
"""The bundle families continued pre-training supports (``continue_pt.families.FAMILIES``)."""
SCHEDULES = ("linear", "cosine")
PRECISIONS = ("bf16-mixed", "32-true", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64")
"""What Lightning's Trainer accepts, less transformer-engine (an extra package)."""
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
_MUST_EXIST = ("train_data", "val_data", "init_from", "resume", "teacher", "kmeans", "labels", "label_dict",
               "val_labels")


class PretrainOptionsError(FileProblem, ValueError):
    """The options cannot work; ``problems`` lists every reason."""


class PretrainOptionsWarning(UserWarning):
    """The options work but probably not as meant (the CLI prints these as one ``Warning:`` line each)."""


DEFAULT_MAX_BAD_STEPS = 10
"""Consecutive non-finite steps after which a run stops (``--max-bad-steps``)."""

@dataclass
class PretrainOptions:
    """Options of ``continue-pt pretrain`` (one field per flag)."""

    train_data: str
    """A directory of audio files, a fairseq manifest (.tsv) or a shard set (a directory or http(s) URL with
    shards.json, from `continue-pt shards write`)."""
    output_dir: str
    """Gets ``metrics.csv`` (kept across resumes), ``checkpoints/``, the exported ``bundle/``, ``curves.png``."""
    init_from: str | None = None
    """Bundle to start from (weights only; a fresh optimiser). Exclusive with ``resume``."""
    resume: str | None = None
    """A training checkpoint (``checkpoints/last.ckpt``) to continue, with optimiser, schedule and data position."""
    val_data: str | None = None
    val_fraction: float = 0.02
    """Without ``val_data``: the share of ``train_data`` files held out for validation (chosen by file name)."""
    max_steps: int = 10_000
    lr: float = DEFAULT_PEAK_LR
    warmup_steps: int = 1000
    schedule: str = "linear"
    max_batch_seconds: float = 87.5
    max_sample_size: int = 250_000
    min_seconds: float = 2.0
    accumulate: int = 1
    precision: str | None = None
    """None: "bf16-mixed" on a GPU with native bf16 (compute capability >= 8.0), else "32-true" (V100/T4 only
    emulate bf16; CPU). "16-mixed" is allowed with a warning (fp16 goes NaN)."""
    devices: int | str = 1
    """Devices per node (Lightning's ``devices``)."""
    num_nodes: int = 1
    """Machines the run spans (Lightning's ``num_nodes``), each running ``devices`` processes: launched by SLURM's
    ``srun``, ``torchrun`` or one command per node with Lightning's MASTER_ADDR/MASTER_PORT/NODE_RANK (see
    ``continue_pt.trainer_config.launcher_problems``). More than one node means DDP (``strategy`` "auto")."""
    accelerator: str = "auto"
    strategy: str = "auto"
    """Lightning's strategy name. "auto": DDP on more than one device, with find_unused_parameters=True when layer
    drop or a frozen feature extractor can leave parameters without gradient (continue_pt.trainer_choice).
    "fsdp": Lightning's FSDP, one unit per transformer layer, sharded checkpoints (continue_pt.sharding)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in the backward instead of keeping them (less memory, about
    a third more compute; same loss and gradients), under FSDP, DDP or one device."""
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
    ema_decay: str | None = None
    """data2vec 2.0: ``START:END:STEPS`` restarts an anneal of the EMA teacher's decay from this run's first step
    (``DECAY``: constant); None: the checkpoint's schedule continued from its num_updates."""
    clone_batch: int | None = None
    """data2vec 2.0: masked copies of each utterance; None: the checkpoint's (8 in the published recipes)."""
    teacher: str | None = None
    kmeans: str | None = None
    """A k-means ``.safetensors`` (``continue-pt convert --kmeans``); None: the teacher bundle's."""
    labels: str | None = None
    """fairseq frame labels for ``train_data`` (a .km file) instead of online targets; needs ``label_dict``."""
    label_dict: str | None = None
    val_labels: str | None = None
    """fairseq frame labels for ``val_data`` (needed with ``labels`` and a separate ``val_data``)."""
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
    deterministic: bool | str | None = None
    """None: "warn" on CPU (exact resume), False on CUDA (slower kernels and no bit-exact GPU runs anyway)."""
    progress_bar: bool = True
    max_bad_steps: int = DEFAULT_MAX_BAD_STEPS
    """A step with a non-finite loss or gradient is skipped (no update; it still counts towards max_steps); after
    this many consecutive ones the run stops with ``checkpoints/last.ckpt`` at the last good state."""

    def resolved_precision(self) -> str:
        if self.precision is not None:
            return self.precision
        from continue_pt.trainer_choice import default_precision  # imports torch: only when the default is needed

        return default_precision(self.accelerator)

    def resolved_log_every(self) -> int:
        if self.log_every is not None:
            return self.log_every
        return auto_log_every(self.max_steps)

    def resolved_num_workers(self) -> int:
        """The CPUs this process may use, shared by the devices of this node, at most 4 per device (more do not
        speed up reading and cropping audio; more than the CPUs makes torch warn and can stall the loader)."""
        if self.num_workers is not None:
            return self.num_workers
        per_task = slurm_cpus_per_task()
        if per_task is not None:  # srun started one process per device, each with its own CPUs
            return max(0, min(4, per_task))
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        devices = self.devices if isinstance(self.devices, int) and self.devices > 0 else 1
        return max(0, min(4, cpus // devices))

    def resolved_deterministic(self) -> bool | str:
        if self.deterministic is not None:
            return self.deterministic
        from continue_pt.trainer_choice import default_deterministic

        return default_deterministic(self.accelerator)

    # -- checks -----------------------------------------------------------------------------------------------

    def structural_problems(self) -> list[str]:
        """Every problem visible without reading a file or importing torch: types, ranges, choices, options that
        exclude or need each other, paths that must exist. Also warns (:class:`PretrainOptionsWarning`) about
        options that work but will not do what is probably meant."""
        problems = type_problems(self)
        if problems:  # the range checks below would compare strings with numbers
            return problems
        if (self.init_from is None) == (self.resume is None):
            problems.append("give exactly one of init_from (a bundle: weights only, fresh optimiser) and resume "
                            "(a training checkpoint: full state)" if self.init_from is not None
                            else "give init_from (a bundle) or resume (a training checkpoint)")
        for name in _MUST_EXIST:
            value = getattr(self, name)
            if value is not None and not (name in SHARD_OPTIONS and is_url(value)) and not Path(value).exists():
                problems.append(f"{name}: {value} does not exist")
        problems += shard_option_problems(self.train_data, self.val_data, self.labels)
        problems += _range_problems(self)
        problems += _choice_problems(self)
        for family in FAMILIES.values():  # each family's options that exclude or need each other
            problems += family.option_problems(self)
        problems += self._starting_bundle_problems()
        out = Path(self.output_dir)
        if self.output_dir and self.resume is None and (out / "bundle").exists() and not self.overwrite:
            problems.append(f"{out / 'bundle'} already exists; choose another output_dir or pass --overwrite")
        if not problems and self.init_from is not None and self.warmup_steps > self.max_steps:
            warnings.warn(warmup_warning(self), PretrainOptionsWarning, stacklevel=2)
        return problems

    def validate(self, kmeans: Any = None, kmeans_name: str | None = None) -> None:
        """Raise one :class:`PretrainOptionsError` listing every problem: the structural ones first; when there
        are none, also what needs the bundles, checkpoint and k-means read (this imports torch).

        ``kmeans``: a :class:`~bundles.kmeans.KMeansModel` the targets will come from instead of ``self.kmeans``
        (the CLI reads a fairseq .bin before anything is written), named ``kmeans_name`` in messages; a name
        without a model means the caller could not read it (and says so): its checks are skipped."""
        problems = self.structural_problems()
        if not type_problems(self):  # every problem at once; the CLI stops after the structural ones (fast)
            problems += self.bundle_problems(kmeans, kmeans_name)
        if problems:
            raise PretrainOptionsError(self.output_dir, problems, hint="Nothing was started")

    def bundle_problems(self, kmeans: Any = None, kmeans_name: str | None = None) -> list[str]:
        """Problems that need the starting bundle, the checkpoint, the teacher and the k-means read (files that do
        not exist are left to :meth:`structural_problems`)."""
        from bundles.loading import load_bundle
        from continue_pt.export import read_training_checkpoint

        problems: list[str] = []
        bundle = None
        if self.init_from is not None and Path(self.init_from).exists():
            try:
                bundle = load_bundle(self.init_from)
            except BundleError as exc:
                problems.append(str(exc))
        if self.resume is not None and Path(self.resume).exists():
            try:
                from continue_pt.resume_notes import resume_problems

                problems += resume_problems(read_training_checkpoint(self.resume), self.max_steps)
            except BundleError as exc:
                problems.append(str(exc))
        from continue_pt.trainer_config import trainer_problems

        if not _choice_problems(self):  # a precision or devices Lightning does not know is reported already
            problems += trainer_problems(self)
        if self.resolved_precision() in ("16-mixed", "16", "16-true"):
            warnings.warn("fp16 training of HuBERT/wav2vec 2.0 is known to go NaN (pytorch/audio#2947, "
                          "fairseq#3750); bf16-mixed is the maintainers' advice", PretrainOptionsWarning,
                          stacklevel=2)
        if bundle is not None and bundle.family in FAMILIES:  # the family's own checks (continue_pt.families)
            problems += FAMILIES[bundle.family].bundle_problems(self, bundle, kmeans, kmeans_name)
        return problems

    def _starting_bundle_problems(self) -> list[str]:
        """What the starting bundle's config.json (read without torch) says about the options: its kind and
        family, and the options that belong to the other family."""
        if self.init_from is None or not Path(self.init_from).is_dir():
            return []  # a missing path is reported above; load_bundle says what else is wrong with it
        from bundles.config import BundleConfig

        try:
            config = BundleConfig.read(Path(self.init_from))
        except BundleError as exc:
            return [str(exc)]
        from bundles.encoder_only import has_pretrain_head, no_head_problem, ways_on

        family = FAMILIES.get(config.family)
        new_head = family is not None and family.new_head_possible(self, config)
        if not has_pretrain_head(config.kind) and not new_head:  # CTC, torchaudio alike
            return [f"{no_head_problem(str(self.init_from), config.family, config.kind)}. "
                    f"{ways_on(config.family, str(self.init_from))}"]
        if config.family not in TRAINABLE_FAMILIES:
            return [f"{self.init_from} is a {config.family} bundle; continuation is implemented for "
                    f"{list(TRAINABLE_FAMILIES)}"]
        return self._other_family_problems(config.family)

    def _other_family_problems(self, family: str) -> list[str]:
        """One problem per option, set to anything but its default, that belongs to a family other than the
        bundle's (``continue_pt.families.FAMILIES``)."""
        problems = []
        for f in fields(self):
            owner = family_of_option(f.name)
            value = getattr(self, f.name)
            if owner is None or owner.name == family or value == option_default(f.name):
                continue
            named = f"{f.name} {value!r}" if isinstance(option_default(f.name), str) else f.name
            problems.append(f"{named} is a {owner.title} option; {FAMILIES[family].without}")
        return problems

    def module_options(self) -> Any:
        """The :class:`~continue_pt.module_options.ModuleOptions` of this run: every option of the same name, by
        name, and what the label files and the bundle path give."""
        from continue_pt.labels import label_set_size
        from continue_pt.module_options import ModuleOptions

        module_names = set(ModuleOptions.from_hparams({"bundle": ""}).to_hparams())
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name in module_names}
        values.update(bundle=str(Path(self.init_from).resolve()), masking=dict(self.masking),
                      offline_labels=self.labels is not None,
                      num_classes=label_set_size(self.label_dict) if self.labels is not None else None)
        return ModuleOptions.from_hparams(values)


def slurm_cpus_per_task() -> int | None:
    """``--cpus-per-task`` of the SLURM job step this process is a task of (srun: one task per device, the CPUs
    its own, so they are not shared by the node's devices), else None."""
    if "SLURM_STEP_ID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return None
    value = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def auto_log_every(max_steps: int) -> int:
    """Every step of a short run (<= 100 steps), about 50 points for a longer one, at most every 50 steps."""
    return min(50, max(1, max_steps // 50))


def option_default(name: str) -> Any:
    """The default of a :class:`PretrainOptions` field (the one source of the defaults ``--help`` shows)."""
    for f in fields(PretrainOptions):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{name} has no default")
    raise KeyError(name)


def warmup_warning(options: PretrainOptions) -> str:
    reached = options.lr * options.max_steps / options.warmup_steps
    return (f"warmup_steps ({options.warmup_steps}) is larger than max_steps ({options.max_steps}): the learning "
            f"rate would still be warming up when the run ends, reaching {reached:.2g} instead of the peak lr "
            f"{options.lr:g}, and the weights would barely move. Pass --warmup-steps "
            f"{max(1, options.max_steps // 10)} (a tenth of --max-steps) or fewer")


# -- types ----------------------------------------------------------------------------------------------------

_TYPES = typing.get_type_hints(PretrainOptions)


def coerce_value(name: str, value: Any) -> Any:
    """``value`` as the type option ``name`` is declared with (:func:`continue_pt.option_types.coerce`)."""
    return coerce(name, _TYPES[name], value)


def coerce_options(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Each known option coerced to its declared type, and one problem per value that cannot be."""
    coerced, problems = {}, []
    for name, value in values.items():
        if name not in _TYPES:
            coerced[name] = value
            continue
        try:
            coerced[name] = coerce_value(name, value)
        except ValueError as exc:
            problems.append(str(exc))
    return coerced, problems


def type_problems(options: PretrainOptions) -> list[str]:
    """Fields whose value is not of the declared type (the Python API gets the CLI's type checks too)."""
    return [problem for f in fields(options)
            if (problem := type_problem(f.name, _TYPES[f.name], getattr(options, f.name))) is not None]


def unknown_option_problem(name: str, known: set[str]) -> str:
    """``name`` is not an option: the valid ones, the closest match first."""
    ranked = sorted(known, key=lambda k: (-difflib.SequenceMatcher(None, name, k).ratio(), k))
    return f"unknown option {name!r}; valid options (closest first): {', '.join(ranked)}"


# -- ranges and choices ---------------------------------------------------------------------------------------

_AT_LEAST = {"max_steps": 1, "accumulate": 1, "max_bad_steps": 1, "checkpoint_every": 1, "log_every": 1, "max_sample_size": 1,
             "warmup_steps": 0, "head_only_steps": 0, "num_workers": 0, "freeze_feature_extractor_steps": 0,
             "min_seconds": 0, "unmasked_weight": 0, "feature_penalty_weight": 0, "diversity_weight": 0,
             "num_negatives": 1, "gradient_clip_val": 0, "val_check_interval": 1, "codebook_warn_threshold": 0,
             "num_nodes": 1}
_ABOVE = {"lr": 0, "max_batch_seconds": 0}


def _range_problems(options: PretrainOptions) -> list[str]:
    problems = []
    for name, low in _AT_LEAST.items():
        value = getattr(options, name)
        if value is not None and value < low:
            problems.append(f"{name} must be >= {low}, got {value}")
    for name, low in _ABOVE.items():
        value = getattr(options, name)
        if value is not None and not value > low:
            problems.append(f"{name} must be > {low}, got {value}")
    if not 0 <= options.val_fraction < 1:
        problems.append(f"val_fraction must be in [0, 1) (0.02 holds out 2 % of the files), got {options.val_fraction}")
    return problems


def _choice_problems(options: PretrainOptions) -> list[str]:
    problems = []
    for name, choices in (("loss_norm", LOSS_NORMS), ("schedule", SCHEDULES), ("accelerator", ACCELERATORS)):
        if getattr(options, name) not in choices:
            problems.append(f"{name} is {getattr(options, name)!r}; expected one of {', '.join(choices)}")
    if options.precision is not None and options.precision not in PRECISIONS:
        problems.append(f"precision is {options.precision!r}; expected one of {', '.join(PRECISIONS)} "
                        "(bf16-mixed on a GPU, 32-true on a CPU)")
    devices = devices_problem(options.devices)
    if devices:
        problems.append(devices)
    strategy = strategy_problem(options.strategy)
    if strategy:
        problems.append(strategy)
    return problems
