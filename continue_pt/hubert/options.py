"""HuBERT's part of the module options: where the targets come from, the label head and the loss normalisation;
and HuBERT's checks of the options against the starting bundle (entries of ``continue_pt.families.FAMILIES``).

No torch here: ``continue_pt.options`` (the CLI's ``--help``) reads these names and defaults; the checks import
what they need when called.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bundles.config import BundleConfig
    from bundles.kmeans import KMeansModel
    from bundles.loading import Bundle
    from continue_pt.options import PretrainOptions

LOSS_NORMS = ("fairseq", "torchaudio", "per-term")
"""The loss normalisations (``continue_pt.hubert.loss.LOSS_MODES``)."""


@dataclass
class HubertOptions:
    """What only HuBERT's module is built from (the rest is :class:`~continue_pt.module_options.ModuleOptions`)."""

    teacher: str | None = None
    """Bundle directory of the teacher making online targets; None: the student's bundle (frozen copy)."""
    kmeans: str | None = None
    """A ``km.safetensors`` file for online targets; None: the teacher bundle's k-means."""
    offline_labels: bool = False
    """Take the targets from ``batch["labels"]`` (fairseq ``.km`` frame labels) instead of a teacher."""
    reinit_label_head: bool = False
    """Re-initialise ``label_embeddings`` (K rows for the k-means' K clusters, + fairseq's special rows) and
    ``final_proj`` as torchaudio/fairseq initialise them (for a new label set)."""
    head_only_steps: int = 0
    """During the first N steps only the label head (``final_proj``, label embeddings) is updated."""
    num_classes: int | None = None
    """K for offline labels with ``reinit_label_head`` (else from the k-means)."""
    loss_norm: str = "fairseq"
    """``"fairseq"`` (divide by masked (+ unmasked if weighted) frames of the whole step), ``"torchaudio"``
    (masked frames only) or ``"per-term"`` (pytorch/audio#2947; each term over its own frames of the step)."""
    masked_weight: float | None = None
    unmasked_weight: float | None = None
    """Loss weights; None: the bundle's ``objective.criterion`` (fairseq's pred_masked_weight, pred_nomask_weight)."""

    def __post_init__(self) -> None:
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm is {self.loss_norm!r}; expected one of {LOSS_NORMS}")


def describe_targets(options: Mapping[str, Any]) -> tuple[str | None, str]:
    """``(teacher, how the targets were made)`` of a run, from its flat module options (a checkpoint's)."""
    if options.get("offline_labels"):
        return None, "offline frame labels"
    teacher = options.get("teacher") or options.get("bundle")
    return teacher, f"online: teacher {teacher}, k-means {options.get('kmeans') or 'of the teacher bundle'}"


def option_problems(options: PretrainOptions) -> list[str]:
    """HuBERT's target options that exclude or need each other (offline labels against online teacher/k-means,
    the label files together, the head warm-up against a re-initialised head); no file is read."""
    problems = []
    if (options.labels is None) != (options.label_dict is None):
        problems.append("labels (a .km file) and label_dict (dict.km.txt) go together")
    if options.labels is not None and (options.teacher is not None or options.kmeans is not None):
        problems.append("labels (offline targets) exclude teacher/kmeans (online targets)")
    if options.val_labels is not None and options.labels is None:
        problems.append("val_labels (a .km file for val_data) goes with labels (offline targets)")
    if options.labels is not None and options.val_data is not None and options.val_labels is None:
        problems.append(f"val_data {options.val_data} has no frame labels while train_data has (labels): pass "
                        "--val-labels (the .km file written for it), or leave out --val-data to hold out "
                        "val_fraction of train_data")
    if options.head_only_steps and not options.reinit_label_head:
        problems.append("head_only_steps warms up a re-initialised label head: add reinit_label_head")
    return problems


def new_head_possible(options: PretrainOptions, config: BundleConfig) -> bool:
    """An encoder-only HuBERT bundle continues with a new head: --reinit-label-head and targets to train it on
    (a k-means, the bundle's own or --kmeans, or labels); see bundles.new_label_head."""
    targets = options.kmeans is not None or options.labels is not None or bool(config.files.get("kmeans"))
    return bool(options.reinit_label_head) and targets


def bundle_problems(options: PretrainOptions, bundle: Bundle, kmeans: KMeansModel | None = None,
                    kmeans_name: str | None = None) -> list[str]:
    """What the loaded HuBERT starting ``bundle`` says about the options: the online targets' teacher and k-means
    against its label head, the offline label set's K against its head; warns when a continued bundle would label
    its own targets with its moved features (:meth:`continue_pt.options.PretrainOptions.bundle_problems`)."""
    problems: list[str] = []
    if options.teacher is None and options.labels is None:
        from continue_pt.export import training_teacher
        from continue_pt.options import PretrainOptionsWarning

        previous = training_teacher(bundle.config)
        if previous is not None:
            warnings.warn(f"{options.init_from} was continued on targets from the features of {previous}; without "
                          "teacher this run labels with its own, moved, features: other ids than the label head "
                          f"learnt. Pass teacher {previous} to keep the same targets", PretrainOptionsWarning,
                          stacklevel=3)
    if _online_targets_checkable(options, bundle, kmeans, kmeans_name):
        from continue_pt.target_checks import online_target_problems

        problems += online_target_problems(options, bundle, kmeans, kmeans_name)
    if bundle.kind == "pretrain" and options.label_dict is not None and Path(options.label_dict).exists():
        from continue_pt.labels import label_head_problems

        problems += label_head_problems(options.label_dict, (bundle.config.pretrain_args or {}).get("num_classes"),
                                        str(options.init_from), options.reinit_label_head)
    return problems


def _online_targets_checkable(options: PretrainOptions, bundle: Bundle, kmeans: KMeansModel | None,
                              kmeans_name: str | None) -> bool:
    """A run with online targets whose teacher and k-means can be read (missing files are reported by the
    structural checks; a k-means the caller could not read, by the caller)."""
    if options.labels is not None or (bundle.kind != "pretrain" and not options.reinit_label_head):
        return False
    if kmeans is None and kmeans_name is not None:
        return False
    paths = [options.teacher, None if kmeans is not None else options.kmeans]
    return all(p is None or Path(p).exists() for p in paths)
