"""What a HuBERT run records beyond the shared part: the label set its exported bundle's head was trained on, and
the label-head facts ``continue-pt inspect`` shows (entries of ``continue_pt.families.FAMILIES``).

No torch here (the family table is read by the torch-free ``continue_pt.options``); tensors are only asked their
shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from continue_pt.hubert.options import describe_targets

if TYPE_CHECKING:
    from bundles.config import BundleConfig

_LABEL_EMBEDDINGS = "logit_generator.label_embeddings"


def export_config(config: BundleConfig, extra: Mapping[str, Any], model_state: Mapping[str, Any]) -> None:
    """Update the exported bundle's ``config`` to the label head trained: its K (``pretrain_args.num_classes``)
    and a label dictionary (the starting bundle's when K is unchanged, else fairseq's default order).

    ``extra``: the checkpoint's continue-pt section; ``model_state``: the student's tensors."""
    num_classes = int(extra.get("num_classes", model_state[_LABEL_EMBEDDINGS].shape[0]))
    previous_classes = (config.pretrain_args or {}).get("num_classes")
    config.pretrain_args = {**(config.pretrain_args or {}), "num_classes": num_classes}
    config.label_dictionary = _label_dictionary(
        num_classes, config.label_dictionary if num_classes == previous_classes else None)


def _label_dictionary(num_classes: int, previous: dict[str, Any] | None) -> dict[str, Any]:
    if previous and previous.get("num_clusters") == num_classes:
        return previous
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    return {"num_clusters": num_classes, "source_symbols": specials + [str(c) for c in range(num_classes)],
            "cluster_rows": [len(specials) + c for c in range(num_classes)], "non_cluster_symbols": specials,
            "missing_clusters": [], "assumed_default_order": False}


def checkpoint_facts(extra: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher, K, k-means layer and label-head reset of a training checkpoint (``extra``: its continue-pt
    section; ``options``: its flat module options), in the order ``inspect`` shows them."""
    stored = extra.get("kmeans") if isinstance(extra.get("kmeans"), dict) else {}
    facts: dict[str, Any] = {"teacher": describe_targets(options)[0], "num_classes": extra.get("num_classes")}
    if stored.get("layer") is not None:
        facts["kmeans_layer"] = stored.get("layer")
    facts["label_head_reinitialised"] = bool(options.get("reinit_label_head"))
    return facts
