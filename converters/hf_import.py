"""A transformers HuBERT / wav2vec 2.0 directory -> a bundle: ``continue-pt convert HF_DIR -o BUNDLE``.

Two kinds of directory:

- written by ``continue-pt export --to hf`` (it carries ``continue_pt_extras.safetensors``): ``model.safetensors``
  is read back through the key table of :mod:`converters.hf_layout` and the extras file (HuBERT's head and k-means,
  wav2vec 2.0's heads when only the encoder was exported, and the bundle's own ``config.json``): bundle ->
  transformers -> bundle is lossless. The weights may have changed in between (fine-tuned with transformers); the
  architecture may not: a ``config.json`` that no longer matches the stored bundle configuration is refused,
  naming the options that differ.
- any other (as published on the Hub): the class in ``config.json`` (``architectures``, else the tensors' names)
  decides the bundle (:data:`converters.hf_layout.IMPORT_LAYOUTS`): ``Wav2Vec2ForPreTraining`` a complete wav2vec
  2.0 pre-training bundle, ``*ForCTC`` a CTC bundle (with ``vocab.json``'s symbols), ``HubertModel`` /
  ``Wav2Vec2Model`` an encoder-only bundle. The configuration is derived by :mod:`converters.hf_config_import`,
  the weights read by :mod:`converters.hf_weights` (a ``pytorch_model.bin`` only through the allow-list reader).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from bundles.config import BundleConfig
from bundles.errors import BundleError
from bundles.factory import build_encoder, build_pretrain_model
from bundles.kmeans import KMeansModel
from bundles.safetensors_stream import PendingTensor
from bundles.writing import write_bundle

from .errors import ConversionError
from .hf_export import HF_CONFIG_FILE, HF_MODEL_FILE, hf_config
from .hf_layout import (EXTRAS_FILE, EXTRAS_FORMAT, EXTRAS_FORMAT_VERSION, FAIRSEQ_EXTRAS_PREFIX, KMEANS_TENSOR,
                        IMPORT_LAYOUTS, HFLayout, bundle_key_to_hf, layout_for_architecture)
from .hf_hub_import import IMPORT_HINT, import_published
from .hf_weights import read_hf_weights, weight_file

# Options of transformers' config.json that decide the tensors' shapes or the computation: they must still be
# what the export wrote (dropouts and SpecAugment settings may have been changed for fine-tuning).
_STRUCTURAL = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "hidden_act", "feat_extract_norm", "feat_extract_activation", "conv_dim",
               "conv_kernel", "conv_stride", "conv_bias", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups",
               "do_stable_layer_norm", "layer_norm_eps", "feat_proj_layer_norm", "vocab_size",
               "num_codevectors_per_group", "num_codevector_groups", "codevector_dim", "proj_codevector_dim",
               "conv_pos_batch_norm")


def read_hf_config(src: Path) -> dict[str, Any] | None:
    """transformers' config.json of the directory ``src``, or None when ``src`` is no transformers directory
    (no config.json, a bundle's, or one that is neither readable nor beside transformers weights)."""
    path = Path(src) / HF_CONFIG_FILE
    if not Path(src).is_dir() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {} if weight_file(Path(src)) is not None else None  # refused by import_hf, naming the file
    if not isinstance(data, dict) or "format" in data:
        return None
    if not isinstance(data.get("model_type"), str) and weight_file(Path(src)) is None:
        return None
    return data


def is_hf_directory(src: str | Path) -> bool:
    """A directory holding a transformers ``config.json`` (not a bundle's): ``convert`` reads or refuses it."""
    return read_hf_config(Path(src)) is not None


def _read_extras(src: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    path = src / EXTRAS_FILE
    if not path.is_file():
        raise ConversionError(src, f"is a transformers directory without {EXTRAS_FILE}", hint=IMPORT_HINT)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(path, f"is not a readable safetensors file ({exc})",
                              hint="Export the bundle again with `continue-pt export BUNDLE --to hf`") from None
    if metadata.get("format") != EXTRAS_FORMAT or metadata.get("format_version") != str(EXTRAS_FORMAT_VERSION):
        raise ConversionError(path, f"has format {metadata.get('format')!r} version {metadata.get('format_version')!r}"
                              f", expected {EXTRAS_FORMAT!r} version {EXTRAS_FORMAT_VERSION}",
                              hint="Export the bundle again with `continue-pt export BUNDLE --to hf`")
    return metadata, tensors


def _stored_config(path: Path, metadata: dict[str, str]) -> BundleConfig:
    try:
        data = json.loads(metadata["bundle_config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ConversionError(path, f"holds no readable bundle configuration ({exc})",
                              hint="Export the bundle again with `continue-pt export BUNDLE --to hf`") from None
    try:
        return BundleConfig.from_dict(path, data)
    except BundleError as exc:
        raise ConversionError(path, exc.problems, hint=exc.hint) from None


def _changed_options(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{key} is {found.get(key)!r}, the stored bundle configuration gives {expected[key]!r}"
            for key in _STRUCTURAL if key in expected and found.get(key) != expected[key]]


def _legacy_weight_norm_names() -> dict[str, str]:
    """transformers on a torch without ``parametrizations.weight_norm`` (before 2.1) saves the positional
    convolution's weight-norm factors as ``weight_g`` / ``weight_v``; those names are read too."""
    out = {}
    for prefix in ("", "hubert.", "wav2vec2."):
        base = f"{prefix}encoder.pos_conv_embed.conv."
        out[base + "parametrizations.weight.original0"] = base + "weight_g"
        out[base + "parametrizations.weight.original1"] = base + "weight_v"
    return out


_LEGACY_NAMES = _legacy_weight_norm_names()


def _bundle_keys(config: BundleConfig) -> list[str]:
    model = build_pretrain_model(config) if config.kind == "pretrain" else build_encoder(config)
    return list(model.state_dict())


def _model_tensors(src: Path, layout: HFLayout, config: BundleConfig, hf_state: dict[str, Tensor],
                   extras: dict[str, Tensor]) -> list[PendingTensor]:
    """The bundle's tensors, each from transformers' file or the extras file; every key problem reported at once."""
    tensors, problems, used = [], [], set()
    for key in _bundle_keys(config):
        where, name = bundle_key_to_hf(layout, key) or ("", "")
        source = hf_state if where == "model" else extras
        name = _LEGACY_NAMES.get(name, name) if name not in source else name
        if name not in source:
            problems.append(f"{key} (expected as {name or '?'} in "
                            f"{HF_MODEL_FILE if where == 'model' else EXTRAS_FILE}) is missing")
            continue
        used.add(name)
        t = source[name]
        tensors.append(PendingTensor(key, tuple(t.shape), t.dtype, lambda t=t: t.contiguous()))
    unused = sorted(set(hf_state) - used)
    if unused:
        problems.append(f"{HF_MODEL_FILE} holds tensors the model has no place for: {unused[:8]}")
    if problems:
        raise ConversionError(src, problems, hint="The directory does not match the model its config.json describes; "
                                                  "export the bundle again")
    return tensors


def _kmeans(metadata: dict[str, str], extras: dict[str, Tensor]) -> KMeansModel | None:
    if KMEANS_TENSOR not in extras:
        return None
    stored = json.loads(metadata.get("kmeans") or "{}")
    return KMeansModel(extras[KMEANS_TENSOR], stored.get("layer"), dict(stored.get("metadata") or {}))


def import_hf(src: str | Path, out_dir: str | Path, overwrite: bool = False,
              on_tensor: Callable[[PendingTensor], None] | None = None, num_updates: int | None = None) -> Path:
    """Read the transformers directory ``src`` into a bundle at ``out_dir`` (written atomically). ``num_updates``:
    the updates the model was trained for, which transformers does not record (wav2vec 2.0's Gumbel temperature
    continues from it)."""
    src = Path(src)
    found = read_hf_config(src)
    if found is None:
        raise ConversionError(src, "is not a transformers directory (no config.json of a transformers model)",
                              hint=IMPORT_HINT)
    if not found:
        raise ConversionError(src / HF_CONFIG_FILE, "is not valid JSON", hint="Download it again")
    if (src / EXTRAS_FILE).is_file():
        return _import_exported(src, found, out_dir, overwrite, on_tensor, num_updates)
    return import_published(src, found, out_dir, overwrite=overwrite, on_tensor=on_tensor, num_updates=num_updates)


def _import_exported(src: Path, found: dict[str, Any], out_dir: str | Path, overwrite: bool,
                     on_tensor: Callable[[PendingTensor], None] | None, num_updates: int | None) -> Path:
    """A directory written by ``export --to hf``: the bundle it was exported from, with its current weights."""
    architectures = found.get("architectures") or [None]
    layout = layout_for_architecture(str(architectures[0]))
    if layout is None:
        raise ConversionError(src / HF_CONFIG_FILE, f"architecture {architectures[0]!r} is not one export --to hf "
                              "writes (HubertModel, HubertForCTC, Wav2Vec2Model, Wav2Vec2ForPreTraining, "
                              "Wav2Vec2ForCTC)", hint=f"It carries {EXTRAS_FILE}, which only `continue-pt export "
                                                      "--to hf` writes; remove that file to convert the model alone")
    metadata, extras = _read_extras(src)
    config = _stored_config(src / EXTRAS_FILE, metadata)
    if num_updates is not None and config.num_updates not in (None, num_updates):
        raise ConversionError(src / EXTRAS_FILE, f"records num_updates {config.num_updates}, --num-updates gives "
                              f"{num_updates}", hint="Leave out --num-updates: the exported bundle's count is kept")
    config.num_updates = num_updates if num_updates is not None else config.num_updates
    expected = hf_config(config, src / EXTRAS_FILE, encoder_only=layout.architecture == "Wav2Vec2Model")
    changed = _changed_options(found, expected)
    if changed:
        raise ConversionError(src / HF_CONFIG_FILE, changed, hint="The model was changed after its export; a bundle "
                              "can only be rebuilt for the architecture it was exported with")
    model_path = src / HF_MODEL_FILE
    try:
        hf_state = load_file(model_path)  # memory-mapped
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConversionError(model_path, f"is not a readable safetensors file ({exc})",
                              hint="Export the bundle again") from None
    model = _model_tensors(src, layout, config, hf_state, extras)
    fairseq_extras = [PendingTensor(name[len(FAIRSEQ_EXTRAS_PREFIX):], tuple(t.shape), t.dtype,
                                    lambda t=t: t.contiguous())
                      for name, t in extras.items() if name.startswith(FAIRSEQ_EXTRAS_PREFIX)]
    config.provenance = {**config.provenance,
                         "transformers_import": {"source_dir": src.name, "architecture": layout.architecture}}
    try:
        return write_bundle(out_dir, config, model, fairseq_extras, kmeans=_kmeans(metadata, extras),
                            overwrite=overwrite, on_tensor=on_tensor)
    except BundleError as exc:
        raise ConversionError(exc.path, exc.problems, hint=exc.hint) from None


def describe_hf_directory(src: str | Path) -> dict[str, Any]:
    """``continue-pt inspect`` of a transformers directory: its class, shape, and what the extras file keeps."""
    src = Path(src)
    found = read_hf_config(src) or {}
    facts: dict[str, Any] = {
        "what": "transformers directory",
        "architecture": (found.get("architectures") or [None])[0],
        "model_type": found.get("model_type"),
        "layers": found.get("num_hidden_layers"),
        "width": found.get("hidden_size"),
        "feat_extract_norm": found.get("feat_extract_norm"),
        "do_stable_layer_norm": found.get("do_stable_layer_norm"),
    }
    if weight_file(src) is not None:
        with read_hf_weights(src) as weights:  # a .bin through the allow-list reader, like convert
            facts["parameters"] = sum(_numel(t.shape) for t in weights.tensors.values())
            facts["weights"] = [p.name for p in weights.files]
    if (src / EXTRAS_FILE).is_file():
        metadata, extras = _read_extras(src)
        config = _stored_config(src / EXTRAS_FILE, metadata)
        facts["extras"] = sorted(extras)
        facts["bundle"] = {"family": config.family, "kind": config.kind, "num_updates": config.num_updates,
                           "source": config.provenance.get("source_file")}
        facts["use"] = "continue-pt convert DIR -o BUNDLE reads it back into the bundle it was exported from"
    else:
        facts["extras"] = None
        layout = IMPORT_LAYOUTS.get(str(facts["architecture"]))
        if layout is not None:
            facts["use"] = (f"continue-pt convert DIR -o BUNDLE makes a {layout.family} {layout.kind} bundle"
                            + (" (add --num-updates N: transformers does not record the updates trained)"
                               if layout.kind == "pretrain" else ""))
    preprocessor = src / "preprocessor_config.json"
    if preprocessor.is_file():
        try:
            facts["do_normalize"] = json.loads(preprocessor.read_text(encoding="utf-8")).get("do_normalize")
        except (UnicodeDecodeError, json.JSONDecodeError):
            facts["do_normalize"] = "unreadable preprocessor_config.json"
    return facts


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


__all__ = ["import_hf", "describe_hf_directory", "is_hf_directory", "read_hf_config"]
