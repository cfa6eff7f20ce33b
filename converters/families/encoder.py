"""What HuBERT and wav2vec 2.0 share: the encoder's key map and the translation of its fairseq options.

Each torchaudio factory argument names the fairseq option it comes from, as torchaudio's own docs do.
"""

from __future__ import annotations

from typing import Any

from ..conv_layers import ConvLayersSyntaxError, parse_conv_layers
from .key_map import Rule

# fairseq Wav2Vec2Model / HubertModel key (relative to the model) -> torchaudio Wav2Vec2Model key.
ENCODER_RULES: tuple[Rule, ...] = (
    # Feature extractor. "default" mode: GroupNorm in block 0 only (Sequential index 2);
    # "layer_norm" mode: Sequential(TransposeLast, Fp32LayerNorm, TransposeLast) at index 2 of every block.
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    # Feature projection.
    (r"layer_norm\.(weight|bias)", r"encoder.feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(weight|bias)", r"encoder.feature_projection.projection.\1"),
    # Convolutional positional embedding: fairseq's weight_norm (dim=2) -> torchaudio's parametrization.
    (r"encoder\.pos_conv\.0\.weight_g", r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"encoder\.pos_conv\.0\.weight_v", r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original1"),
    (r"encoder\.pos_conv\.0\.parametrizations\.weight\.original([01])",
     r"encoder.transformer.pos_conv_embed.conv.parametrizations.weight.original\1"),
    (r"encoder\.pos_conv\.0\.bias", r"encoder.transformer.pos_conv_embed.conv.bias"),
    (r"encoder\.layer_norm\.(weight|bias)", r"encoder.transformer.layer_norm.\1"),
    # Transformer layers.
    (r"encoder\.layers\.(\d+)\.self_attn\.(k_proj|v_proj|q_proj|out_proj)\.(weight|bias)",
     r"encoder.transformer.layers.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)", r"encoder.transformer.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(weight|bias)", r"encoder.transformer.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(weight|bias)", r"encoder.transformer.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)", r"encoder.transformer.layers.\1.final_layer_norm.\2"),
)


def encoder_args(model_cfg: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """fairseq model options -> ``torchaudio.models.wav2vec2_model`` arguments. Unsupported options are
    appended to ``problems`` (all of them, not just the first)."""
    def opt(name: str, default: Any = None) -> Any:
        value = model_cfg.get(name, default)
        if value is None and default is None:
            problems.append(f"the model configuration has no '{name}'")
        return value

    mode = opt("extractor_mode", "default")
    if mode not in ("default", "layer_norm"):
        problems.append(f"extractor_mode {mode!r} is not supported (torchaudio has 'default' and 'layer_norm')")
    try:
        conv_layers = parse_conv_layers(opt("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"))
    except ConvLayersSyntaxError as exc:
        problems.append(str(exc))
        conv_layers = []
    for name, supported in (("layer_type", "transformer"), ("activation_fn", "gelu"), ("pos_conv_depth", 1),
                            ("conv_pos_batch_norm", False)):
        if name in model_cfg and model_cfg[name] not in (supported, None):
            problems.append(f"{name}={model_cfg[name]!r} is not supported (torchaudio's Wav2Vec2Model implements "
                            f"{name}={supported!r})")
    return {
        "extractor_mode": "group_norm" if mode == "default" else "layer_norm",  # fairseq extractor_mode
        "extractor_conv_layer_config": [list(layer) for layer in conv_layers],  # conv_feature_layers
        "extractor_conv_bias": bool(opt("conv_bias", False)),  # conv_bias
        "encoder_embed_dim": int(opt("encoder_embed_dim", 768)),  # encoder_embed_dim
        "encoder_projection_dropout": float(opt("dropout_input", 0.0)),  # dropout_input
        "encoder_pos_conv_kernel": int(opt("conv_pos", 128)),  # conv_pos
        "encoder_pos_conv_groups": int(opt("conv_pos_groups", 16)),  # conv_pos_groups
        "encoder_num_layers": int(opt("encoder_layers", 12)),  # encoder_layers
        "encoder_num_heads": int(opt("encoder_attention_heads", 12)),  # encoder_attention_heads
        "encoder_attention_dropout": float(opt("attention_dropout", 0.0)),  # attention_dropout
        "encoder_ff_interm_features": int(opt("encoder_ffn_embed_dim", 3072)),  # encoder_ffn_embed_dim
        "encoder_ff_interm_dropout": float(opt("activation_dropout", 0.0)),  # activation_dropout
        "encoder_dropout": float(opt("dropout", 0.0)),  # dropout
        "encoder_layer_norm_first": bool(opt("layer_norm_first", False)),  # layer_norm_first
        "encoder_layer_drop": float(opt("encoder_layerdrop", 0.0)),  # encoder_layerdrop
        "aux_num_out": None,
    }


MASKING_OPTIONS = ("mask_prob", "mask_selection", "mask_other", "mask_length", "no_mask_overlap", "mask_min_space",
                   "mask_channel_prob", "mask_channel_selection", "mask_channel_other", "mask_channel_length",
                   "no_mask_channel_overlap", "mask_channel_min_space")

_MASKING_DEFAULTS = {"mask_prob": 0.65, "mask_selection": "static", "mask_other": 0.0, "mask_length": 10,
                     "no_mask_overlap": False, "mask_min_space": 1, "mask_channel_prob": 0.0,
                     "mask_channel_selection": "static", "mask_channel_other": 0.0, "mask_channel_length": 10,
                     "no_mask_channel_overlap": False, "mask_channel_min_space": 1}


def masking_args(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """fairseq's masking options (fairseq's defaults where an old checkpoint lacks one)."""
    out = {}
    for name in MASKING_OPTIONS:
        value = model_cfg.get(name, _MASKING_DEFAULTS[name])
        out[name] = type(_MASKING_DEFAULTS[name])(value) if not isinstance(_MASKING_DEFAULTS[name], str) else str(value)
    return out


def final_dim(model_cfg: dict[str, Any]) -> int:
    # fairseq: final_dim 0 means "the encoder's width".
    value = int(model_cfg.get("final_dim", 0) or 0)
    return value if value > 0 else int(model_cfg.get("encoder_embed_dim", 768))


def fine_tuning_model_cfg(cfg_model: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """A fine-tuned (CTC) checkpoint keeps the pre-training model options in ``w2v_args``; fairseq overrides
    some of them with the fine-tuning values when it builds the encoder (Wav2VecEncoder's arg_overrides)."""
    w2v_args = cfg_model.get("w2v_args")
    if not isinstance(w2v_args, dict) or not isinstance(w2v_args.get("model"), dict):
        problems.append("the fine-tuned checkpoint has no 'w2v_args' with the pre-training model options")
        return {}
    merged = dict(w2v_args["model"])
    overrides = {"dropout": "dropout", "activation_dropout": "activation_dropout", "dropout_input": "dropout_input",
                 "attention_dropout": "attention_dropout", "encoder_layerdrop": "layerdrop",
                 "feature_grad_mult": "feature_grad_mult", **{m: m for m in MASKING_OPTIONS}}
    for target, source in overrides.items():
        if source in cfg_model and cfg_model[source] is not None:
            merged[target] = cfg_model[source]
    return merged
