"""Write a ``torch.save`` zip archive record by record, tensors streamed from their spans in other files.

``torch.save`` needs every tensor in memory (or memory-mapped, which counts every page in the resident set). A 1.3 GB
export that only renames tensors would then hold the whole model. Here the object is pickled with a
:class:`StreamedTensor` in each tensor's place: it pickles exactly as torch pickles a contiguous CPU tensor
(``torch._utils._rebuild_tensor_v2`` with a persistent id ``("storage", torch.FloatStorage, key, "cpu", numel)``),
and its bytes are read into one reusable buffer and handed to torch's own zip writer (``torch._C.PyTorchFileWriter``,
the writer ``torch.save`` uses) one storage at a time. The records are those ``torch.save`` writes, in its order
(``data.pkl``, ``.format_version``, ``.storage_alignment``, ``byteorder``, ``data/<key>``, then the writer's
``version`` and ``.data/serialization_id``), aligned as it aligns them, with their CRC-32: the file reads back with
``torch.load`` (default, ``weights_only=True``, ``mmap=True``), Python's ``zipfile`` and our allow-list reader, and
equals what ``torch.save`` writes for the materialised object except for the random serialization id.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from bundles.safetensors_stream import PendingTensor

from .torch_file import STORAGE_DTYPES

# dtype -> the legacy storage class torch.save names in a tensor's persistent id (torch's own names, read back by
# converters.torch_file); every dtype a bundle's safetensors files can hold has one.
STORAGE_CLASSES: dict[torch.dtype, Any] = {
    dtype: getattr(torch, name.split(".")[1]) for name, dtype in STORAGE_DTYPES.items() if name != "torch.UntypedStorage"
}
_FORMAT_VERSION = "1"  # torch.save's .format_version: storages keyed by number in the order the pickle meets them
# The bytes come from safetensors files, which are little-endian by definition (not the writing machine's order).
_BYTE_ORDER = "little"


class StreamedTensor:
    """A contiguous CPU tensor to be saved whose bytes are produced only when its storage record is written."""

    def __init__(self, pending: PendingTensor):
        if pending.dtype not in STORAGE_CLASSES:
            raise ValueError(f"tensor {pending.name}: dtype {pending.dtype} has no torch.save storage type")
        self.pending = pending

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pending.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.pending.dtype

    def __reduce_ex__(self, protocol: int) -> tuple:
        # torch.Tensor._reduce_ex_internal for a plain contiguous CPU tensor without hooks or metadata
        args = (_StorageRef(self), 0, tuple(self.shape), contiguous_strides(self.shape), False, OrderedDict())
        return torch._utils._rebuild_tensor_v2, args

    def __repr__(self) -> str:
        return f"StreamedTensor({self.pending.name!r}, {list(self.shape)}, {self.dtype})"


class _StorageRef:
    """What a :class:`StreamedTensor` pickles as its storage; the pickler turns it into a persistent id."""

    def __init__(self, tensor: StreamedTensor):
        self.tensor = tensor


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of ``shape`` (a dimension of size 0 counts as 1)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _pickle_with_storages(obj: Any, pickler: type[pickle.Pickler], protocol: int
                          ) -> tuple[bytes, dict[str, StreamedTensor]]:
    """(``data.pkl``'s bytes, storage key -> tensor in the order torch.save numbers them)."""
    storages: dict[str, StreamedTensor] = {}
    keys: dict[int, str] = {}

    class StoragePickler(pickler):  # type: ignore[misc, valid-type]
        def persistent_id(self, value: Any) -> Any:
            if not isinstance(value, _StorageRef):
                return None
            tensor = value.tensor
            key = keys.setdefault(id(tensor), str(len(keys)))
            storages[key] = tensor
            numel = 1
            for size in tensor.shape:
                numel *= size
            return "storage", STORAGE_CLASSES[tensor.dtype], key, "cpu", numel

    buffer = io.BytesIO()
    StoragePickler(buffer, protocol=protocol).dump(obj)
    return buffer.getvalue(), storages


class _CountingFile(io.RawIOBase):
    """A write-only file that reports how many bytes went through (for a progress bar on large exports)."""

    def __init__(self, raw: BinaryIO, on_bytes: Callable[[int], None]):
        self.raw, self.on_bytes = raw, on_bytes

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        written = self.raw.write(data)
        self.on_bytes(written)
        return written

    def flush(self) -> None:
        self.raw.flush()


def write_torch_zip(obj: Any, path: Path, *, pickler: type[pickle.Pickler] = pickle.Pickler, protocol: int = 2,
                    on_bytes: Callable[[int], None] | None = None) -> None:
    """Write ``obj`` to ``path`` as ``torch.save(obj, path, pickle_protocol=protocol)`` would with every
    :class:`StreamedTensor` materialised; ``on_bytes(n)`` after every write. ``path`` is written in place (the
    caller makes it atomic). Raises ``ValueError`` naming the file and tensor when a source span is cut short."""
    from torch.utils.serialization import config

    data, storages = _pickle_with_storages(obj, pickler, protocol)
    alignment = str(config.save.storage_alignment)
    with open(path, "wb") as fh:
        target: Any = fh if on_bytes is None else _CountingFile(fh, on_bytes)
        # CRC-32 always: Python's zipfile (and so our own reader) checks it, whatever torch's save config says
        writer = torch._C.PyTorchFileWriter(target, True, int(alignment))
        try:
            writer.write_record("data.pkl", data, len(data))
            writer.write_record(".format_version", _FORMAT_VERSION, len(_FORMAT_VERSION))
            writer.write_record(".storage_alignment", alignment, len(alignment))
            writer.write_record("byteorder", _BYTE_ORDER, len(_BYTE_ORDER))
            _write_storages(writer, storages)
        except BaseException:
            # torch's writer finishes an unfinished archive in its destructor; run after the file is closed, that
            # write fails inside a C++ destructor and aborts the process. Finish it now; the caller drops the file.
            with contextlib.suppress(Exception):
                writer.write_end_of_file()
            raise
        writer.write_end_of_file()
        target.flush()


def _write_storages(writer: Any, storages: dict[str, StreamedTensor]) -> None:
    """Each storage record in turn: a span is read into one buffer reused for all (so memory stays at the largest
    tensor, not the model); a tensor without a span (a small derived one) is produced."""
    spans = [t.pending.nbytes for t in storages.values() if t.pending.source_span is not None]
    buffer = torch.empty(max(spans, default=0), dtype=torch.uint8)
    view = memoryview(buffer.numpy()).cast("B")
    sources: dict[Path, BinaryIO] = {}
    try:
        for key, tensor in storages.items():
            pending, name = tensor.pending, f"data/{key}"
            if pending.source_span is not None:
                _read_span(sources, pending, view[:pending.nbytes])
                writer.write_record(name, buffer.untyped_storage(), pending.nbytes)
            else:
                value = _produced(pending)
                writer.write_record(name, value.untyped_storage(), pending.nbytes)
    finally:
        for fh in sources.values():
            fh.close()


def _read_span(sources: dict[Path, BinaryIO], pending: PendingTensor, into: memoryview) -> None:
    path, offset = pending.source_span  # type: ignore[misc]
    if path not in sources:
        sources[path] = open(path, "rb", buffering=0)
    fh = sources[path]
    fh.seek(offset)
    done = 0
    while done < len(into):
        got = fh.readinto(into[done:])
        if not got:
            raise ValueError(f"{path} ends inside the data of tensor {pending.name!r} (is it truncated?)")
        done += got


def _produced(pending: PendingTensor) -> torch.Tensor:
    """The tensor's values as a CPU tensor that owns exactly its bytes (torch writes a storage from its start)."""
    value = pending.produce()
    if tuple(value.shape) != pending.shape or value.dtype != pending.dtype:
        raise ValueError(f"tensor {pending.name}: produced {list(value.shape)} {value.dtype}, "
                         f"announced {list(pending.shape)} {pending.dtype}")
    value = value.detach().to("cpu").contiguous()
    if value.storage_offset() or value.untyped_storage().nbytes() != pending.nbytes:
        value = value.clone()
    return value


__all__ = ["STORAGE_CLASSES", "StreamedTensor", "contiguous_strides", "write_torch_zip"]
