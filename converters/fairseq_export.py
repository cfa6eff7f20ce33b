"""Bundle (or training ``.ckpt``) -> fairseq checkpoint ``.pt`` that fairseq's own loader reads.

The file is fairseq's current plain-dict ``cfg`` era: ``cfg`` is the configuration the bundle recorded from its
source checkpoint, ``model`` the state dict under fairseq's names (the reverse of the family's key map, derived from
the forward table), ``optimizer_history[-1]["num_updates"]`` the bundle's updates, and ``task_state`` the task's
dictionaries, so fairseq's task needs no ``dict.*.txt`` on disk. HuBERT's ``label_embs_concat`` is rebuilt in the
dictionary's row order with its special rows back in place. The pickle holds only dicts, lists, tensors and
primitives, plus the dictionaries as ``fairseq.data.dictionary.Dictionary`` (written as a class reference and a
state dict, without fairseq installed) so that fairseq builds its task from them and our allow-list reader reads
them back.

The file is streamed (:mod:`converters.torch_zip_writer`): the bundle's tensors are not loaded; each one's bytes are
copied from their span in the bundle's safetensors files into their record of torch's zip format, in the kernel as
``cp`` copies, so that memory does not grow with the model. Only ``label_embs_concat``, rebuilt from two small tensors,
is materialised. The file is byte for byte what ``torch.save`` writes for the same checkpoint held in memory.
"""

from __future__ import annotations

import copyreg
import pickle
import re
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from bundles.atomic import atomic_write
from bundles.config import MODEL_FILE, BundleConfig
from bundles.errors import BundleError, FileProblem
from bundles.loading import Bundle, load_bundle
from bundles.safetensors_stream import PendingTensor, pending_tensors_of

from .errors import ConversionError
from .families import data2vec2, hubert, wav2vec2
from .families.base import FEATURE_PROJECTION
from .families.reverse_map import ReverseKeyMap, reverse_key_map
from .torch_zip_writer import StreamedTensor, write_torch_zip

_FAMILIES: dict[str, ModuleType] = {"hubert": hubert, "wav2vec2": wav2vec2, "data2vec2": data2vec2}
_CRITERION_CLASS = {"hubert": "HubertCriterion", "wav2vec": "Wav2vecCriterion", "ctc": "CtcCriterion",
                    "model": "ModelCriterion"}
_RECONVERT = "Convert the fairseq checkpoint again with this version of continue-pt (`continue-pt convert`)"
LABEL_EMBEDDINGS = "logit_generator.label_embeddings"
NON_CLUSTER_ROWS = "label_embeddings_non_cluster"


# -- the pickle: plain data plus fairseq's Dictionary as a class reference ----------------------------------------

class FairseqDictionary:
    """Pickles as a ``fairseq.data.dictionary.Dictionary`` with ``state`` as its ``__dict__`` (no fairseq needed)."""

    def __init__(self, state: dict[str, Any]):
        self.state = state

    def __reduce_ex__(self, protocol: int) -> tuple:
        return copyreg.__newobj__, (type(self),), self.state


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its save_global can be overridden
    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is FairseqDictionary:
            self.write(pickle.GLOBAL + b"fairseq.data.dictionary\nDictionary\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def save_fairseq_file(checkpoint: dict[str, Any], path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
    """What ``torch.save`` (zip format, pickle protocol 2) writes with the pickler above, streamed: each
    :class:`StreamedTensor` is copied from its source when its record is written; ``on_bytes(n)`` after every write."""
    write_torch_zip(checkpoint, path, pickler=_Pickler, protocol=2, on_bytes=on_bytes)


# -- the state dict -------------------------------------------------------------------------------------------------

def _pick(candidates: list[str], encoder_args: dict[str, Any]) -> str:
    """The fairseq key among the reverse rules' candidates: the table's first (the published form), except for the
    conv front end's norm, whose fairseq place depends on ``extractor_mode`` (GroupNorm ``.2``; LayerNorm ``.2.1``)."""
    if encoder_args.get("extractor_mode") == "layer_norm":
        layer_norm = [c for c in candidates if ".2.1." in c]
        if layer_norm:
            return layer_norm[0]
    return candidates[0]


def _candidates(reverse: ReverseKeyMap, key: str) -> list[str]:
    return [re.fullmatch(p, key).expand(t) for p, t in reverse.rules if re.fullmatch(p, key)]


def bundle_tensors(bundle: Bundle, role: str) -> dict[str, PendingTensor]:
    """The tensors of the bundle's ``role`` file (``model``, ``fairseq_extras``), unread: where each one's bytes lie.
    A file that cannot be parsed, or ends before a tensor's bytes do, is a :class:`BundleError`."""
    name = bundle.config.files.get(role) or (MODEL_FILE if role == "model" else None)
    if not name:
        return {}
    path = bundle.path / name
    try:
        pending = pending_tensors_of(path)
        size = path.stat().st_size
    except (OSError, ValueError, KeyError, struct.error, UnicodeDecodeError) as exc:  # ValueError: broken JSON
        raise BundleError(path, f"not a readable safetensors file ({exc})", hint="Re-create the bundle") from None
    short = [k for k, t in pending.items() if t.source_span is not None and t.source_span[1] + t.nbytes > size]
    if short:
        raise BundleError(path, f"ends inside the data of {len(short)} tensor(s), e.g. {short[:3]} (is it truncated?)",
                          hint="Re-create the bundle")
    return pending


def fairseq_state_dict(bundle: Bundle, problems: list[str]) -> dict[str, Any]:
    """The fairseq model's state dict from the bundle's tensors, unread (every unmappable tensor goes to
    ``problems``); :class:`StreamedTensor` values, and for data2vec 2.0 the dict ``"_ema"`` of them."""
    config = bundle.config
    family = _FAMILIES[config.family]
    reverse = reverse_key_map(family.CTC_KEY_MAP if config.kind == "ctc" else family.PRETRAIN_KEY_MAP)
    identity_projection = "identity_feature_projection" in config.provenance
    state: dict[str, StreamedTensor] = {}
    tensors = bundle_tensors(bundle, "model")
    for key, tensor in tensors.items():
        if identity_projection and FEATURE_PROJECTION + "projection." in key:
            continue  # derived by the converter; fairseq has no post_extract_proj here
        if key == LABEL_EMBEDDINGS and config.family == "hubert":
            continue  # rebuilt below in the dictionary's row order
        candidates = _candidates(reverse, key)
        if not candidates:
            problems.append(f"no fairseq name for the bundle tensor {key!r}")
            continue
        name = _pick(candidates, config.encoder_args)
        state[name] = StreamedTensor(replace(tensor, name=name))
    extras = bundle_tensors(bundle, "fairseq_extras")
    if config.family == "hubert" and config.kind == "pretrain":
        specials = extras.get(NON_CLUSTER_ROWS)
        clusters = tensors.get(LABEL_EMBEDDINGS)
        if clusters is None:
            problems.append(f"it has no label embeddings ({LABEL_EMBEDDINGS})")
        else:  # two small tensors (K x final_dim): read, and the rows put in fairseq's order
            embs = _label_embs_concat(config, clusters.produce(), None if specials is None else specials.produce(),
                                      problems)
            if embs is not None:
                state["label_embs_concat"] = StreamedTensor(
                    PendingTensor("label_embs_concat", tuple(embs.shape), embs.dtype, lambda: embs))
    if config.kind == "ctc":
        kept = {k: StreamedTensor(v) for k, v in extras.items() if k != NON_CLUSTER_ROWS}
        if not kept and family.CTC_KEY_MAP.drops:
            problems.append("it keeps none of the fine-tuned checkpoint's tensors that the CTC model has no slot for "
                            "(mask_emb), which fairseq's loader needs")
        state.update(kept)
    return _nested(state, getattr(family, "NESTED_STATE_KEYS", ()))


def _nested(state: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Tensors under ``prefix.`` gathered into the dict ``state[prefix]``, as fairseq keeps them (data2vec 2.0's EMA
    teacher is ``model["_ema"]``, a dict of tensors)."""
    for prefix in prefixes:
        inner = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if inner:
            state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
            state[prefix] = inner
    return state


def _streamed(value: Any) -> list[StreamedTensor]:
    """Every tensor of a (nested) state dict."""
    if isinstance(value, dict):
        return [t for v in value.values() for t in _streamed(v)]
    return [value]


def _label_embs_concat(config: BundleConfig, clusters: Tensor, specials: Tensor | None,
                       problems: list[str]) -> Tensor | None:
    """fairseq's ``label_embs_concat``: row ``cluster_rows[c]`` is cluster ``c``, the other rows the specials."""
    labels = config.label_dictionary or {}
    symbols, rows = labels.get("source_symbols"), labels.get("cluster_rows")
    missing = set(labels.get("missing_clusters") or [])
    if not isinstance(symbols, list) or not isinstance(rows, list) or len(rows) != clusters.shape[0]:
        problems.append("its label_dictionary does not describe the label embeddings' rows")
        return None
    present = {rows[c] for c in range(len(rows)) if c not in missing}
    others = [r for r in range(len(symbols)) if r not in present]
    if specials is None or specials.shape[0] != len(others):
        problems.append(f"fairseq_extras.safetensors should hold the {len(others)} non-cluster label embedding rows "
                        f"({[symbols[r] for r in others]})")
        return None
    out = torch.empty(len(symbols), clusters.shape[1], dtype=clusters.dtype)
    out[others] = specials.to(clusters.dtype)
    for c, row in enumerate(rows):
        if c not in missing:
            out[row] = clusters[c]
    return out


# -- config and task state ------------------------------------------------------------------------------------------

def _dictionary_state(symbols: list[str]) -> dict[str, Any]:
    """A fairseq ``Dictionary``'s state for ``symbols`` (the four specials first), as ``Dictionary()`` makes it."""
    return {"bos_word": "<s>", "unk_word": "<unk>", "pad_word": "<pad>", "eos_word": "</s>", "symbols": list(symbols),
            "count": [1] * len(symbols), "indices": {s: i for i, s in enumerate(symbols)}, "bos_index": 0,
            "pad_index": 1, "eos_index": 2, "unk_index": 3, "nspecial": 4}


def fairseq_task_state(config: BundleConfig) -> dict[str, Any]:
    """``task_state``: the dictionaries the source checkpoint had; HuBERT's rebuilt from the bundle's label
    dictionary when training changed it (a re-initialised label head of another K)."""
    stored = config.provenance.get("fairseq_task_state")
    stored = dict(stored) if isinstance(stored, dict) else {}
    if config.family == "hubert" and config.kind == "pretrain":
        symbols = (config.label_dictionary or {}).get("source_symbols") or []
        previous = (stored.get("dictionaries") or [None])[0]
        if not isinstance(previous, dict) or previous.get("symbols") != symbols:
            previous = _dictionary_state(symbols)
        stored["dictionaries"] = [previous]
    out: dict[str, Any] = {}
    for key, value in stored.items():
        out[key] = [FairseqDictionary(v) for v in value] if isinstance(value, list) else FairseqDictionary(value)
    return out


def fairseq_checkpoint_dict(bundle: Bundle, problems: list[str]) -> dict[str, Any]:
    config = bundle.config
    cfg = config.provenance.get("fairseq_config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        problems.append("its provenance has no fairseq configuration (provenance.fairseq_config)")
    state = fairseq_state_dict(bundle, problems)
    criterion = (cfg or {}).get("criterion") or {}
    num_updates = int(config.num_updates or 0)
    return {
        "args": None,
        "cfg": cfg,
        "model": state,
        "criterion": None,
        "optimizer_history": [{"criterion_name": _CRITERION_CLASS.get(criterion.get("_name"), "unknown"),
                               "optimizer_name": "none (exported by continue-pt)", "lr_scheduler_state": {},
                               "num_updates": num_updates}],
        "task_state": fairseq_task_state(config),
        # fairseq ignores it; `continue-pt inspect` says where the file came from
        "extra_state": {"exported_by": f"continue-pt export --to fairseq from {bundle.path.name}"},
        "last_optimizer_state": None,
    }


# -- entry point ----------------------------------------------------------------------------------------------------

def export_fairseq(src: str | Path, out: str | Path, *, overwrite: bool = False,
                   on_progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the bundle ``src`` as a fairseq checkpoint ``out`` (atomically; a training ``.ckpt`` goes through
    ``continue_pt.export.bundle_of`` first, in the CLI).

    ``on_progress(bytes_written, bytes_expected)`` is called as the file is written (for a progress bar).

    Raises :class:`~bundles.errors.FileProblem` subclasses naming the file, the problem and what to do."""
    src, out = Path(src), Path(out)
    if out.is_dir():
        raise ConversionError(out, "is a directory", hint="Pass the path of the .pt file to write")
    if out.exists() and not overwrite:
        raise ConversionError(out, "already exists", hint="Choose another output file or pass --overwrite")
    if not src.exists():
        raise ConversionError(src, "no such bundle or training checkpoint", hint="Check the path")
    if src.is_file():
        raise ConversionError(src, "is a file, not a bundle directory",
                              hint="For a training checkpoint use `continue-pt export CKPT --to fairseq -o OUT` "
                                   "(it makes the bundle first)")
    bundle = load_bundle(src)
    if "fairseq_config" not in bundle.config.provenance and bundle.kind == "encoder":  # e.g. a torchaudio .pth
        raise ConversionError(src, "is an encoder without heads and without a fairseq configuration (converted from "
                              "a torchaudio state dict): fairseq has no model class it fits",
                              hint="Use it as it is (load_bundle(...).get_model(), or as a --teacher), or continue "
                                   "pre-training from it (HuBERT: --reinit-label-head with --kmeans)")
    if bundle.family not in _FAMILIES:
        raise ConversionError(src, f"is a {bundle.family} bundle; export to fairseq is implemented for "
                              f"{sorted(_FAMILIES)}",
                              hint="The fairseq checkpoint it was converted from is the fairseq form; use the bundle "
                                   "with load_bundle(...) otherwise")
    problems: list[str] = []
    checkpoint = fairseq_checkpoint_dict(bundle, problems)
    if problems:
        raise ConversionError(src, problems, hint=_RECONVERT)
    size = sum(t.pending.nbytes for t in _streamed(checkpoint["model"]))
    written = [0]

    def count(n: int) -> None:
        written[0] += n
        on_progress(written[0], size)

    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(out, lambda tmp: save_fairseq_file(checkpoint, tmp, count if on_progress else None),
                            needed=size)
    except FileProblem:
        raise
    except ValueError as exc:  # a bundle file changed under us: it ends inside a tensor's bytes
        raise BundleError(src, str(exc), hint="Re-create the bundle") from None
    except OSError as exc:
        raise ConversionError(out, f"could not be written ({exc.strerror or exc})",
                              hint="Check free disk space and permissions") from None


__all__ = ["FairseqDictionary", "bundle_tensors", "export_fairseq", "fairseq_checkpoint_dict", "fairseq_state_dict",
           "fairseq_task_state", "save_fairseq_file"]
