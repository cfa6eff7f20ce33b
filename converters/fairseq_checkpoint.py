"""Read a fairseq checkpoint of any pickle era into plain Python data, without fairseq and without running it.

The eras: up to Oct 2020 ``args`` is an ``argparse.Namespace``; Oct 2020 to
Mar 2021 ``cfg`` is a pickled omegaconf ``DictConfig``; later ``cfg`` is a plain dict that may still hold
fairseq enum members. HuBERT's ``task_state`` holds pickled ``fairseq.data.Dictionary`` objects. Every
global those files use is mapped to a stand-in in :data:`FAIRSEQ_GLOBALS`; anything else is refused.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .safe_pickle import PickledObject, TypeReference, pickled_bytes, stub_class
from .torch_file import TORCH_GLOBALS, LazyTensor, TorchFile, open_torch_file


def _defaultdict(*_args: Any) -> dict:
    # omegaconf metadata carries an empty ``defaultdict(dict)`` resolver cache; its factory does not matter.
    return {}


def _enum_member(value: Any) -> str:
    # fairseq's ChoiceEnum members pickle as ``Choices(value)``; their value is the option string.
    return value


_OMEGACONF_CLASSES = [
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata",
    *(f"omegaconf.nodes.{n}" for n in
      ["AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "EnumNode", "BytesNode", "PathNode",
       "ValueNode", "InterpolationResultNode"]),
]
_BUILTIN_TYPES = ["dict", "list", "tuple", "set", "int", "long", "float", "str", "unicode", "bytes", "bool",
                  "object", "NoneType"]

def _size(*dims: Any) -> tuple:
    return tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)


# Training bookkeeping (``extra_state["metrics"]``, optimizer state) can hold numpy scalars and arrays. The
# converter never uses them, so they become inert records: parsed, never built.
_NUMPY_RECORDS = [f"{mod}.{name}" for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for name in ("scalar", "_reconstruct")] + ["numpy.dtype", "numpy.ndarray"]

FAIRSEQ_GLOBALS: dict[str, Any] = {
    **TORCH_GLOBALS,
    "argparse.Namespace": stub_class("argparse.Namespace"),
    "fairseq.data.dictionary.Dictionary": stub_class("fairseq.data.dictionary.Dictionary"),
    "fairseq.dataclass.constants.Choices": _enum_member,
    "collections.defaultdict": _defaultdict,
    "torch.Size": _size,
    "_codecs.encode": pickled_bytes,
    **{name: stub_class(name) for name in _NUMPY_RECORDS},
    "typing.Any": TypeReference("typing.Any"),
    **{name: stub_class(name) for name in _OMEGACONF_CLASSES},
    # protocol 2 names builtins "__builtin__.*"; protocol 3+ "builtins.*". Only ever used as values here.
    **{f"{mod}.{t}": TypeReference(f"builtins.{t}") for mod in ("__builtin__", "builtins") for t in _BUILTIN_TYPES},
}


@dataclass
class LabelDictionary:
    """The parts of a pickled ``fairseq.data.Dictionary`` that matter: its symbols in row order."""

    symbols: list[str]
    nspecial: int
    unk_index: int
    state: dict[str, Any] = field(default_factory=dict)
    """The pickled object's whole state (counts, indices, special words), kept so an export can write it back."""


@dataclass
class FairseqCheckpoint:
    """A fairseq checkpoint as plain data. ``state`` values are :class:`LazyTensor` (read on demand)."""

    path: Path
    era: str  # "namespace" | "dictconfig" | "dict"
    cfg: dict[str, Any]  # {"model": {...}, "task": {...}, ...} in every era
    state: dict[str, LazyTensor]
    num_updates: int | None
    dictionaries: list[LabelDictionary] = field(default_factory=list)
    file: TorchFile | None = None
    task_state_key: str | None = None
    exported_by: str | None = None
    """``extra_state["exported_by"]`` of a file `continue-pt export --to fairseq` wrote (fairseq ignores it)."""
    """Where ``task_state`` kept the dictionaries: ``"dictionaries"`` (a list) or ``"target_dictionary"`` (one)."""

    def close(self) -> None:
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> "FairseqCheckpoint":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- stand-ins -> plain data ----------------------------------------------------------------------------

def _is(obj: Any, name: str) -> bool:
    return isinstance(obj, PickledObject) and obj.pickled_name == name


def to_plain(obj: Any) -> Any:
    """Turn stand-ins (Namespace, DictConfig, nodes, enums) into dicts, lists and scalars."""
    if isinstance(obj, PickledObject):
        name = obj.pickled_name
        state = obj.state if isinstance(obj.state, dict) else {}
        if name == "argparse.Namespace":
            return {k: to_plain(v) for k, v in state.items()}
        if name in ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig"):
            content = state.get("_content")
            if isinstance(content, dict):
                return {str(k): to_plain(v) for k, v in content.items()}
            if isinstance(content, list):
                return [to_plain(v) for v in content]
            return content  # None, "???" (missing) or an interpolation string
        if name.startswith("omegaconf.nodes."):
            return to_plain(state.get("_val"))
        return obj  # other stubs (Dictionary) stay as they are
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, TypeReference):
        return obj.pickled_name
    return obj


def _label_dictionary(obj: Any) -> LabelDictionary | None:
    if not _is(obj, "fairseq.data.dictionary.Dictionary") or not isinstance(obj.state, dict):
        return None
    state = obj.state
    symbols = state.get("symbols")
    if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
        return None
    return LabelDictionary(symbols=list(symbols), nspecial=int(state.get("nspecial", 4)),
                           unk_index=int(state.get("unk_index", 3)), state=to_plain(dict(state)))


def _namespace_to_cfg(args: dict[str, Any]) -> dict[str, Any]:
    """Old checkpoints keep every option flat in ``args``; give them the ``model``/``task`` layout of later eras.

    The flat namespace holds the model options and the task options side by side, so both sections get
    the whole namespace, with ``_name`` set from ``arch`` and ``task`` as fairseq's own conversion does.
    """
    model = dict(args)
    model["_name"] = args.get("arch")
    if isinstance(args.get("w2v_args"), dict):
        model["w2v_args"] = _namespace_to_cfg(args["w2v_args"])
    task = dict(args)
    task["_name"] = args.get("task")
    criterion: dict[str, Any] = {"_name": args.get("criterion")}
    for name in _CRITERION_OPTIONS:
        if args.get(name) is not None:
            criterion[name] = _literal(args[name])
    return {"model": model, "task": task, "criterion": criterion}


# The criterion options continued pre-training reads (loss weights of the extra terms, HuBERT's term weights).
_CRITERION_OPTIONS = ("loss_weights", "infonce", "log_keys", "pred_masked_weight", "pred_nomask_weight")


def _literal(value: Any) -> Any:
    """Pre-Hydra fairseq kept list options as the command-line string (``--loss-weights '[0.1, 10]'``) and
    ``eval``-ed it in the criterion; read it as a Python literal (``ast.literal_eval``: data only, nothing runs)."""
    if isinstance(value, str) and value.strip().startswith(("[", "(")):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _num_updates(raw: dict[str, Any]) -> int | None:
    history = raw.get("optimizer_history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        value = history[-1].get("num_updates")
        if isinstance(value, int):
            return value
    extra = raw.get("extra_state")
    if isinstance(extra, dict) and isinstance(extra.get("num_updates"), int):
        return extra["num_updates"]
    return None


def read_fairseq_checkpoint(path: str | Path) -> FairseqCheckpoint:
    """Read ``path`` safely. Raises :class:`ConversionError` naming the file, the problem and what to do."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(path, "no such file", hint="Check the path")
    if path.is_dir():
        raise ConversionError(path, "is a directory, not a checkpoint file",
                              hint="Pass the .pt file (to read a bundle, use load_bundle)")
    if path.stat().st_size == 0:
        raise ConversionError(path, "the file is empty", hint="Download it again")
    file = open_torch_file(
        path, FAIRSEQ_GLOBALS, what="PyTorch checkpoint",
        refused_hint="This kit reads fairseq checkpoints without running pickled code; a checkpoint that needs "
                     "other code is either not a fairseq HuBERT/wav2vec 2.0 checkpoint or has been tampered with",
        unreadable_hint="Is it a complete fairseq .pt file? Download it again")
    try:
        return _interpret(path, file)
    except BaseException:
        file.close()
        raise


def _interpret(path: Path, file: TorchFile) -> FairseqCheckpoint:
    raw = file.obj
    if not isinstance(raw, dict) or "model" not in raw or not isinstance(raw["model"], dict):
        raise ConversionError(path, "a PyTorch file, but not a fairseq checkpoint (no 'model' state dict)",
                              hint="Pass a fairseq checkpoint (.pt) of a HuBERT or wav2vec 2.0 model")
    if raw.get("cfg") is not None:
        cfg_obj = raw["cfg"]
        era = "dictconfig" if _is(cfg_obj, "omegaconf.dictconfig.DictConfig") else "dict"
        cfg = to_plain(cfg_obj)
    elif raw.get("args") is not None:
        era = "namespace"
        args = to_plain(raw["args"])
        cfg = _namespace_to_cfg(args) if isinstance(args, dict) else None
    else:
        cfg = None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise ConversionError(path, "a fairseq checkpoint without a model configuration ('cfg' or 'args')",
                              hint="Only complete training checkpoints can be converted")
    state: dict[str, LazyTensor] = {}
    bad = []
    for key, value in raw["model"].items():
        if isinstance(value, LazyTensor):
            state[str(key)] = value
        elif (nested := _nested_tensors(str(key), value)) is not None:
            state.update(nested)
        else:
            bad.append(str(key))
    if bad:
        raise ConversionError(path, f"its model state holds non-tensor entries {bad[:5]}",
                              hint="Is this a fairseq checkpoint?")
    dictionaries: list[LabelDictionary] = []
    task_state_key = None
    task_state = raw.get("task_state")
    if isinstance(task_state, dict):
        task_state_key = "dictionaries" if task_state.get("dictionaries") is not None else \
            "target_dictionary" if task_state.get("target_dictionary") is not None else None
        found = task_state.get("dictionaries")
        if found is None:
            found = task_state.get("target_dictionary")
        found = found if isinstance(found, list) else [found] if found is not None else []
        dictionaries = [d for d in (_label_dictionary(x) for x in found) if d is not None]
    return FairseqCheckpoint(path=path, era=era, cfg=cfg, state=state, num_updates=_num_updates(raw),
                             dictionaries=dictionaries, file=file,
                             task_state_key=task_state_key if dictionaries else None, exported_by=_exported_by(raw))


def _nested_tensors(prefix: str, value: Any) -> dict[str, LazyTensor] | None:
    """A dict of tensors inside the model state (data2vec 2.0 keeps its EMA teacher's tensors as
    ``model["_ema"]``), flattened to ``prefix.key``; None when it is anything else."""
    if not isinstance(value, dict) or not value:
        return None
    out: dict[str, LazyTensor] = {}
    for key, item in value.items():
        if isinstance(item, LazyTensor):
            out[f"{prefix}.{key}"] = item
        elif (nested := _nested_tensors(f"{prefix}.{key}", item)) is not None:
            out.update(nested)
        else:
            return None
    return out


def _exported_by(raw: dict[str, Any]) -> str | None:
    extra = raw.get("extra_state")
    value = extra.get("exported_by") if isinstance(extra, dict) else None
    return value if isinstance(value, str) else None
