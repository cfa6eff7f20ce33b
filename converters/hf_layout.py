"""The correspondence between a bundle and a transformers directory, as data: shared by export and import.

A bundle's tensors carry torchaudio's names; transformers' ``HubertModel`` / ``Wav2Vec2Model`` use nearly the same
module tree under other parents. :data:`ENCODER_KEY_MAP` renames the encoder; each :class:`HFLayout` adds where the
encoder sits in the transformers model and what happens to the heads: renamed into the model (wav2vec 2.0's
quantizer, ``project_q``, ``final_proj`` -> ``project_hid``, the mask embedding -> ``masked_spec_embed``, CTC's
``aux`` -> ``lm_head``) or, for HuBERT's pre-training head that transformers has no class for, kept in the extras
file (:data:`EXTRAS_FILE`) beside the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EXTRAS_FILE = "continue_pt_extras.safetensors"
"""Beside ``model.safetensors``: the tensors transformers has no slot for, and (in its metadata, key
``bundle_config``) the bundle's ``config.json``. Tensor names: ``model.<bundle key>`` for a tensor of the bundle's
``model.safetensors`` (HuBERT: ``logit_generator.final_proj.weight``/``.bias``, ``logit_generator.label_embeddings``
with row c = cluster c), ``fairseq_extras.<name>`` for one of ``fairseq_extras.safetensors`` (HuBERT's rows of
``<s> <pad> </s> <unk>``), ``kmeans.centroids`` for the k-means (its layer and provenance in the metadata, key
``kmeans``). ``continue-pt convert`` reads the directory back into the bundle."""
EXTRAS_FORMAT = "continue-pt-hf-extras"
EXTRAS_FORMAT_VERSION = 1
EXTRAS_PREFIX = "model."
FAIRSEQ_EXTRAS_PREFIX = "fairseq_extras."
KMEANS_TENSOR = "kmeans.centroids"

# torchaudio Wav2Vec2Model key -> transformers base-model key (HubertModel and Wav2Vec2Model share the tree).
ENCODER_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"feature_extractor\.conv_layers\.(\d+)\.(conv|layer_norm)\.(weight|bias)",
     r"feature_extractor.conv_layers.\1.\2.\3"),
    (r"encoder\.feature_projection\.(layer_norm|projection)\.(weight|bias)", r"feature_projection.\1.\2"),
    # Both use torch's weight_norm parametrisation of the positional convolution (dim=2): same names.
    (r"encoder\.transformer\.pos_conv_embed\.conv\.(bias|parametrizations\.weight\.original[01])",
     r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.transformer\.layer_norm\.(weight|bias)", r"encoder.layer_norm.\1"),
    (r"encoder\.transformer\.layers\.(\d+)\.(attention\.(?:k_proj|v_proj|q_proj|out_proj)|layer_norm|"
     r"feed_forward\.(?:intermediate_dense|output_dense)|final_layer_norm)\.(weight|bias)",
     r"encoder.layers.\1.\2.\3"),
)


@dataclass(frozen=True)
class HFLayout:
    """Where a bundle of one family and kind goes in transformers."""

    architecture: str
    """The transformers class ``from_pretrained`` of the directory builds without warnings."""
    model_type: str
    bundle_encoder_prefix: str
    """Prefix of the encoder's keys in the bundle (``wav2vec2.`` in pre-training bundles)."""
    hf_encoder_prefix: str
    """Prefix of the base model's keys in the transformers checkpoint."""
    head_key_map: tuple[tuple[str, str], ...]
    """Bundle key (not under the encoder prefix) -> transformers key."""
    extras_keys: tuple[str, ...] = ()
    """Bundle keys (regexes) kept in the extras file: transformers has no slot for them."""


LAYOUTS: dict[tuple[str, ...], HFLayout] = {
    ("hubert", "pretrain"): HFLayout(
        "HubertModel", "hubert", "wav2vec2.", "",
        # HubertModel has a slot for the mask embedding (its SpecAugment's masked_spec_embed): without it
        # transformers would initialise one at random, so it goes there rather than into the extras file.
        head_key_map=((r"mask_generator\.mask_embedding", "masked_spec_embed"),),
        extras_keys=(r"logit_generator\.final_proj\.(weight|bias)", r"logit_generator\.label_embeddings"),
    ),
    ("hubert", "ctc"): HFLayout("HubertForCTC", "hubert", "", "hubert.",
                                head_key_map=((r"aux\.(weight|bias)", r"lm_head.\1"),)),
    ("wav2vec2", "pretrain"): HFLayout(
        "Wav2Vec2ForPreTraining", "wav2vec2", "wav2vec2.", "wav2vec2.",
        head_key_map=((r"mask_embedding", "wav2vec2.masked_spec_embed"),
                      (r"quantizer\.(codevectors|weight_proj\.weight|weight_proj\.bias)", r"quantizer.\1"),
                      (r"project_q\.(weight|bias)", r"project_q.\1"),
                      (r"final_proj\.(weight|bias)", r"project_hid.\1")),
    ),
    # `export --to hf --encoder-only` of a pre-training bundle: transformers' bare Wav2Vec2Model, which would report
    # the heads as unexpected keys; they go into the extras file instead, so `convert` still restores them.
    ("wav2vec2", "pretrain", "encoder"): HFLayout(
        "Wav2Vec2Model", "wav2vec2", "wav2vec2.", "",
        head_key_map=((r"mask_embedding", "masked_spec_embed"),),
        extras_keys=(r"quantizer\.(codevectors|weight_proj\.weight|weight_proj\.bias)", r"project_q\.(weight|bias)",
                     r"final_proj\.(weight|bias)"),
    ),
    ("wav2vec2", "ctc"): HFLayout("Wav2Vec2ForCTC", "wav2vec2", "", "wav2vec2.",
                                  head_key_map=((r"aux\.(weight|bias)", r"lm_head.\1"),)),
}


def _apply(rules: tuple[tuple[str, str], ...], key: str) -> str | None:
    for pattern, replacement in rules:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", replacement, key)
    return None


def bundle_key_to_hf(layout: HFLayout, key: str) -> tuple[str, str] | None:
    """``("model", transformers key)``, ``("extras", extras-file name)`` or None (no place: refused)."""
    if any(re.fullmatch(p, key) for p in layout.extras_keys):
        return "extras", EXTRAS_PREFIX + key
    head = _apply(layout.head_key_map, key)
    if head is not None:
        return "model", head
    if layout.bundle_encoder_prefix and not key.startswith(layout.bundle_encoder_prefix):
        return None
    encoder = _apply(ENCODER_KEY_MAP, key[len(layout.bundle_encoder_prefix):])
    return ("model", layout.hf_encoder_prefix + encoder) if encoder is not None else None


def layout_for(family: str, kind: str, encoder_only: bool = False) -> HFLayout:
    """The layout of a bundle; ``encoder_only`` picks the bare encoder class where the default has heads
    (wav2vec 2.0 pre-training; HuBERT's default already is the bare ``HubertModel``)."""
    if encoder_only and (family, kind, "encoder") in LAYOUTS:
        return LAYOUTS[(family, kind, "encoder")]
    return LAYOUTS[(family, kind)]


def layout_for_architecture(architecture: str) -> HFLayout | None:
    return next((layout for layout in LAYOUTS.values() if layout.architecture == architecture), None)


# -- reading any transformers directory (no extras file): the class of its config.json decides the bundle -----------

@dataclass(frozen=True)
class HFImportLayout:
    """How a transformers class published on the Hub becomes a bundle."""

    family: str
    kind: str
    """``"pretrain"`` (Wav2Vec2ForPreTraining: quantizer and heads), ``"ctc"`` or ``"encoder"`` (the bare models)."""
    layout: HFLayout
    mask_embedding_extra: str | None
    """Where ``masked_spec_embed`` goes when the bundle's model has no slot for it: the name of fairseq's mask
    embedding in ``fairseq_extras.safetensors`` (as fairseq bundles of the same kind keep it)."""


IMPORT_LAYOUTS: dict[str, HFImportLayout] = {
    "HubertModel": HFImportLayout("hubert", "encoder", HFLayout("HubertModel", "hubert", "", "", ()), "mask_emb"),
    "Wav2Vec2Model": HFImportLayout("wav2vec2", "encoder", HFLayout("Wav2Vec2Model", "wav2vec2", "", "", ()),
                                    "mask_emb"),
    "HubertForCTC": HFImportLayout("hubert", "ctc", LAYOUTS[("hubert", "ctc")], "w2v_encoder.w2v_model.mask_emb"),
    "Wav2Vec2ForCTC": HFImportLayout("wav2vec2", "ctc", LAYOUTS[("wav2vec2", "ctc")],
                                     "w2v_encoder.w2v_model.mask_emb"),
    "Wav2Vec2ForPreTraining": HFImportLayout("wav2vec2", "pretrain", LAYOUTS[("wav2vec2", "pretrain")], None),
}
"""transformers class -> bundle, for ``continue-pt convert`` of a directory without the extras file."""

HEAD_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.")
"""transformers keys of the heads, which sit beside the base model (never under its ``hubert.``/``wav2vec2.``)."""
