"""HuBERT's part of the module options: where the targets come from, the label head and the loss normalisation.

No torch here: ``continue_pt.options`` (the CLI's ``--help``) reads these names and defaults.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LOSS_NORMS = ("fairseq", "torchaudio", "per-term")
"""The loss normalisations (``continue_pt.hubert.objective.LOSS_MODES``)."""


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
