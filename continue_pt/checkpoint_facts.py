"""``continue-pt inspect CKPT``: what a training checkpoint of ``continue-pt pretrain`` holds, as plain facts
(read with ``weights_only=True`` like every checkpoint here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bundles.errors import BundleError
from continue_pt.export import read_training_checkpoint
from continue_pt.families import FAMILIES
from continue_pt.module_base import CHECKPOINT_KEY


def describe_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Step, family, starting bundle, teacher and k-means, data, schedule of a training checkpoint."""
    path = Path(path)
    checkpoint = read_training_checkpoint(path)
    extra = checkpoint[CHECKPOINT_KEY]
    try:
        options = json.loads(extra.get("options", "{}"))
        config = json.loads(extra["bundle_config"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise BundleError(path, f"its stored options are unreadable ({exc})",
                          hint="Pass a .ckpt written by `continue-pt pretrain`") from None
    family = extra.get("family", "hubert")
    steps = int(extra.get("steps", 0))
    facts: dict[str, Any] = {
        "what": "continue-pt training checkpoint",
        "family": family,
        "step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
        "from_bundle": options.get("bundle"),
        "num_updates": (config.get("num_updates") or 0) + steps,
        "data": (checkpoint.get("AudioDataModule") or {}).get("train_source"),
    }
    if family in FAMILIES:
        facts["targets"] = FAMILIES[family].describe_targets(options)[1]
        facts.update(FAMILIES[family].checkpoint_facts(extra, options))  # HuBERT: teacher, K, k-means layer
    else:
        facts["targets"] = None
    facts.update({"loss_norm": extra.get("loss_norm"), "peak_lr": options.get("lr"),
                  "warmup_steps": options.get("warmup_steps"), "schedule": options.get("schedule"),
                  "seed": options.get("seed"), "lightning_version": checkpoint.get("pytorch-lightning_version")})
    return facts


def is_training_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint ``continue-pt pretrain`` wrote (read safely; False for anything else)."""
    if not Path(path).is_file():
        return False
    try:
        read_training_checkpoint(path)
    except BundleError:
        return False
    return True
