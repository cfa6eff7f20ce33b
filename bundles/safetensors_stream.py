"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once. A converter reading a 1.3 GB
checkpoint lazily would then hold all of it; here the header is written from the tensors' shapes and
dtypes first, and each tensor's bytes are produced, written and dropped in turn. The file is the standard
format (8-byte little-endian header length, JSON header, packed data) and reads back with ``safetensors``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to be written: its name, shape and dtype now, its values when ``produce()`` is called."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]
    source_span: tuple[Path, int] | None = None
    """(file, byte offset) when the tensor's bytes lie verbatim in a file: they are then copied in the kernel
    (``os.copy_file_range``, as ``cp`` does) instead of being read into memory and written back."""

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


_DTYPES_BY_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def pending_tensors_of(path: Path) -> dict[str, PendingTensor]:
    """Every tensor of the safetensors file ``path``, unread: written elsewhere, its bytes are copied in the kernel
    from their span in ``path`` (or, where the kernel cannot, read one tensor at a time). What an export that only
    renames tensors needs to stay near ``cp`` in time and memory."""
    path = Path(path)
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    data_start = 8 + length
    pending = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin = info["data_offsets"][0]
        pending[name] = PendingTensor(name, tuple(info["shape"]), _DTYPES_BY_NAME[info["dtype"]],
                                      partial(_read_tensor, path, name), source_span=(path, data_start + begin))
    return pending


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def write_safetensors_streaming(path: Path, tensors: Iterable[PendingTensor], metadata: dict[str, str],
                                on_tensor: Callable[[PendingTensor], None] | None = None) -> None:
    """Write ``tensors`` to ``path`` (which the caller makes atomic). Each produced tensor must match its
    announced shape and dtype; a mismatch raises ``ValueError`` naming the tensor."""
    pending = list(tensors)
    encoded = _header(pending, metadata)
    sources: dict[Path, int] = {}
    try:
        with open(path, "wb", buffering=0) as fh:
            _write_all(fh, struct.pack("<Q", len(encoded)) + encoded)
            for t in pending:
                if not (t.source_span and _copy_span(t.source_span, t.nbytes, fh.fileno(), sources)):
                    _write_all(fh, _tensor_bytes(t))
                if on_tensor is not None:
                    on_tensor(t)
    finally:
        for fd in sources.values():
            os.close(fd)


def _header(pending: list[PendingTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for t in pending:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {t.name}: dtype {t.dtype} cannot be stored")
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return encoded + b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned


def safetensors_file_size(tensors: list[PendingTensor], metadata: dict[str, str]) -> int:
    """The size in bytes of the file :func:`write_safetensors_streaming` writes for ``tensors``."""
    return 8 + len(_header(tensors, metadata)) + sum(t.nbytes for t in tensors)


def _tensor_bytes(t: PendingTensor) -> memoryview:
    value = t.produce()
    if tuple(value.shape) != t.shape or value.dtype != t.dtype:
        raise ValueError(f"tensor {t.name}: produced {list(value.shape)} {value.dtype}, "
                         f"announced {list(t.shape)} {t.dtype}")
    value = value.detach().to("cpu").contiguous()
    if not value.numel():
        return memoryview(b"")
    return memoryview(value.view(-1).view(torch.uint8).numpy()).cast("B")


def _write_all(fh, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view.nbytes:
        written = fh.write(view)
        view = view[written:]


def _copy_span(span: tuple[Path, int], nbytes: int, dst_fd: int, sources: dict[Path, int]) -> bool:
    """Copy ``nbytes`` from ``span`` to the current position of ``dst_fd`` in the kernel. False when the
    kernel or file system cannot (the caller then reads and writes the bytes itself)."""
    if not hasattr(os, "copy_file_range") or nbytes == 0:
        return False
    src, offset = span
    if src not in sources:
        sources[src] = os.open(src, os.O_RDONLY)
    start = os.lseek(dst_fd, 0, os.SEEK_CUR)
    done = 0
    try:
        while done < nbytes:
            copied = os.copy_file_range(sources[src], dst_fd, nbytes - done, offset + done)
            if copied == 0:
                raise ValueError(f"{src} ends inside a tensor's data (is it truncated?)")
            done += copied
    except OSError:
        os.lseek(dst_fd, start, os.SEEK_SET)
        os.ftruncate(dst_fd, start)
        return False
    return True
