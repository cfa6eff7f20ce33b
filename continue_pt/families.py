"""The one table of the model families continued pre-training supports: each family's LightningModule (imported
only when asked for), its part of the module options, why another family's options do not apply to it, and its
part of the checks, the export and ``inspect`` (the shared modules dispatch through it, never on the name).

No torch here: ``continue_pt.options`` checks the options against this table before anything is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from continue_pt.data2vec2 import options as data2vec2_options
from continue_pt.hubert import options as hubert_options
from continue_pt.hubert import records as hubert_records
from continue_pt.wav2vec2 import options as wav2vec2_options


def _no_problems(options: Any) -> list[str]:
    return []


def _no_new_head(options: Any, config: Any) -> bool:
    return False


def _config_unchanged(config: Any, extra: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    """Nothing but the shared part changes in the exported bundle's config."""


def _no_facts(extra: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    return {}


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
    bundle_problems: Callable[..., list[str]]
    """``(options, bundle, kmeans, kmeans_name)`` -> the problems of the ``PretrainOptions`` against a loaded
    starting bundle of this family (it may warn too); imports what it needs when called."""
    option_problems: Callable[[Any], list[str]] = _no_problems
    """``(options)`` -> problems of this family's ``PretrainOptions`` that exclude or need each other, visible
    without reading a file (checked whatever the starting bundle's family: it is not known yet)."""
    new_head_possible: Callable[[Any, Any], bool] = _no_new_head
    """``(options, config)``: whether a bundle of this family without a pre-training head continues with a new one."""
    export_config: Callable[[Any, Mapping[str, Any], Mapping[str, Any]], None] = _config_unchanged
    """``(config, checkpoint extra, student tensors)``: this family's changes to an exported bundle's config."""
    checkpoint_facts: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]] = _no_facts
    """``(checkpoint extra, flat module options)`` -> this family's facts of a training checkpoint (inspect)."""

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
                     describe_targets=hubert_options.describe_targets, bundle_problems=hubert_options.bundle_problems,
                     option_problems=hubert_options.option_problems,
                     new_head_possible=hubert_options.new_head_possible, export_config=hubert_records.export_config,
                     checkpoint_facts=hubert_records.checkpoint_facts),
    "wav2vec2": Family("wav2vec2", "wav2vec 2.0", "continue_pt.wav2vec2.module:Wav2Vec2ContinuedPretraining",
                       wav2vec2_options.Wav2Vec2Options, label_file_options=(),
                       without="wav2vec 2.0 learns from its own quantizer (no k-means, labels or label head; its "
                               "loss is normalised by the step's masked frames, fairseq's sample_size)",
                       describe_targets=wav2vec2_options.describe_targets,
                       bundle_problems=wav2vec2_options.bundle_problems),
    "data2vec2": Family("data2vec2", "data2vec 2.0", "continue_pt.data2vec2.module:Data2Vec2ContinuedPretraining",
                        data2vec2_options.Data2Vec2Options, label_file_options=(),
                        without="data2vec 2.0 regresses its own EMA teacher's block outputs (no k-means, labels, "
                                "label head, quantizer or negatives; its loss is normalised by the step's masked "
                                "frames, fairseq's sample_size)",
                        describe_targets=data2vec2_options.describe_targets,
                        bundle_problems=data2vec2_options.bundle_problems,
                        option_problems=data2vec2_options.option_problems,
                        checkpoint_facts=data2vec2_options.checkpoint_facts),
}
"""Every family ``continue-pt pretrain`` continues, by bundle family."""


def family_of_option(name: str) -> Family | None:
    """The family a module option (or ``PretrainOptions`` field) belongs to; None for a common one."""
    for family in FAMILIES.values():
        if name in family.option_names() or name in family.label_file_options:
            return family
    return None
