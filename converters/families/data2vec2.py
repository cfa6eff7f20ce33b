"""data2vec 2.0 (fairseq ``data2vec_multi``, audio modality): pre-trained checkpoints (student, conv decoder and the
EMA teacher under ``_ema``) and CTC fine-tuned ones (``wav2vec_ctc`` around the pre-trained model) -> the bundle
modules of :mod:`bundles.data2vec2`.

The key map is data: fairseq names relative to the ``Data2VecMultiModel`` -> ours, for the encoder part the
student, the teacher and the fine-tuned model share (:data:`ENCODER_RULES`, relative to a
:class:`~bundles.data2vec2.model.Data2Vec2Encoder`), the conv front end (:data:`FRONT_END_RULES`, relative to a
:class:`~bundles.data2vec2.model.Data2Vec2Model`) and the decoder.
"""

from __future__ import annotations

from typing import Any

from bundles.config import BundleConfig
from bundles.data2vec2.factory import ENCODER_PREFIX
from bundles.safetensors_stream import PendingTensor

from ..conv_layers import ConvLayersSyntaxError, parse_conv_layers
from ..fairseq_checkpoint import FairseqCheckpoint
from .base import (ConversionPlan, _ctc_vocabulary, audio_settings, cfg_section, classify_keys, direct_tensors,
                   provenance)
from .key_map import KeyMap, prefixed

NAME = "data2vec2"
MODEL_NAME = "data2vec_multi"
AUDIO = r"modality_encoders\.AUDIO\."
TEACHER_KEY = "_ema"  # fairseq's Data2VecMultiModel.state_dict() keeps the EMA teacher's fp32 tensors there
NESTED_STATE_KEYS = (TEACHER_KEY,)
"""Entries of fairseq's model state that are dicts of tensors (read flattened as ``_ema.KEY``; an export nests them)."""

# A block's tensors have the same names in fairseq's AltBlock and ours. Plain groups only, so that the table can be
# reversed (converters/families/reverse_map.py) for an export back to fairseq.
_BLOCK = r"(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
_MAX_POS_CONV_LAYERS = 64  # fairseq numbers its positional conv layers from 1 (index 0 is a TransposeLast)

ENCODER_RULES = (
    *((AUDIO + rf"relative_positional_encoder\.{i}\.0\.(weight|bias)", rf"pos_conv.layers.{i - 1}.conv.\1")
      for i in range(1, _MAX_POS_CONV_LAYERS + 1)),
    (AUDIO + r"context_encoder\.norm\.(weight|bias)", r"prenet_norm.\1"),
    (AUDIO + r"context_encoder\.blocks\.(\d+)\." + _BLOCK, r"prenet.\1.\2.\3"),
    (AUDIO + r"alibi_scale", "alibi_scale"),
    (r"blocks\.(\d+)\." + _BLOCK, r"layers.\1.\2.\3"),
    (r"norm\.(weight|bias)", r"layer_norm.\1"),  # pre-LN models only
)

FRONT_END_RULES = (
    (AUDIO + r"local_encoder\.conv_layers\.(\d+)\.0\.(weight|bias)", r"feature_extractor.conv_layers.\1.conv.\2"),
    # default mode: Fp32GroupNorm at index 2 of block 0 only; layer_norm mode: Sequential(TransposeLast,
    # Fp32LayerNorm, TransposeLast) at index 2 of every conv block (the order of ENCODER_RULES, which an export's
    # choice between the two relies on).
    (AUDIO + r"local_encoder\.conv_layers\.0\.2\.(weight|bias)", r"feature_extractor.conv_layers.0.layer_norm.\1"),
    (AUDIO + r"local_encoder\.conv_layers\.(\d+)\.2\.1\.(weight|bias)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (AUDIO + r"project_features\.1\.(weight|bias)", r"feature_projection.layer_norm.\1"),
    (AUDIO + r"project_features\.2\.(weight|bias)", r"feature_projection.projection.\1"),
)

DECODER_RULES = (
    (AUDIO + r"decoder\.blocks\.(\d+)\.0\.(weight|bias)", r"decoder.blocks.\1.conv.\2"),
    (AUDIO + r"decoder\.proj\.(weight|bias)", r"decoder.proj.\1"),
    (AUDIO + r"decoder\.proj\.(\d+)\.(weight|bias)", r"decoder.proj.\1.\2"),
)

PRETRAIN_KEY_MAP = KeyMap(
    rules=prefixed(FRONT_END_RULES, "", ENCODER_PREFIX)
    + prefixed(ENCODER_RULES, "", ENCODER_PREFIX + "encoder.")
    + prefixed(ENCODER_RULES, TEACHER_KEY + ".", "teacher.")
    + DECODER_RULES,
)

CTC_KEY_MAP = KeyMap(
    rules=prefixed(FRONT_END_RULES, "w2v_encoder.w2v_model.", "")
    + prefixed(ENCODER_RULES, "w2v_encoder.w2v_model.", "encoder.")
    + ((r"w2v_encoder\.proj\.(weight|bias)", r"aux.\1"),),
)

# Options whose other values change what the model computes in ways the bundle's modules do not implement; every
# published data2vec 2.0 audio checkpoint has these values.
_UNSUPPORTED_MODEL = {"shared_decoder": None, "recon_loss": 0, "cls_loss": 0, "ema_encoder_only": False,
                      "start_drop_path_rate": 0, "end_drop_path_rate": 0}
_UNSUPPORTED_AUDIO = {"num_extra_tokens": 0, "learned_alibi": False, "conv_pos_pre_ln": False,
                      "ema_local_encoder": False}
_UNSUPPORTED_DECODER = {"add_positions_masked": False, "add_positions_all": False}

# The objective's settings kept for continued pre-training (fairseq's Data2VecMultiConfig / D2vModalityConfig names).
OBJECTIVE_MODEL_OPTIONS = ("ema_decay", "ema_end_decay", "ema_anneal_end_step", "ema_same_dtype", "average_top_k_layers",
                           "clone_batch", "layer_norm_target_layer", "batch_norm_target_layer",
                           "instance_norm_target_layer", "instance_norm_targets", "layer_norm_targets", "loss_beta",
                           "loss_scale", "d2v_loss", "min_target_var", "min_pred_var", "seed", "max_update",
                           "end_of_block_targets")
OBJECTIVE_AUDIO_OPTIONS = ("mask_prob", "mask_prob_min", "mask_prob_adjust", "mask_length", "mask_noise_std",
                           "mask_dropout", "add_masks", "remove_masks", "inverse_mask", "keep_masked_pct",
                           "encoder_zero_mask", "mask_channel_prob", "mask_channel_length", "local_grad_mult")


def _w2v_model_cfg(ckpt: FairseqCheckpoint) -> dict[str, Any]:
    w2v_args = cfg_section(ckpt, "model").get("w2v_args")
    model = w2v_args.get("model") if isinstance(w2v_args, dict) else None
    return model if isinstance(model, dict) else {}


def detect(ckpt: FairseqCheckpoint) -> str | None:
    """"pretrain" for ``data2vec_multi``; "ctc" for a ``wav2vec_ctc`` whose pre-trained model is ``data2vec_multi``."""
    name = str(cfg_section(ckpt, "model").get("_name") or "")
    if name == MODEL_NAME:
        return "pretrain"
    if name in ("wav2vec_ctc", "wav2vec2_ctc") and _w2v_model_cfg(ckpt).get("_name") == MODEL_NAME:
        return "ctc"
    return None


def _modality_problems(ckpt: FairseqCheckpoint, model_cfg: dict[str, Any], prefix: str) -> list[str]:
    """One problem when the checkpoint is not an audio model: data2vec 2.0 also has image and text models."""
    supported = model_cfg.get("supported_modality")
    found = sorted({key[len(prefix):].split(".")[1] for key in ckpt.state
                    if key.startswith(prefix + "modality_encoders.")})
    other = [m for m in found if m != "AUDIO"]
    if (supported not in (None, "AUDIO")) or other or (supported is None and not found):
        return [f"it is a data2vec 2.0 model of modality {supported or '/'.join(found) or 'unknown'} "
                f"(model.supported_modality={supported!r}; modality encoders in its tensors: {found or 'none'}); "
                "this kit converts data2vec 2.0 audio models (base_libri, large_vox and their 960h fine-tunings)"]
    return []


def _option(section: dict[str, Any], name: str, default: Any) -> Any:
    value = section.get(name, default)
    return default if value is None else value


def encoder_args(model_cfg: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """fairseq ``Data2VecMultiConfig`` (+ ``modalities.audio``) -> :class:`~bundles.data2vec2.config.Data2Vec2EncoderArgs`
    fields. Defaults are fairseq's dataclass defaults; unsupported values are appended to ``problems``."""
    audio = (model_cfg.get("modalities") or {}).get("audio") or {}
    for section, name, supported in ([(model_cfg, n, v) for n, v in _UNSUPPORTED_MODEL.items()]
                                     + [(audio, n, v) for n, v in _UNSUPPORTED_AUDIO.items()]
                                     + [(audio.get("decoder") or {}, n, v) for n, v in _UNSUPPORTED_DECODER.items()]):
        if section.get(name) not in (None, supported):
            problems.append(f"{name}={section[name]!r} is not supported (every published data2vec 2.0 audio model "
                            f"has {name}={supported!r})")
    mode = _option(audio, "extractor_mode", "layer_norm")
    if mode not in ("layer_norm", "default"):
        problems.append(f"extractor_mode {mode!r} is not supported (fairseq has 'layer_norm' and 'default')")
    try:
        conv_layers = parse_conv_layers(_option(audio, "feature_encoder_spec",
                                                "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"))
    except ConvLayersSyntaxError as exc:
        problems.append(str(exc))
        conv_layers = []
    dim = int(_option(model_cfg, "embed_dim", 768))
    heads = int(_option(model_cfg, "num_heads", 12))
    depth = int(_option(model_cfg, "depth", 8))
    prenet_depth = int(_option(audio, "prenet_depth", 4))
    pos_depth = int(_option(audio, "conv_pos_depth", 5))
    alibi_heads = audio.get("num_alibi_heads")
    alibi_heads = int(alibi_heads) if isinstance(alibi_heads, int) else heads  # an unresolved ${model.num_heads}
    if alibi_heads != heads:
        problems.append(f"num_alibi_heads={alibi_heads} differs from num_heads={heads}; not supported")
    return {
        "extractor_conv_layer_config": [list(layer) for layer in conv_layers],
        "extractor_mode": "layer_norm" if mode == "layer_norm" else "group_norm",
        "extractor_conv_bias": False,  # fairseq's AudioEncoder: ConvFeatureExtractionModel(conv_bias=False)
        "encoder_embed_dim": dim,
        "encoder_num_layers": depth,
        "encoder_num_heads": heads,
        "encoder_ff_interm_features": int(dim * float(_option(model_cfg, "mlp_ratio", 4.0))),
        "encoder_layer_norm_first": bool(_option(model_cfg, "layer_norm_first", False)),
        "encoder_norm_eps": float(_option(model_cfg, "norm_eps", 1e-6)),
        "encoder_norm_affine": bool(_option(model_cfg, "norm_affine", True)),
        "prenet_depth": prenet_depth,
        "pos_conv_depth": pos_depth,
        "pos_conv_kernel": max(3, int(_option(audio, "conv_pos_width", 95)) // max(pos_depth, 1)),
        "pos_conv_groups": int(_option(audio, "conv_pos_groups", 16)),
        "use_alibi": bool(_option(audio, "use_alibi_encoder", False)),
        "alibi_scale_layers": prenet_depth + depth if _option(audio, "learned_alibi_scale_per_layer", False) else 1,
        "alibi_scale_heads": heads if _option(audio, "learned_alibi_scale_per_head", False) else 1,
        "alibi_scale_learned": bool(_option(audio, "learned_alibi_scale", False)),
        "ffn_targets": not bool(_option(model_cfg, "end_of_block_targets", False)),
        "encoder_dropout": float(_option(model_cfg, "encoder_dropout", 0.1)),
        "attention_dropout": float(_option(model_cfg, "attention_dropout", 0.1)),
        "activation_dropout": float(_option(model_cfg, "activation_dropout", 0.0)),
        "post_mlp_dropout": float(_option(model_cfg, "post_mlp_drop", 0.1)),
        "encoder_projection_dropout": float(_option(model_cfg, "dropout_input", 0.0)),
        "prenet_dropout": float(_option(audio, "prenet_dropout", 0.0)),
        "encoder_layer_drop": float(_option(model_cfg, "layerdrop", 0.0)),
        "prenet_layer_drop": float(_option(audio, "prenet_layerdrop", 0.0)),
        "aux_num_out": None,
    }


def decoder_args(model_cfg: dict[str, Any]) -> dict[str, Any]:
    decoder = ((model_cfg.get("modalities") or {}).get("audio") or {}).get("decoder") or {}
    return {
        "decoder_dim": int(_option(decoder, "decoder_dim", 384)),
        "decoder_groups": int(_option(decoder, "decoder_groups", 16)),
        "decoder_kernel": int(_option(decoder, "decoder_kernel", 5)),
        "decoder_layers": int(_option(decoder, "decoder_layers", 5)),
        "decoder_residual": bool(_option(decoder, "decoder_residual", True)),
        "projection_layers": int(_option(decoder, "projection_layers", 1)),
        "projection_ratio": float(_option(decoder, "projection_ratio", 2.0)),
        "input_dropout": float(_option(decoder, "input_dropout", 0.1)),
    }


def objective(ckpt: FairseqCheckpoint, model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The EMA, target, masking and loss settings of the run, as the checkpoint has them (continued pre-training
    starts from them)."""
    audio = (model_cfg.get("modalities") or {}).get("audio") or {}
    out = {name: model_cfg[name] for name in OBJECTIVE_MODEL_OPTIONS if name in model_cfg}
    out.update({name: audio[name] for name in OBJECTIVE_AUDIO_OPTIONS if name in audio})
    out["criterion"] = cfg_section(ckpt, "criterion") or None
    return out


def upgraded_alibi_scales(tensors: list[PendingTensor]) -> tuple[list[PendingTensor], list[str]]:
    """fairseq's ``upgrade_state_dict_named``: files written before per-layer ALiBi scales existed hold
    ``alibi_scale`` as ``[1, heads, 1, 1]``; the model's is ``[layers, 1, heads, 1, 1]``. The same bytes, one more
    leading dimension."""
    out, upgraded = [], []
    for tensor in tensors:
        if tensor.name.endswith("alibi_scale") and len(tensor.shape) == 4:
            produce = tensor.produce
            tensor = PendingTensor(tensor.name, (1, *tensor.shape), tensor.dtype,
                                   lambda produce=produce: produce().unsqueeze(0), tensor.source_span)
            upgraded.append(tensor.name)
        out.append(tensor)
    return out, upgraded


def plan(ckpt: FairseqCheckpoint, kind: str, problems: list[str]) -> ConversionPlan | None:
    if kind == "ctc":
        model_cfg, prefix, key_map = _w2v_model_cfg(ckpt), "w2v_encoder.w2v_model.", CTC_KEY_MAP
    else:
        model_cfg, prefix, key_map = cfg_section(ckpt, "model"), "", PRETRAIN_KEY_MAP
    problems.extend(_modality_problems(ckpt, model_cfg, prefix))
    if problems:  # another modality: its tensors and options would only add noise to the one message
        return None
    enc = encoder_args(model_cfg, problems)
    if kind == "pretrain" and not any(key.startswith(TEACHER_KEY + ".") for key in ckpt.state):
        problems.append("it holds no EMA teacher ('_ema'), which continuing data2vec 2.0 pre-training needs "
                        "(a checkpoint saved by fairseq's trainer has it)")
    result = classify_keys(ckpt, key_map, problems)
    rate, normalize, normalize_source = audio_settings(ckpt, model_cfg)
    if kind == "ctc":
        proj = ckpt.state.get("w2v_encoder.proj.weight")
        if proj is None:
            problems.append("the fine-tuned checkpoint has no output layer 'w2v_encoder.proj'")
        else:
            enc["aux_num_out"] = int(proj.shape[0])
    if problems:
        return None
    prov = provenance(ckpt, normalize_source, architecture="fairseq data2vec_multi (data2vec 2.0), audio modality")
    if kind == "ctc":
        config = BundleConfig(family=NAME, kind="ctc", encoder_args=enc, pretrain_args=None, sample_rate=rate,
                              normalize_waveform=normalize, num_updates=ckpt.num_updates, provenance=prov,
                              label_dictionary=_ctc_vocabulary(ckpt, enc["aux_num_out"]))
    else:
        config = BundleConfig(family=NAME, kind="pretrain", encoder_args=enc,
                              pretrain_args={"decoder": decoder_args(model_cfg)}, objective=objective(ckpt, model_cfg),
                              sample_rate=rate, normalize_waveform=normalize, num_updates=ckpt.num_updates,
                              provenance=prov)
    tensors, upgraded = upgraded_alibi_scales(direct_tensors(ckpt, result.mapped))
    if upgraded:
        config.provenance["upgraded_alibi_scale"] = (
            f"{upgraded}: [1, heads, 1, 1] in the file (written before per-layer scales), given the leading layer "
            "dimension as fairseq's upgrade_state_dict_named does")
    return ConversionPlan(config, tensors, key_map_result=result)
