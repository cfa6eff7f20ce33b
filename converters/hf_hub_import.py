"""Any transformers HuBERT / wav2vec 2.0 directory as published on the Hub (no ``continue_pt_extras.safetensors``)
-> a bundle.

The class in ``config.json`` (``architectures``; without it, the heads among the tensors' names) decides the bundle
(:data:`converters.hf_layout.IMPORT_LAYOUTS`); never the directory's name. The configuration comes from
:mod:`converters.hf_config_import`, the weights from :mod:`converters.hf_weights`; each tensor is renamed by the
same key table the export uses (:mod:`converters.hf_layout`), or the conversion is refused naming every tensor
that is missing, misshapen or has no place. Nothing is written unless everything fits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from bundles.config import BundleConfig
from bundles.errors import BundleError
from bundles.factory import build_encoder, build_pretrain_model
from bundles.safetensors_stream import PendingTensor
from bundles.writing import write_bundle

from .errors import ConversionError
from .hf_config_import import bundle_config, option
from .hf_layout import HEAD_PREFIXES, IMPORT_LAYOUTS, HFImportLayout, bundle_key_to_hf
from .hf_weights import HFWeights, read_hf_weights

HF_CONFIG_FILE = "config.json"
HF_MODEL_TYPES = ("hubert", "wav2vec2")
IMPORT_HINT = f"continue-pt converts transformers' {', '.join(IMPORT_LAYOUTS)} (model_type 'hubert' / 'wav2vec2')"


def import_published(src: Path, found: dict[str, Any], out_dir: str | Path, *, overwrite: bool = False,
                     on_tensor: Callable[[PendingTensor], None] | None = None, num_updates: int | None = None) -> Path:
    """The bundle of the transformers directory ``src`` (``found``: its config.json), written to ``out_dir``."""
    _check_model_type(src, found)  # before any weight file is opened
    with read_hf_weights(src) as weights:
        architecture = _architecture(src, found, weights)
        imp = IMPORT_LAYOUTS[architecture]
        state = _canonical_names(src, weights, imp)
        lm_head = state.get("lm_head.weight")
        config, assumed = bundle_config(src, found, imp, lm_head.shape[0] if lm_head is not None else None,
                                        num_updates)
        model, extras = _published_tensors(src, imp, config, state)
        config.provenance["transformers_import"] = {
            "source_dir": src.name, "architecture": architecture, "weights": [p.name for p in weights.files],
            "assumed": assumed}
        try:
            return write_bundle(out_dir, config, model, extras, overwrite=overwrite, on_tensor=on_tensor)
        except BundleError as exc:
            raise ConversionError(exc.path, exc.problems, hint=exc.hint) from None
        except ValueError as exc:  # a weight file's tensor data is damaged (found while streaming it)
            raise ConversionError(weights.files[0], str(exc), hint="Is the download complete? Fetch it again") from None


def _check_model_type(src: Path, found: dict[str, Any]) -> None:
    model_type = found.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        listed = found.get("architectures")
        name = f" ({listed[0]})" if isinstance(listed, list) and listed else ""
        raise ConversionError(src / HF_CONFIG_FILE, f"model_type {model_type!r}{name} is not HuBERT or wav2vec 2.0: "
                              "torchaudio's Wav2Vec2Model, which a bundle loads into, cannot compute it",
                              hint=IMPORT_HINT)


def _architecture(src: Path, found: dict[str, Any], weights: HFWeights) -> str:
    """The transformers class: ``architectures[0]`` of config.json, else told by the tensors' names (the heads)."""
    model_type = found.get("model_type")
    listed = found.get("architectures")
    if listed is not None and (not isinstance(listed, list) or not all(isinstance(a, str) for a in listed)):
        raise ConversionError(src / HF_CONFIG_FILE, f"architectures={listed!r} is not a list of class names",
                              hint=IMPORT_HINT)
    name = listed[0] if listed else _architecture_of_tensors(model_type, set(weights.tensors))
    if name not in IMPORT_LAYOUTS:
        why = [f"architecture {name!r} has no bundle form (a bundle holds an encoder with its pre-training or CTC "
               "head)"]
        if option(found, "use_weighted_layer_sum"):
            why.append("use_weighted_layer_sum=True: its classification head reads a learned mix of all layers, "
                       "which torchaudio's model has no place for")
        raise ConversionError(src / HF_CONFIG_FILE, why, hint=IMPORT_HINT)
    if IMPORT_LAYOUTS[name].layout.model_type != model_type:
        raise ConversionError(src / HF_CONFIG_FILE, f"architecture {name!r} is not a model_type {model_type!r} class",
                              hint="config.json contradicts itself; download it again")
    return name


def _architecture_of_tensors(model_type: Any, names: set[str]) -> str:
    has = {head: any(n.startswith(head) for n in names) for head in HEAD_PREFIXES}
    if model_type == "wav2vec2" and has["quantizer."]:
        return "Wav2Vec2ForPreTraining"
    if has["lm_head."]:
        return "HubertForCTC" if model_type == "hubert" else "Wav2Vec2ForCTC"
    return "HubertModel" if model_type == "hubert" else "Wav2Vec2Model"


def _canonical_names(src: Path, weights: HFWeights, imp: HFImportLayout) -> dict[str, PendingTensor]:
    """The tensors under the names the class has, accepting what transformers' loading accepts: the base model's
    ``hubert.``/``wav2vec2.`` prefix present or not, and the positional convolution's weight-norm factors under
    their pre-parametrisation names (``weight_g``/``weight_v``)."""
    base = imp.layout.model_type + "."
    prefix = imp.layout.hf_encoder_prefix
    out: dict[str, PendingTensor] = {}
    clashes = []
    for name, tensor in weights.tensors.items():
        new = name
        if not prefix and new.startswith(base):
            new = new[len(base):]
        elif prefix and not new.startswith(prefix) and not new.startswith(HEAD_PREFIXES):
            new = prefix + new
        for legacy, current in _LEGACY_SUFFIXES:
            if new.endswith(legacy):
                new = new[: -len(legacy)] + current
        if new in out:
            clashes.append(f"{name} and another tensor both stand for {new}")
        out[new] = tensor
    if clashes:
        raise ConversionError(src, clashes[:8], hint="The weights hold one tensor twice under different names")
    return out


_LEGACY_SUFFIXES = ((".weight_g", ".parametrizations.weight.original0"),
                    (".weight_v", ".parametrizations.weight.original1"))


def _published_tensors(src: Path, imp: HFImportLayout, config: BundleConfig, state: dict[str, PendingTensor]
                       ) -> tuple[list[PendingTensor], list[PendingTensor]]:
    """(the bundle's model tensors, its fairseq_extras), each a tensor of the weight files renamed; every missing,
    misshapen or unplaced tensor reported at once."""
    expected = {k: tuple(v.shape) for k, v in _bundle_model(src, config).state_dict().items()}
    tensors, extras, problems, used = [], [], [], set()
    for key, shape in expected.items():
        where, name = bundle_key_to_hf(imp.layout, key) or ("", "")
        if where != "model" or name not in state:
            problems.append(f"{name or key} is missing (the bundle's {key})")
            continue
        used.add(name)
        if tuple(state[name].shape) != shape:
            problems.append(f"{name} has shape {list(state[name].shape)}, config.json implies {list(shape)}")
            continue
        tensors.append(replace(state[name], name=key))
    mask = imp.layout.hf_encoder_prefix + "masked_spec_embed"
    if imp.mask_embedding_extra is not None and mask in state:  # no slot in the encoder: kept as fairseq keeps it
        used.add(mask)
        extras.append(replace(state[mask], name=imp.mask_embedding_extra))
    if imp.kind == "pretrain" and mask not in state:
        problems.append(f"{mask} is missing: transformers saves it only when mask_time_prob or mask_feature_prob is "
                        "above 0, and continuing pre-training needs the mask embedding")
    unused = sorted(set(state) - used)
    if unused:
        problems.append(f"tensors {imp.layout.architecture} has no place for: {unused[:8]}"
                        f"{' ...' if len(unused) > 8 else ''}")
    if problems:
        raise ConversionError(src, problems, hint=f"The weights do not match the {imp.layout.architecture} its "
                                                  "config.json describes; is the directory complete and unchanged?")
    return tensors, extras


def _bundle_model(src: Path, config: BundleConfig) -> Any:
    try:
        return build_pretrain_model(config) if config.kind == "pretrain" else build_encoder(config)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConversionError(src / HF_CONFIG_FILE, f"does not describe a buildable model ({exc})",
                              hint=IMPORT_HINT) from None


__all__ = ["HF_MODEL_TYPES", "IMPORT_HINT", "import_published"]
