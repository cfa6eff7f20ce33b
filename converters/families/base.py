"""What a family record produces: a conversion plan (bundle config + tensors to write), or every problem found."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from bundles.config import BundleConfig
from bundles.safetensors_stream import PendingTensor

from ..fairseq_checkpoint import FairseqCheckpoint
from .encoder import encoder_args, fine_tuning_model_cfg
from .key_map import KeyMap, KeyMapResult


@dataclass
class ConversionPlan:
    config: BundleConfig
    model_tensors: list[PendingTensor]
    fairseq_extras: list[PendingTensor] = field(default_factory=list)
    key_map_result: KeyMapResult | None = None


def direct_tensors(ckpt: FairseqCheckpoint, mapping: dict[str, str], skip: set[str] = frozenset()) -> list[PendingTensor]:
    """One pending tensor per mapped key, read from the checkpoint unchanged when written."""
    out = []
    for source, target in mapping.items():
        if source in skip:
            continue
        lazy = ckpt.state[source]
        out.append(PendingTensor(target, lazy.shape, lazy.dtype, lazy.load, source_span=lazy.file_span()))
    return out


@dataclass
class EncoderPlan:
    """What pre-trained and fine-tuned checkpoints of both families share."""

    model_cfg: dict[str, Any]  # the model options (for CTC checkpoints: the pre-training ones, with fairseq's overrides)
    encoder_args: dict[str, Any]
    sample_rate: int
    normalize: bool
    provenance: dict[str, Any]
    key_map_result: KeyMapResult
    derived: list[PendingTensor] = field(default_factory=list)
    """Tensors the checkpoint does not hold but the torchaudio model needs (see identity_feature_projection)."""


def plan_encoder(ckpt: FairseqCheckpoint, kind: str, key_map: KeyMap, problems: list[str]) -> EncoderPlan:
    model_cfg = cfg_section(ckpt, "model")
    if kind == "ctc":
        model_cfg = fine_tuning_model_cfg(model_cfg, problems)
    enc = encoder_args(model_cfg, problems)
    rate, normalize, normalize_source = audio_settings(ckpt, cfg_section(ckpt, "model"))
    result = classify_keys(ckpt, key_map, problems)
    common = EncoderPlan(model_cfg, enc, rate, normalize, provenance(ckpt, normalize_source), result)
    common.derived = identity_feature_projection(ckpt, common)
    return common


FEATURE_PROJECTION = "encoder.feature_projection."


def identity_feature_projection(ckpt: FairseqCheckpoint, common: EncoderPlan) -> list[PendingTensor]:
    """An identity ``projection`` (weight I, bias 0) when fairseq has no ``post_extract_proj``.

    fairseq builds ``post_extract_proj`` only when the conv front end's width differs from the encoder's
    (``self.embed != cfg.encoder_embed_dim``) and otherwise feeds the layer-normed features on unchanged;
    torchaudio's ``FeatureProjection`` always has the linear layer. ``x @ I + 0`` is exactly ``x``, so the
    torchaudio model computes what fairseq does. Nothing is derived when the checkpoint has the projection, or when
    the widths differ (then the missing projection is reported as such).
    """
    mapped = common.key_map_result.mapped
    if any(target.endswith(FEATURE_PROJECTION + "projection.weight") for target in mapped.values()):
        return []
    conv_layers = common.encoder_args.get("extractor_conv_layer_config") or []
    width = int(common.encoder_args.get("encoder_embed_dim", 0))
    if not conv_layers or int(conv_layers[-1][0]) != width:
        return []
    norm_target = next((t for t in mapped.values() if t.endswith(FEATURE_PROJECTION + "layer_norm.weight")), None)
    if norm_target is None:
        return []
    prefix = norm_target[:-len("layer_norm.weight")]
    dtype = ckpt.state[next(s for s, t in mapped.items() if t == norm_target)].dtype
    common.provenance["identity_feature_projection"] = (
        f"the checkpoint has no post_extract_proj (conv output width = encoder width = {width}: fairseq feeds the "
        "features on unchanged); the bundle's feature projection is the identity (weight I, bias 0)")
    return [PendingTensor(prefix + "projection.weight", (width, width), dtype, lambda: torch.eye(width, dtype=dtype)),
            PendingTensor(prefix + "projection.bias", (width,), dtype, lambda: torch.zeros(width, dtype=dtype))]


def plan_ctc(ckpt: FairseqCheckpoint, family: str, common: EncoderPlan, problems: list[str]) -> ConversionPlan | None:
    """A fine-tuned checkpoint: the encoder plus fairseq's output projection as torchaudio's ``aux`` layer."""
    proj = ckpt.state.get("w2v_encoder.proj.weight")
    if proj is None:
        problems.append("the fine-tuned checkpoint has no output layer 'w2v_encoder.proj'")
    else:
        common.encoder_args["aux_num_out"] = int(proj.shape[0])
    if problems:
        return None
    config = BundleConfig(family=family, kind="ctc", encoder_args=common.encoder_args, pretrain_args=None,
                          sample_rate=common.sample_rate, normalize_waveform=common.normalize,
                          num_updates=ckpt.num_updates, provenance=common.provenance,
                          label_dictionary=_ctc_vocabulary(ckpt, common.encoder_args["aux_num_out"]))
    # Tensors the CTC model has no slot for are kept under their fairseq names, so an export back to fairseq can
    # write the checkpoint fairseq's own loader needs (strict load_state_dict), bit for bit.
    dropped = direct_tensors(ckpt, {key: key for key in common.key_map_result.dropped})
    return ConversionPlan(config, direct_tensors(ckpt, common.key_map_result.mapped) + common.derived, dropped,
                          key_map_result=common.key_map_result)


def _ctc_vocabulary(ckpt: FairseqCheckpoint, num_outputs: int) -> dict[str, Any] | None:
    """The output layer's symbols (row i = symbol i; fairseq's CTC blank is row 0, ``<s>``) from the checkpoint's
    target dictionary, when it has one of the output layer's size (``export --to hf`` writes it as vocab.json)."""
    if not ckpt.dictionaries or len(ckpt.dictionaries[0].symbols) != num_outputs:
        return None
    return {"ctc_symbols": list(ckpt.dictionaries[0].symbols)}


def cfg_section(ckpt: FairseqCheckpoint, name: str) -> dict[str, Any]:
    value = ckpt.cfg.get(name)
    return value if isinstance(value, dict) else {}


def classify_keys(ckpt: FairseqCheckpoint, key_map: KeyMap, problems: list[str]) -> KeyMapResult:
    result = key_map.classify(ckpt.state)
    problems.extend(result.problems())
    return result


def audio_settings(ckpt: FairseqCheckpoint, model_cfg: dict[str, Any]) -> tuple[int, bool, str]:
    """(sample rate, normalise waveform?, where the normalisation flag was found).

    Pre-training keeps ``normalize`` in the task; fine-tuned checkpoints also in the model config and in
    ``w2v_args.task`` (fairseq asserts they agree). fairseq's default is False.
    """
    task = cfg_section(ckpt, "task")
    w2v_task = (model_cfg.get("w2v_args") or {}).get("task") or {}
    for where, section in (("task.normalize", task), ("model.normalize", model_cfg),
                           ("model.w2v_args.task.normalize", w2v_task)):
        if isinstance(section, dict) and isinstance(section.get("normalize"), bool):
            normalize, source = section["normalize"], where
            break
    else:
        normalize, source = False, "fairseq default (the checkpoint does not say)"
    rate = task.get("sample_rate") or (w2v_task.get("sample_rate") if isinstance(w2v_task, dict) else None) or 16000
    return int(rate), bool(normalize), source


def provenance(ckpt: FairseqCheckpoint, normalize_source: str, **extra: Any) -> dict[str, Any]:
    return {
        "source_file": ckpt.path.name,
        "source_format": f"fairseq checkpoint ({ckpt.era} era)",
        "normalize_from": normalize_source,
        "fairseq_config": _json_safe(ckpt.cfg),
        **_task_state(ckpt),
        **extra,
    }


def _task_state(ckpt: FairseqCheckpoint) -> dict[str, Any]:
    """The fairseq task's dictionaries as data (``fairseq_task_state``), so that an export to fairseq can write them
    back and fairseq's task needs no ``dict.*.txt`` on disk. Nothing when the checkpoint has none."""
    if ckpt.task_state_key is None or not ckpt.dictionaries:
        return {}
    states = [_json_safe(d.state) for d in ckpt.dictionaries]
    return {"fairseq_task_state": {ckpt.task_state_key: states if ckpt.task_state_key == "dictionaries" else states[0]}}


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
