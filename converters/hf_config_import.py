"""transformers' ``config.json`` (+ ``preprocessor_config.json``, ``vocab.json``) -> a bundle configuration.

The inverse of :func:`converters.hf_export.hf_config` for any HuBERT / wav2vec 2.0 directory as published on the Hub.
transformers itself is not imported: a missing option takes the default of transformers' ``HubertConfig`` /
``Wav2Vec2Config`` (:data:`HF_DEFAULTS`), as ``from_pretrained`` would. What torchaudio's ``Wav2Vec2Model`` cannot
compute (another activation, layer-norm epsilon or positional-convolution norm, adapters, a feature projection
without its layer norm) is refused naming the option and its value, all problems at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bundles.config import BundleConfig

from .errors import ConversionError
from .families.encoder import masking_args
from .hf_layout import HFImportLayout

# transformers 5.24's HubertConfig / Wav2Vec2Config defaults of the options read here.
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "hidden_dropout": 0.1, "activation_dropout": 0.1, "attention_dropout": 0.1,
    "feat_proj_dropout": 0.0, "layerdrop": 0.1, "layer_norm_eps": 1e-5, "feat_extract_norm": "group",
    "feat_extract_activation": "gelu", "conv_dim": [512] * 7, "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_bias": False, "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16, "do_stable_layer_norm": False, "vocab_size": 32,
    "feat_proj_layer_norm": True, "conv_pos_batch_norm": False, "add_adapter": False, "adapter_attn_dim": None,
    "use_weighted_layer_sum": False, "mask_time_length": 10, "num_codevectors_per_group": 320,
    "num_codevector_groups": 2, "codevector_dim": 256, "proj_codevector_dim": 256,
    "contrastive_logits_temperature": 0.1, "num_negatives": 100, "diversity_loss_weight": 0.1,
    "feat_quantizer_dropout": 0.0, "pad_token_id": 0, "mask_time_prob": 0.05,
}
PREPROCESSOR_FILE = "preprocessor_config.json"
VOCAB_FILE = "vocab.json"
_EXTRACTOR_MODE = {"group": "group_norm", "layer": "layer_norm"}
_TORCH_NORM_EPS = 1e-5  # torchaudio's LayerNorm / GroupNorm use torch's default
# Pre-training settings transformers' config has no field for: fairseq's published wav2vec 2.0 recipes (BASE and
# LARGE alike), which transformers' own pre-training example also defaults to.
_WAV2VEC2_RECIPE = {"mask_prob": 0.65, "feature_grad_mult": 0.1, "latent_temp": [2.0, 0.5, 0.999995]}
_REFUSAL_HINT = ("torchaudio's Wav2Vec2Model (which a bundle loads into) cannot compute this model; only HuBERT / "
                 "wav2vec 2.0 models with its options convert")


def option(cfg: dict[str, Any], name: str) -> Any:
    """``cfg[name]``, or transformers' default when the file leaves it out (or writes null)."""
    value = cfg.get(name)
    return HF_DEFAULTS.get(name) if value is None else value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unsupported_options(cfg: dict[str, Any], model_type: str) -> list[str]:
    """Every option of transformers' ``cfg`` that torchaudio's model cannot reproduce, said as option=value."""
    problems = []
    for name in ("hidden_act", "feat_extract_activation"):
        if option(cfg, name) != "gelu":
            problems.append(f"{name}={option(cfg, name)!r}: torchaudio's Wav2Vec2Model uses 'gelu' only")
    if option(cfg, "feat_extract_norm") not in _EXTRACTOR_MODE:
        problems.append(f"feat_extract_norm={option(cfg, 'feat_extract_norm')!r}: expected 'group' or 'layer'")
    eps = option(cfg, "layer_norm_eps")
    if not _is_number(eps) or abs(float(eps) - _TORCH_NORM_EPS) > 1e-12:
        problems.append(f"layer_norm_eps={eps!r}: torchaudio's layer norms use {_TORCH_NORM_EPS}")
    if model_type == "hubert" and option(cfg, "feat_proj_layer_norm") is not True:
        problems.append(f"feat_proj_layer_norm={option(cfg, 'feat_proj_layer_norm')!r}: torchaudio's feature "
                        "projection always has its layer norm")
    if option(cfg, "conv_pos_batch_norm"):
        problems.append("conv_pos_batch_norm=True: torchaudio's positional convolution is weight-normed, without "
                        "batch norm")
    if option(cfg, "add_adapter"):
        problems.append("add_adapter=True: torchaudio's Wav2Vec2Model has no adapter layers")
    if option(cfg, "adapter_attn_dim") is not None:
        problems.append(f"adapter_attn_dim={option(cfg, 'adapter_attn_dim')!r}: torchaudio's encoder layers have no "
                        "attention adapters (MMS)")
    return problems


def _int_list(cfg: dict[str, Any], name: str, problems: list[str]) -> list[int]:
    value = option(cfg, name)
    if not isinstance(value, (list, tuple)) or not value or not all(_is_int(v) and v > 0 for v in value):
        problems.append(f"{name}={value!r} is not a list of positive integers")
        return []
    return list(value)


def _positive_int(cfg: dict[str, Any], name: str, problems: list[str]) -> int:
    value = option(cfg, name)
    if not _is_int(value) or value <= 0:
        problems.append(f"{name}={value!r} is not a positive integer")
        return 1
    return int(value)


def _rate(cfg: dict[str, Any], name: str, problems: list[str]) -> float:
    value = option(cfg, name)
    if not _is_number(value) or not 0.0 <= float(value) <= 1.0:
        problems.append(f"{name}={value!r} is not a probability between 0 and 1")
        return 0.0
    return float(value)


def _number(cfg: dict[str, Any], name: str, problems: list[str]) -> float:
    value = option(cfg, name)
    if not _is_number(value):
        problems.append(f"{name}={value!r} is not a number")
        return 0.0
    return float(value)


def _flag(cfg: dict[str, Any], name: str, problems: list[str]) -> bool:
    value = option(cfg, name)
    if not isinstance(value, bool):
        problems.append(f"{name}={value!r} is not true or false")
    return bool(value)


def encoder_args(cfg: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """transformers options -> ``torchaudio.models.wav2vec2_model`` arguments (the inverse of ``hf_config``)."""
    dims, kernels, strides = (_int_list(cfg, n, problems) for n in ("conv_dim", "conv_kernel", "conv_stride"))
    if dims and kernels and strides and not len(dims) == len(kernels) == len(strides):
        problems.append(f"conv_dim, conv_kernel and conv_stride have {len(dims)}, {len(kernels)} and {len(strides)} "
                        "entries; they describe one convolution each")
    width = _positive_int(cfg, "hidden_size", problems)
    heads = _positive_int(cfg, "num_attention_heads", problems)
    if width % heads:
        problems.append(f"hidden_size={width} is not divisible by num_attention_heads={heads}")
    return {
        "extractor_mode": _EXTRACTOR_MODE.get(option(cfg, "feat_extract_norm"), "group_norm"),  # feat_extract_norm
        "extractor_conv_layer_config": [list(t) for t in zip(dims, kernels, strides)],  # conv_dim/kernel/stride
        "extractor_conv_bias": _flag(cfg, "conv_bias", problems),  # conv_bias
        "encoder_embed_dim": width,  # hidden_size
        "encoder_projection_dropout": _rate(cfg, "feat_proj_dropout", problems),  # feat_proj_dropout
        "encoder_pos_conv_kernel": _positive_int(cfg, "num_conv_pos_embeddings", problems),
        "encoder_pos_conv_groups": _positive_int(cfg, "num_conv_pos_embedding_groups", problems),
        "encoder_num_layers": _positive_int(cfg, "num_hidden_layers", problems),
        "encoder_num_heads": heads,  # num_attention_heads
        "encoder_attention_dropout": _rate(cfg, "attention_dropout", problems),
        "encoder_ff_interm_features": _positive_int(cfg, "intermediate_size", problems),
        "encoder_ff_interm_dropout": _rate(cfg, "activation_dropout", problems),
        "encoder_dropout": _rate(cfg, "hidden_dropout", problems),
        "encoder_layer_norm_first": _flag(cfg, "do_stable_layer_norm", problems),  # do_stable_layer_norm
        "encoder_layer_drop": _rate(cfg, "layerdrop", problems),
        "aux_num_out": None,
    }


def wav2vec2_heads(cfg: dict[str, Any], enc: dict[str, Any], problems: list[str], assumed: list[str]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pretrain_args, objective) of a ``Wav2Vec2ForPreTraining``: quantizer and heads from the config; what it has
    no field for from fairseq's published recipes, each such choice noted in ``assumed``."""
    groups = _positive_int(cfg, "num_codevector_groups", problems)
    codevector_dim = _positive_int(cfg, "codevector_dim", problems)
    if codevector_dim % groups:
        problems.append(f"codevector_dim={codevector_dim} is not divisible by num_codevector_groups={groups}")
    conv = enc["extractor_conv_layer_config"]
    pretrain_args = {
        "extractor_dim": int(conv[-1][0]) if conv else 0,
        "encoder_embed_dim": enc["encoder_embed_dim"],
        "final_dim": _positive_int(cfg, "proj_codevector_dim", problems),
        "latent_vars": _positive_int(cfg, "num_codevectors_per_group", problems),
        "latent_groups": groups,
        "codevector_dim": codevector_dim,
        "latent_temp": list(_WAV2VEC2_RECIPE["latent_temp"]),
    }
    mask_length = _positive_int(cfg, "mask_time_length", problems)
    objective = {
        **masking_args({"mask_prob": _WAV2VEC2_RECIPE["mask_prob"], "mask_length": mask_length}),
        "feature_grad_mult": _WAV2VEC2_RECIPE["feature_grad_mult"],
        "logit_temp": _number(cfg, "contrastive_logits_temperature", problems),
        "num_negatives": _positive_int(cfg, "num_negatives", problems),
        "cross_sample_negatives": 0,
        "codebook_negatives": 0,
        "negatives_from_everywhere": False,
        "dropout_features": _rate(cfg, "feat_quantizer_dropout", problems),
        "criterion": {"_name": "wav2vec", "infonce": True,
                      "loss_weights": [_number(cfg, "diversity_loss_weight", problems)]},
    }
    assumed.extend([
        f"mask_prob {_WAV2VEC2_RECIPE['mask_prob']} (fairseq's pre-training recipe; transformers' mask_time_prob "
        f"{option(cfg, 'mask_time_prob')} is its fine-tuning SpecAugment rate); mask_length from mask_time_length",
        f"feature_grad_mult {_WAV2VEC2_RECIPE['feature_grad_mult']} (fairseq's BASE and LARGE recipes)",
        f"Gumbel temperature schedule (max, min, decay) {tuple(_WAV2VEC2_RECIPE['latent_temp'])} (fairseq's recipes "
        "and transformers' pre-training example)",
        "feature penalty weight: not in transformers' config (continue-pt's default; --feature-penalty-weight)",
    ])
    return pretrain_args, objective


def audio_settings(src: Path, enc: dict[str, Any], problems: list[str]) -> tuple[int, bool, str]:
    """(sample rate, normalise waveforms?, where that was read) from ``preprocessor_config.json`` (transformers'
    ``Wav2Vec2FeatureExtractor``); without the file, fairseq's convention: models with a layer-norm feature
    extractor were trained on normalised waveforms, the others not."""
    path = src / PREPROCESSOR_FILE
    if not path.is_file():
        normalize = enc["extractor_mode"] == "layer_norm"
        return 16000, normalize, f"no {PREPROCESSOR_FILE}: assumed from the extractor mode (fairseq's convention)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{PREPROCESSOR_FILE} is not valid JSON ({exc})")
        return 16000, False, PREPROCESSOR_FILE
    if not isinstance(data, dict):
        problems.append(f"{PREPROCESSOR_FILE} does not hold a JSON object")
        return 16000, False, PREPROCESSOR_FILE
    rate = data.get("sampling_rate", 16000)
    normalize = data.get("do_normalize", True)  # Wav2Vec2FeatureExtractor's default
    if not _is_int(rate) or rate <= 0:
        problems.append(f"{PREPROCESSOR_FILE}: sampling_rate={rate!r} is not a positive integer")
    if not isinstance(normalize, bool):
        problems.append(f"{PREPROCESSOR_FILE}: do_normalize={normalize!r} is not true or false")
    return (int(rate) if _is_int(rate) else 16000), bool(normalize), f"{PREPROCESSOR_FILE} do_normalize"


def ctc_symbols(src: Path, num_outputs: int, pad_token_id: Any, notes: list[str]) -> dict[str, Any] | None:
    """The CTC rows' symbols from ``vocab.json``, named as fairseq bundles name them: transformers' blank is its pad
    token (row 0, ``<pad>``), fairseq's is ``<s>``; the two names swap back (the inverse of ``export --to hf``),
    the rows stay. None (with a note) when there is no usable vocabulary of the output layer's size."""
    path = src / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        notes.append(f"{VOCAB_FILE} is not valid JSON ({exc}); the vocabulary is not kept")
        return None
    if not isinstance(vocab, dict) or sorted(v for v in vocab.values() if _is_int(v)) != list(range(num_outputs)):
        notes.append(f"{VOCAB_FILE} does not name rows 0..{num_outputs - 1} of lm_head once each; the vocabulary is "
                     "not kept")
        return None
    symbols = sorted(vocab, key=vocab.get)
    if pad_token_id not in (0, None):
        notes.append(f"transformers' CTC blank (pad_token_id) is row {pad_token_id}, not row 0")
    elif symbols[0] == "<pad>" and "<s>" in symbols:
        s = symbols.index("<s>")
        symbols[0], symbols[s] = symbols[s], symbols[0]
    return {"ctc_symbols": symbols}


def bundle_config(src: Path, cfg: dict[str, Any], imp: HFImportLayout, num_outputs: int | None,
                  num_updates: int | None) -> tuple[BundleConfig, list[str]]:
    """The bundle configuration of the transformers directory ``src`` (its config.json read into ``cfg``) for the
    class ``imp``, and the notes of what was assumed; ConversionError listing every problem."""
    problems = unsupported_options(cfg, imp.layout.model_type)
    enc = encoder_args(cfg, problems)
    assumed: list[str] = []
    pretrain_args = objective = label_dictionary = None
    if imp.kind == "ctc":
        vocab_size = _positive_int(cfg, "vocab_size", problems)
        if num_outputs is not None and vocab_size != num_outputs:
            problems.append(f"vocab_size={vocab_size!r} but lm_head has {num_outputs} rows")
        enc["aux_num_out"] = num_outputs if num_outputs is not None else vocab_size
        label_dictionary = ctc_symbols(src, enc["aux_num_out"], cfg.get("pad_token_id"), assumed)
    if imp.kind == "pretrain":
        pretrain_args, objective = wav2vec2_heads(cfg, enc, problems, assumed)
    rate, normalize, normalize_from = audio_settings(src, enc, problems)
    if problems:
        raise ConversionError(src / "config.json", problems, hint=_REFUSAL_HINT)
    provenance: dict[str, Any] = {
        "source_file": src.name,
        "source_format": f"transformers directory ({imp.layout.architecture}, written by transformers "
                         f"{cfg.get('transformers_version', '?')})",
        "normalize_from": normalize_from,
        "transformers_config": cfg,
    }
    if imp.kind == "pretrain" and num_updates is None:
        provenance["num_updates_unknown"] = (
            "transformers' config.json does not record how many updates the model was trained for; the Gumbel "
            "temperature schedule starts from update 0 (convert again with --num-updates N to continue it)")
    config = BundleConfig(family=imp.family, kind=imp.kind, encoder_args=enc, pretrain_args=pretrain_args,
                          objective=objective, sample_rate=rate, normalize_waveform=normalize,
                          label_dictionary=label_dictionary, num_updates=num_updates, provenance=provenance)
    return config, assumed


__all__ = ["HF_DEFAULTS", "bundle_config", "encoder_args", "option", "unsupported_options", "wav2vec2_heads"]
