"""An encoder-only HuBERT bundle (fine-tuned CTC, torchaudio ``.pth``) with a new pre-training head, so that
``pretrain --init-from BUNDLE --reinit-label-head --kmeans KM`` can continue from it (see :mod:`bundles.encoder_only`).

The head is new, as ``--reinit-label-head`` makes it for a pre-training bundle: the label embeddings and
``final_proj`` initialised as fairseq/torchaudio initialise them, and a new mask embedding (uniform in [0, 1), as
fairseq's ``HubertModel`` and torchaudio's ``MaskGenerator`` draw it). The options a head needs and an encoder-only
bundle does not hold come from the fine-tuned checkpoint's own pre-training configuration where the bundle kept it
(``provenance.fairseq_config.model.w2v_args.model``), else from fairseq's HuBERT recipe for the encoder's width
(``hubert_base_librispeech.yaml``: final_dim 256, feature_grad_mult 0.1; ``hubert_large_librivox.yaml``: final_dim
768, skip_nomask; XLARGE: final_dim 1024); masking is the recipes' (mask_prob 0.8, span 10).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor
from torchaudio.models.wav2vec2 import components

from .config import BundleConfig
from .factory import ENCODER_PREFIX
from .loading import Bundle

# fairseq's masking defaults (fairseq.models.hubert.HubertConfig), with the HuBERT recipes' mask_prob.
_MASKING = {"mask_prob": 0.8, "mask_selection": "static", "mask_other": 0.0, "mask_length": 10,
            "no_mask_overlap": False, "mask_min_space": 1, "mask_channel_prob": 0.0,
            "mask_channel_selection": "static", "mask_channel_other": 0.0, "mask_channel_length": 10,
            "no_mask_channel_overlap": False, "mask_channel_min_space": 1}
# fairseq's HuBERT recipes by encoder width (examples/hubert/config/pretrain/*.yaml).
_RECIPES = {768: {"final_dim": 256, "feature_grad_mult": 0.1, "skip_nomask": False},
            1024: {"final_dim": 768, "feature_grad_mult": 1.0, "skip_nomask": True},
            1280: {"final_dim": 1024, "feature_grad_mult": 1.0, "skip_nomask": True}}
_HEAD_OPTIONS = ("final_dim", "feature_grad_mult", "skip_masked", "skip_nomask", "logit_temp", "untie_final_proj",
                 *_MASKING)


def _pretraining_options(config: BundleConfig) -> tuple[dict[str, Any], str]:
    """(the head's fairseq options, where they came from)."""
    width = int(config.encoder_args["encoder_embed_dim"])
    recipe = {"final_dim": width, "feature_grad_mult": 1.0, "skip_nomask": False, **_RECIPES.get(width, {}),
              "skip_masked": False, "logit_temp": 0.1, "untie_final_proj": False, **_MASKING}
    fairseq = config.provenance.get("fairseq_config") or {}
    stored = ((fairseq.get("model") or {}).get("w2v_args") or {}).get("model") or {}
    kept = {k: stored[k] for k in _HEAD_OPTIONS if stored.get(k) is not None}
    if kept:
        return {**recipe, **kept}, "the checkpoint's pre-training configuration (model.w2v_args.model)"
    return recipe, f"fairseq's HuBERT recipe for width {width}"


def new_head_config(config: BundleConfig, num_classes: int) -> BundleConfig:
    """The pre-training configuration of the encoder of ``config`` with a new head of ``num_classes`` labels."""
    options, source = _pretraining_options(config)
    final_dim = int(options["final_dim"]) or int(config.encoder_args["encoder_embed_dim"])
    fgm = float(options["feature_grad_mult"])
    new = copy.deepcopy(config)
    new.kind = "pretrain"
    new.encoder_args = {**new.encoder_args, "aux_num_out": None}
    new.pretrain_args = {**{k: options[k] for k in _MASKING}, "skip_masked": bool(options["skip_masked"]),
                         "skip_nomask": bool(options["skip_nomask"]), "num_classes": int(num_classes),
                         "final_dim": final_dim, "feature_grad_mult": fgm if 0.0 < fgm < 1.0 else None}
    new.objective = {"feature_grad_mult": fgm, "logit_temp": float(options["logit_temp"]), "label_rate": 50.0,
                     "untie_final_proj": bool(options["untie_final_proj"]), "labels": None, "criterion": None}
    new.label_dictionary = None
    new.provenance = {**new.provenance, "new_label_head": {
        "from_kind": config.kind,
        "note": "the source had no pre-training head: label embeddings, final_proj and mask embedding are new",
        "options_from": source}}
    return new


class BundleWithNewHead(Bundle):
    """An encoder-only bundle seen as a HuBERT pre-training bundle whose head is new (drawn once, when built)."""

    def __init__(self, bundle: Bundle, num_classes: int):
        super().__init__(bundle.path, new_head_config(bundle.config, num_classes))
        self._encoder_only = bundle
        args = self.config.pretrain_args or {}
        width = int(self.config.encoder_args["encoder_embed_dim"])
        masking = {k: args[k] for k in _MASKING}
        heads = {"mask_generator.": components.MaskGenerator(width, **masking),
                 "logit_generator.": components.LogitGenerator(width, args["num_classes"], args["final_dim"],
                                                               args["skip_masked"], args["skip_nomask"])}
        self._head = {prefix + k: v.detach() for prefix, module in heads.items()
                      for k, v in module.state_dict().items()}

    def state_dict(self) -> dict[str, Tensor]:
        encoder = self._encoder_only.state_dict()
        return {**{ENCODER_PREFIX + k: v for k, v in encoder.items() if not k.startswith("aux.")}, **self._head}

    def fairseq_extras(self) -> dict[str, Tensor]:
        return {}


def with_new_label_head(bundle: Bundle, num_classes: int = 2) -> Bundle:
    """``bundle`` itself when it has a pre-training head; an encoder-only HuBERT bundle with a new one otherwise
    (``num_classes`` rows; the training module re-sizes it to its k-means)."""
    if bundle.kind == "pretrain":
        return bundle
    if bundle.family != "hubert":
        raise ValueError(f"{bundle.path}: a new pre-training head is made for HuBERT only (wav2vec 2.0 needs its own "
                         "quantizer)")
    return BundleWithNewHead(bundle, num_classes)
