"""The one table of the model families continued pre-training supports: each family's LightningModule (imported
only when asked for), its part of the module options, and why another family's options do not apply to it.

No torch here: ``continue_pt.options`` checks the options against this table before anything is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from continue_pt.hubert import options as hubert_options
from continue_pt.wav2vec2 import options as wav2vec2_options


@dataclass(frozen=True)
class Family:
    name: str
    """The bundle's ``family``."""
    title: str
    """How messages name it."""
    module: str
    """``"package.module:Class"`` of its LightningModule."""
    options: type
    """Its part of :class:`~continue_pt.module_options.ModuleOptions` (the field ``ModuleOptions.<name>``)."""
    label_file_options: tuple[str, ...]
    """``PretrainOptions`` fields that only this family reads besides its ``options`` fields."""
    without: str
    """Why the other families' options do not apply to a bundle of this family."""
    describe_targets: Callable[[Mapping[str, Any]], tuple[str | None, str]]
    """``(teacher, how the targets were made)`` of a run from its flat module options (export, inspect)."""

    def module_class(self) -> type:
        module, _, name = self.module.partition(":")
        return getattr(importlib.import_module(module), name)

    def option_names(self) -> tuple[str, ...]:
        """The names of this family's own module options."""
        return tuple(f.name for f in fields(self.options))


FAMILIES: dict[str, Family] = {
    "hubert": Family("hubert", "HuBERT", "continue_pt.hubert.module:HubertContinuedPretraining",
                     hubert_options.HubertOptions, label_file_options=("labels", "label_dict", "val_labels"),
                     without="HuBERT has no quantizer or negatives",
                     describe_targets=hubert_options.describe_targets),
    "wav2vec2": Family("wav2vec2", "wav2vec 2.0", "continue_pt.wav2vec2.module:Wav2Vec2ContinuedPretraining",
                       wav2vec2_options.Wav2Vec2Options, label_file_options=(),
                       without="wav2vec 2.0 learns from its own quantizer (no k-means, labels or label head; its "
                               "loss is normalised by the step's masked frames, fairseq's sample_size)",
                       describe_targets=wav2vec2_options.describe_targets),
}
"""Every family ``continue-pt pretrain`` continues, by bundle family."""


def family_of_option(name: str) -> Family | None:
    """The family a module option (or ``PretrainOptions`` field) belongs to; None for a common one."""
    for family in FAMILIES.values():
        if name in family.option_names() or name in family.label_file_options:
            return family
    return None
