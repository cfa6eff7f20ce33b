"""Write a safetensors file one tensor at a time.

``safetensors.torch.save_file`` needs every tensor in memory at once. A converter reading a 1.3 GB
checkpoint lazily would then hold all of it; here the header is written from the tensors' shapes and
dtypes first, and each tensor's bytes are produced, written and dropped in turn. The file is the standard
format (8-byte little-endian header length, JSON header, packed data) and reads back with ``safetensors``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def write_safetensors_streaming(path: Path, tensors: Iterable[PendingTensor], metadata: dict[str, str],
                                on_tensor: Callable[[PendingTensor], None] | None = None) -> None:
    """Write ``tensors`` to ``path`` (which the caller makes atomic). Each produced tensor must match its
    announced shape and dtype; a mismatch raises ``ValueError`` naming the tensor."""
    pending = list(tensors)
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for t in pending:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {t.name}: dtype {t.dtype} cannot be stored")
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(encoded)))
        fh.write(encoded)
        for t in pending:
            value = t.produce()
            if tuple(value.shape) != t.shape or value.dtype != t.dtype:
                raise ValueError(f"tensor {t.name}: produced {list(value.shape)} {value.dtype}, "
                                 f"announced {list(t.shape)} {t.dtype}")
            value = value.detach().to("cpu").contiguous()
            if value.numel():
                fh.write(value.view(-1).view(torch.uint8).numpy().data)
            if on_tensor is not None:
                on_tensor(t)
            del value
