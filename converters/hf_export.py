"""Bundle (or training ``.ckpt``) -> a transformers directory: ``config.json``, ``model.safetensors``,
``preprocessor_config.json`` and, where transformers has no slot for something, ``continue_pt_extras.safetensors``.

Which class it is written for (see :data:`converters.hf_layout.LAYOUTS`): HuBERT pre-training -> ``HubertModel``
(the head and the k-means in the extras file), HuBERT CTC -> ``HubertForCTC``, wav2vec 2.0 pre-training ->
``Wav2Vec2ForPreTraining`` (quantizer, ``project_q``, ``project_hid``, ``masked_spec_embed``), wav2vec 2.0 CTC ->
``Wav2Vec2ForCTC``. Every tensor is renamed by the data table of :mod:`converters.hf_layout` or refused: nothing
transformers would have to initialise at random is ever written. transformers itself is not imported.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors import safe_open

from bundles.atomic import dir_mode, disk_full
from bundles.config import MODEL_FILE, BundleConfig
from bundles.errors import BundleError
from bundles.loading import Bundle, load_bundle
from bundles.safetensors_stream import PendingTensor, pending_tensors_of, write_safetensors_streaming
from bundles.writing import swap_into_place

from .errors import ConversionError
from .hf_layout import (EXTRAS_FILE, EXTRAS_FORMAT, EXTRAS_FORMAT_VERSION, FAIRSEQ_EXTRAS_PREFIX, KMEANS_TENSOR,
                        bundle_key_to_hf, layout_for)

HF_CONFIG_FILE = "config.json"
HF_MODEL_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"
VOCAB_FILE = "vocab.json"
TOKENIZER_FILE = "tokenizer_config.json"

# encoder_args key -> how it reads in a transformers config; an encoder_args key missing here has no
# transformers equivalent and the export is refused (naming it).
_HANDLED_ENCODER_ARGS = {
    "extractor_mode", "extractor_conv_layer_config", "extractor_conv_bias", "encoder_embed_dim",
    "encoder_projection_dropout", "encoder_pos_conv_kernel", "encoder_pos_conv_groups", "encoder_num_layers",
    "encoder_num_heads", "encoder_attention_dropout", "encoder_ff_interm_features", "encoder_ff_interm_dropout",
    "encoder_dropout", "encoder_layer_norm_first", "encoder_layer_drop", "aux_num_out",
}
_EXTRACTOR_NORM = {"group_norm": "group", "layer_norm": "layer"}
_WAV2VEC2_PRETRAIN_ARGS = {"extractor_dim", "encoder_embed_dim", "final_dim", "latent_vars", "latent_groups",
                           "codevector_dim", "latent_temp"}


def hf_config(config: BundleConfig, path: Path = Path("config.json"), encoder_only: bool = False) -> dict[str, Any]:
    """The transformers ``config.json`` for ``config`` (read from ``path``); ConversionError listing every option
    it cannot hold."""
    problems = unsupported_options(config)
    if problems:
        raise ConversionError(path, problems, hint=_REFUSAL_HINT)
    enc = config.encoder_args
    layout = layout_for(config.family, config.kind, encoder_only)
    conv = [list(layer) for layer in enc["extractor_conv_layer_config"]]
    out: dict[str, Any] = {
        "architectures": [layout.architecture],
        "model_type": layout.model_type,
        "hidden_size": enc["encoder_embed_dim"],
        "num_hidden_layers": enc["encoder_num_layers"],
        "num_attention_heads": enc["encoder_num_heads"],
        "intermediate_size": enc["encoder_ff_interm_features"],
        "hidden_act": "gelu",
        "hidden_dropout": enc["encoder_dropout"],
        "activation_dropout": enc["encoder_ff_interm_dropout"],
        "attention_dropout": enc["encoder_attention_dropout"],
        "feat_proj_dropout": enc["encoder_projection_dropout"],
        "layerdrop": enc["encoder_layer_drop"],
        "layer_norm_eps": 1e-5,  # torch's LayerNorm/GroupNorm default, which torchaudio's modules use
        "feat_extract_norm": _EXTRACTOR_NORM[enc["extractor_mode"]],
        "feat_extract_activation": "gelu",
        "conv_dim": [c for c, _, _ in conv],
        "conv_kernel": [k for _, k, _ in conv],
        "conv_stride": [s for _, _, s in conv],
        "conv_bias": bool(enc["extractor_conv_bias"]),
        "num_feat_extract_layers": len(conv),
        "num_conv_pos_embeddings": enc["encoder_pos_conv_kernel"],
        "num_conv_pos_embedding_groups": enc["encoder_pos_conv_groups"],
        "conv_pos_batch_norm": False,
        "do_stable_layer_norm": bool(enc["encoder_layer_norm_first"]),
    }
    if layout.model_type == "hubert":
        out["feat_proj_layer_norm"] = True  # torchaudio's feature projection always normalises first
    if config.kind == "ctc":
        out["vocab_size"] = enc["aux_num_out"]
        if ctc_vocabulary(config) is not None:  # row 0 is the CTC blank: transformers' pad token
            vocab = ctc_vocabulary(config)
            out.update({"pad_token_id": 0, "bos_token_id": vocab.get("<s>"), "eos_token_id": vocab.get("</s>")})
        # A fine-tuned bundle keeps no mask embedding (fairseq's CTC model drops it): transformers creates
        # masked_spec_embed only when SpecAugment is on, so it is off rather than initialised at random.
        out["mask_time_prob"] = 0.0
        out["mask_feature_prob"] = 0.0
        out["apply_spec_augment"] = False
    else:
        # The pre-training bundles hold a mask embedding: transformers keeps it as masked_spec_embed, which exists
        # only while its SpecAugment's time masking is on. That masking is transformers' fine-tuning augmentation, so
        # it keeps transformers' default rate rather than pre-training's (HuBERT's 0.8 would mask most of every
        # utterance while fine-tuning); pre-training's masking stays in the bundle configuration of the extras file.
        out["mask_time_prob"] = 0.05
        out["mask_time_length"] = 10
    if layout.architecture == "Wav2Vec2ForPreTraining":
        pre = config.pretrain_args
        objective = config.objective or {}
        out.update({"num_codevectors_per_group": pre["latent_vars"], "num_codevector_groups": pre["latent_groups"],
                    "codevector_dim": pre["codevector_dim"], "proj_codevector_dim": pre["final_dim"]})
        # The contrastive loss of Wav2Vec2ForPreTraining, with the checkpoint's settings where it has them.
        loss_weights = (objective.get("criterion") or {}).get("loss_weights") or []
        for hf_name, value in (("num_negatives", objective.get("num_negatives")),
                               ("contrastive_logits_temperature", objective.get("logit_temp")),
                               ("feat_quantizer_dropout", objective.get("dropout_features")),
                               ("diversity_loss_weight", loss_weights[0] if loss_weights else None)):
            if value is not None:
                out[hf_name] = value
    return out


_REFUSAL_HINT = ("transformers cannot hold this model without losing or re-initialising weights; keep using "
                 "the bundle (or export --to fairseq)")


def unsupported_options(config: BundleConfig) -> list[str]:
    """Every option of ``config`` a transformers model cannot reproduce, said as what differs."""
    problems = []
    if (config.family, config.kind) not in {("hubert", "pretrain"), ("hubert", "ctc"), ("wav2vec2", "pretrain"),
                                             ("wav2vec2", "ctc")}:
        return [f"family {config.family!r} / kind {config.kind!r} has no transformers class"]
    enc = config.encoder_args
    for key in sorted(set(enc) - _HANDLED_ENCODER_ARGS):
        problems.append(f"encoder option {key}={enc[key]!r} has no transformers equivalent")
    if enc.get("extractor_mode") not in _EXTRACTOR_NORM:
        problems.append(f"extractor_mode={enc.get('extractor_mode')!r}: transformers' feat_extract_norm has only "
                        f"'group' (torchaudio 'group_norm') and 'layer' (torchaudio 'layer_norm')")
    layers = enc.get("extractor_conv_layer_config") or []
    if not layers or any(len(layer) != 3 for layer in layers):
        problems.append(f"extractor_conv_layer_config={layers!r} is not a list of (channels, kernel, stride)")
    if config.kind == "ctc" and not enc.get("aux_num_out"):
        problems.append("a CTC bundle without aux_num_out (its vocabulary size)")
    if config.family == "wav2vec2" and config.kind == "pretrain":
        pre = config.pretrain_args or {}
        for key in sorted(set(pre) - _WAV2VEC2_PRETRAIN_ARGS):
            problems.append(f"wav2vec 2.0 pre-training option {key}={pre[key]!r} has no transformers equivalent")
        if layers and len(layers[-1]) == 3 and pre.get("extractor_dim") != layers[-1][0]:
            problems.append(f"the quantizer reads {pre.get('extractor_dim')} features; transformers' reads the "
                            f"last convolution's {layers[-1][0]}")
    return problems


def ctc_vocabulary(config: BundleConfig) -> dict[str, int] | None:
    """vocab.json of a CTC bundle that kept its fairseq dictionary: symbol -> output row. fairseq's CTC blank is
    row 0 (``<s>``), transformers' is its pad token, so rows 0 and ``<pad>``'s swap names (as transformers' own
    fairseq conversion does); the rows, and so the weights, stay where they are."""
    symbols = list((config.label_dictionary or {}).get("ctc_symbols") or [])
    if config.kind != "ctc" or len(symbols) != config.encoder_args.get("aux_num_out") or \
            len(set(symbols)) != len(symbols):
        return None
    if "<pad>" in symbols:
        pad = symbols.index("<pad>")
        symbols[0], symbols[pad] = symbols[pad], symbols[0]
    return {symbol: row for row, symbol in enumerate(symbols)}


def tokenizer_config(vocab: dict[str, int]) -> dict[str, Any]:
    """transformers' ``Wav2Vec2CTCTokenizer`` for ``vocab`` (fairseq's letter dictionaries use ``|`` between words)."""
    names = {v: k for k, v in vocab.items()}
    return {"tokenizer_class": "Wav2Vec2CTCTokenizer", "pad_token": names[0],
            "unk_token": "<unk>" if "<unk>" in vocab else names[0],
            "bos_token": "<s>" if "<s>" in vocab else None, "eos_token": "</s>" if "</s>" in vocab else None,
            "word_delimiter_token": "|" if "|" in vocab else None, "do_lower_case": False}


def preprocessor_config(config: BundleConfig) -> dict[str, Any]:
    """transformers' ``Wav2Vec2FeatureExtractor`` settings: normalise per utterance where fairseq did
    (``task.normalize``); the models that normalise take an attention mask, as transformers' own cards say."""
    return {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor",
        "feature_size": 1,
        "sampling_rate": config.sample_rate,
        "padding_value": 0.0,
        "padding_side": "right",
        "do_normalize": bool(config.normalize_waveform),
        "return_attention_mask": config.encoder_args.get("extractor_mode") == "layer_norm",
    }


def _unread_tensors(path: Path) -> dict[str, PendingTensor]:
    """The tensors of one of the bundle's safetensors files, unread; a missing or broken file is a BundleError."""
    try:
        return pending_tensors_of(path)
    except (OSError, ValueError, KeyError, struct.error) as exc:  # ValueError covers a broken JSON header
        raise BundleError(path, f"not a readable safetensors file ({exc})", hint="Re-create the bundle") from None


def plan_hf_tensors(bundle: Bundle, encoder_only: bool = False
                    ) -> tuple[list[PendingTensor], list[PendingTensor], dict[str, str]]:
    """(tensors of ``model.safetensors``, of the extras file, bundle key -> where it went). Every bundle tensor
    is placed or the export is refused naming those that have no place."""
    layout = layout_for(bundle.family, bundle.kind, encoder_only)
    # The tensors are only renamed: each is copied from its span in the bundle's file (in the kernel, as `cp`
    # does), never held in memory.
    state = _unread_tensors(bundle.path / (bundle.config.files.get("model") or MODEL_FILE))
    model: list[PendingTensor] = []
    extras: list[PendingTensor] = []
    placed: dict[str, str] = {}
    unplaced = []
    for key, tensor in state.items():
        target = bundle_key_to_hf(layout, key)
        if target is None:
            unplaced.append(key)
            continue
        where, name = target
        (model if where == "model" else extras).append(replace(tensor, name=name))
        placed[key] = f"{where}:{name}"
    if unplaced:
        raise ConversionError(bundle.path, f"tensors with no place in {layout.architecture}: {sorted(unplaced)[:8]}",
                              hint=_REFUSAL_HINT)
    extras_file = bundle.config.files.get("fairseq_extras")
    if extras_file:
        for key, tensor in _unread_tensors(bundle.path / extras_file).items():
            extras.append(replace(tensor, name=FAIRSEQ_EXTRAS_PREFIX + key))
    if bundle.has_kmeans:
        centroids = bundle.get_kmeans().centroids
        extras.append(PendingTensor(KMEANS_TENSOR, tuple(centroids.shape), centroids.dtype, lambda: centroids))
    return model, extras, placed


def _extras_metadata(bundle: Bundle) -> dict[str, str]:
    meta = {"format": EXTRAS_FORMAT, "format_version": str(EXTRAS_FORMAT_VERSION),
            "bundle_config": bundle.config.to_json()}
    if bundle.has_kmeans:
        km = bundle.get_kmeans()
        meta["kmeans"] = json.dumps({"layer": km.layer, "metadata": km.metadata})
    return meta


def export_bundle_hf(bundle_dir: str | Path, out_dir: str | Path, overwrite: bool = False,
                     on_tensor: Callable[[PendingTensor], None] | None = None, encoder_only: bool = False) -> Path:
    """Write the bundle at ``bundle_dir`` as a transformers directory ``out_dir`` (atomically)."""
    bundle = load_bundle(bundle_dir)
    config = hf_config(bundle.config, bundle.path / "config.json", encoder_only)
    model, extras, _ = plan_hf_tensors(bundle, encoder_only)
    vocab = ctc_vocabulary(bundle.config)
    tokenizer: dict[str, Callable[[Path], object]] = {} if vocab is None else {
        VOCAB_FILE: lambda p: p.write_text(json.dumps(vocab, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"),
        TOKENIZER_FILE: lambda p: p.write_text(json.dumps(tokenizer_config(vocab), indent=2) + "\n",
                                               encoding="utf-8"),
    }
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ConversionError(out_dir, "already exists", hint="Choose another output directory or pass --overwrite")
    _write_directory(out_dir, {
        HF_CONFIG_FILE: lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"),
        PREPROCESSOR_FILE: lambda p: p.write_text(json.dumps(preprocessor_config(bundle.config), indent=2) + "\n",
                                                  encoding="utf-8"),
        HF_MODEL_FILE: lambda p: write_safetensors_streaming(p, model, {"format": "pt"}, on_tensor=on_tensor),
        # Always written: besides HuBERT's head it carries the bundle's config.json, so `convert` restores
        # everything transformers' config has no field for (objective, provenance, num_updates, temperatures).
        EXTRAS_FILE: lambda p: write_safetensors_streaming(p, extras, _extras_metadata(bundle), on_tensor=on_tensor),
        **tokenizer,
    }, needed=sum(t.nbytes for t in model + extras))
    return out_dir


def export_hf(src: str | Path, out_dir: str | Path, overwrite: bool = False,
              on_tensor: Callable[[PendingTensor], None] | None = None, encoder_only: bool = False) -> Path:
    """``continue-pt export SRC --to hf -o OUT``: SRC is a bundle directory (a training ``.ckpt`` goes through
    ``continue_pt.export.bundle_of`` first, in the CLI). Returns ``out_dir``. Refusals are :class:`ConversionError` / :class:`BundleError`.

    ``on_tensor`` is called after each tensor is written (a progress bar's update). ``encoder_only`` writes a
    wav2vec 2.0 pre-training bundle for transformers' bare ``Wav2Vec2Model`` (the heads then go to the extras
    file) instead of ``Wav2Vec2ForPreTraining``."""
    src = Path(src)
    if not src.exists():
        raise ConversionError(src, "no such bundle directory",
                              hint="Pass a bundle directory (or, to the CLI, a .ckpt written by `continue-pt pretrain`)")
    if not src.is_dir():
        raise ConversionError(src, "is a file, not a bundle directory",
                              hint="For a training checkpoint use `continue-pt export CKPT --to hf -o OUT` (it makes "
                                   "the bundle first)")
    return export_bundle_hf(src, out_dir, overwrite=overwrite, on_tensor=on_tensor, encoder_only=encoder_only)


def export_bytes(src: str | Path) -> int:
    """The tensor bytes :func:`export_hf` writes for ``src`` (a progress bar's total, fed by ``on_tensor``'s
    ``t.nbytes``): those of the bundle's safetensors files, or about the training checkpoint's size."""
    src = Path(src)
    if not src.is_dir():
        return src.stat().st_size if src.is_file() else 0
    total = 0
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                total += math.prod(tensor.get_shape()) * _DTYPE_BYTES.get(tensor.get_dtype(), 4)
    return total


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _write_directory(out_dir: Path, writers: dict[str, Callable[[Path], object]], needed: int) -> None:
    """Each file written into a temporary sibling, which is renamed into place only when all are complete.
    ``needed``: about the bytes of the whole directory (said when the disk is full)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    os.chmod(tmp, dir_mode())
    try:
        for name, write in writers.items():
            try:
                write(tmp / name)
            except OSError as exc:
                full = disk_full(out_dir / name, exc, needed)
                if full is not None:
                    raise full from None
                raise ConversionError(out_dir / name, f"could not be written ({exc.strerror or exc})",
                                      hint="Check free disk space and permissions") from None
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


__all__ = ["export_hf", "export_bundle_hf", "export_bytes", "hf_config", "unsupported_options", "preprocessor_config",
           "plan_hf_tensors"]
