"""wav2vec 2.0 / XLSR / XLS-R: fairseq ``Wav2Vec2Model`` (pre-trained) and ``Wav2VecCtc`` (fine-tuned)."""

from __future__ import annotations

from bundles.config import BundleConfig
from bundles.factory import ENCODER_PREFIX

from ..fairseq_checkpoint import FairseqCheckpoint
from .base import ConversionPlan, cfg_section, direct_tensors, plan_ctc, plan_encoder
from .encoder import ENCODER_RULES, final_dim, masking_args
from .key_map import KeyMap, prefixed

NAME = "wav2vec2"

PRETRAIN_KEY_MAP = KeyMap(
    rules=prefixed(ENCODER_RULES, "", ENCODER_PREFIX) + (
        (r"mask_emb", "mask_embedding"),
        (r"quantizer\.vars", "quantizer.codevectors"),
        (r"quantizer\.weight_proj\.(weight|bias)", r"quantizer.weight_proj.\1"),
        (r"project_q\.(weight|bias)", r"project_q.\1"),
        (r"final_proj\.(weight|bias)", r"final_proj.\1"),
    ),
)

CTC_KEY_MAP = KeyMap(
    rules=prefixed(ENCODER_RULES, "w2v_encoder.w2v_model.", "") + (
        (r"w2v_encoder\.proj\.(weight|bias)", r"aux.\1"),
    ),
    drops=(
        (r"w2v_encoder\.w2v_model\.mask_emb", "fine-tuning's time-masking vector; torchaudio's Wav2Vec2Model has no slot"),
    ),
)

# Options that change what the pre-training heads compute; torchaudio-based heads implement only these values.
_SUPPORTED_HEADS = {"quantize_targets": True, "quantize_input": False, "target_glu": False, "quantizer_depth": 1,
                    "same_quantizer": False}


def detect(ckpt: FairseqCheckpoint) -> str | None:
    name = str(cfg_section(ckpt, "model").get("_name") or "")
    if name == "wav2vec2" or (not name and "quantizer.vars" in ckpt.state):
        return "pretrain"
    if name in ("wav2vec_ctc", "wav2vec2_ctc"):
        return "ctc"
    return None


def plan(ckpt: FairseqCheckpoint, kind: str, problems: list[str]) -> ConversionPlan | None:
    key_map = PRETRAIN_KEY_MAP if kind == "pretrain" else CTC_KEY_MAP
    common = plan_encoder(ckpt, kind, key_map, problems)
    if kind == "ctc":
        return plan_ctc(ckpt, NAME, common, problems)
    model_cfg, enc, result = common.model_cfg, common.encoder_args, common.key_map_result

    for option, supported in _SUPPORTED_HEADS.items():
        if option in model_cfg and model_cfg[option] != supported:
            problems.append(f"{option}={model_cfg[option]!r} is not supported (only {option}={supported!r}, as in "
                            "every published wav2vec 2.0 / XLS-R checkpoint)")
    if problems:
        return None
    fdim = final_dim(model_cfg)
    latent_dim = int(model_cfg.get("latent_dim", 0) or 0)
    pretrain_args = {
        "extractor_dim": int(enc["extractor_conv_layer_config"][-1][0]),
        "encoder_embed_dim": enc["encoder_embed_dim"],
        "final_dim": fdim,
        "latent_vars": int(model_cfg.get("latent_vars", 320)),
        "latent_groups": int(model_cfg.get("latent_groups", 2)),
        "codevector_dim": latent_dim if latent_dim > 0 else fdim,
        "latent_temp": [float(t) for t in model_cfg.get("latent_temp", (2.0, 0.5, 0.999995))],
    }
    objective = {
        **masking_args(model_cfg),
        "feature_grad_mult": float(model_cfg.get("feature_grad_mult", 1.0)),
        "logit_temp": float(model_cfg.get("logit_temp", 0.1)),
        "num_negatives": int(model_cfg.get("num_negatives", 100)),
        "cross_sample_negatives": int(model_cfg.get("cross_sample_negatives", 0)),
        "codebook_negatives": int(model_cfg.get("codebook_negatives", 0)),
        "negatives_from_everywhere": bool(model_cfg.get("negatives_from_everywhere", False)),
        "dropout_features": float(model_cfg.get("dropout_features", 0.0)),
        "criterion": cfg_section(ckpt, "criterion") or None,
    }
    config = BundleConfig(family=NAME, kind="pretrain", encoder_args=enc, pretrain_args=pretrain_args,
                          objective=objective, sample_rate=common.sample_rate, normalize_waveform=common.normalize,
                          num_updates=ckpt.num_updates, provenance=common.provenance)
    return ConversionPlan(config, direct_tensors(ckpt, result.mapped) + common.derived, key_map_result=result)
