"""The weights of a transformers directory, unread: ``model.safetensors`` (or its shards), else ``pytorch_model.bin``
(or its shards), in the order ``from_pretrained`` looks for them.

A ``.bin`` is a ``torch.save`` pickle: it is read only through the allow-list reader (:mod:`converters.torch_file`,
globals of a plain tensor state dict and nothing else), never ``torch.load``; one that asks for anything else, or is
truncated or not a torch file, is refused naming the file. Tensors stay in their files until written.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path

from safetensors import SafetensorError, safe_open

from bundles.safetensors_stream import PendingTensor, pending_tensors_of

from .errors import ConversionError
from .torch_file import TORCH_GLOBALS, LazyTensor, open_torch_file

SAFETENSORS_FILE = "model.safetensors"
BIN_FILE = "pytorch_model.bin"
INDEX_SUFFIX = ".index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, SAFETENSORS_FILE + INDEX_SUFFIX, BIN_FILE, BIN_FILE + INDEX_SUFFIX)
_DOWNLOAD_HINT = "Is the download complete? Fetch the file again from the model's page"


class HFWeights:
    """The tensors of a transformers directory (name -> unread tensor) and the files kept open to read them."""

    def __init__(self, tensors: dict[str, PendingTensor], files: list[Path], stack: ExitStack):
        self.tensors, self.files, self._stack = tensors, files, stack

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "HFWeights":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def weight_file(src: Path) -> Path | None:
    """The file ``from_pretrained`` would read the weights from (safetensors first), or None."""
    return next((src / name for name in WEIGHT_FILES if (src / name).is_file()), None)


def read_hf_weights(src: Path) -> HFWeights:
    """Every tensor of the directory ``src``; ConversionError naming the file when one is missing or unreadable."""
    first = weight_file(src)
    if first is None:
        raise ConversionError(src, f"holds no weights (none of {', '.join(WEIGHT_FILES)})",
                              hint="Download the model's weight file(s) into the directory too")
    shards = _shards(first) if first.name.endswith(INDEX_SUFFIX) else {first: None}
    stack = ExitStack()
    tensors: dict[str, PendingTensor] = {}
    try:
        for path, wanted in shards.items():
            found = _safetensors(path) if path.name.endswith(".safetensors") else _torch_file(path, stack)
            if wanted is not None:
                absent = sorted(wanted - set(found))
                if absent:
                    raise ConversionError(path, f"lacks tensors its index names: {absent[:8]}", hint=_DOWNLOAD_HINT)
                found = {k: v for k, v in found.items() if k in wanted}
            tensors.update(found)
    except BaseException:
        stack.close()
        raise
    return HFWeights(tensors, list(shards), stack)


def _shards(index: Path) -> dict[Path, set[str]]:
    """shard file -> the tensors the index says it holds; shard names must be plain files of the directory."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("weight_map is not a non-empty object")
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConversionError(index, f"is not a readable index of weight shards ({exc})", hint=_DOWNLOAD_HINT) from None
    shards: dict[Path, set[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise ConversionError(index, f"names the shard {shard!r} for {name!r}, which is not a file of the directory",
                                  hint=_DOWNLOAD_HINT)
        shards.setdefault(index.parent / shard, set()).add(name)
    missing = sorted(p.name for p in shards if not p.is_file())
    if missing:
        raise ConversionError(index, f"names shards that are not in the directory: {missing[:8]}", hint=_DOWNLOAD_HINT)
    return shards


def _safetensors(path: Path) -> dict[str, PendingTensor]:
    try:
        with safe_open(str(path), framework="pt") as f:  # checks the header and that the data is all there
            names = list(f.keys())
        pending = pending_tensors_of(path)
    except (SafetensorError, OSError, ValueError, KeyError, struct.error) as exc:
        raise ConversionError(path, f"is not a readable safetensors file ({exc})", hint=_DOWNLOAD_HINT) from None
    return {name: pending[name] for name in names}


def _torch_file(path: Path, stack: ExitStack) -> dict[str, PendingTensor]:
    if path.stat().st_size == 0:
        raise ConversionError(path, "the file is empty", hint=_DOWNLOAD_HINT)
    file = open_torch_file(
        path, TORCH_GLOBALS, what="PyTorch weight file",
        refused_hint="A transformers weight file is a plain tensor state dict; one that needs other code to load "
                     "has been tampered with (nothing of it was run)",
        unreadable_hint=_DOWNLOAD_HINT)
    stack.callback(file.close)
    state = file.obj
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, LazyTensor)] \
        if isinstance(state, dict) else None
    if bad is None or bad:
        what = f"entries that are not tensors: {[str(k) for k in bad[:5]]}" if bad else "no dict of tensors"
        raise ConversionError(path, f"is a PyTorch file but not a model state dict ({what})",
                              hint="transformers' pytorch_model.bin holds a plain state dict")
    return {name: PendingTensor(name, t.shape, t.dtype, t.load, source_span=t.file_span()) for name, t in state.items()}


__all__ = ["HFWeights", "WEIGHT_FILES", "read_hf_weights", "weight_file"]
