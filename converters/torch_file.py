"""Read a ``torch.save`` file lazily: the pickle becomes data, each tensor a :class:`LazyTensor`.

``torch.load`` materialises every storage (or memory-maps the file, which also counts every page in the
process's resident set). A converter only needs one tensor at a time, so this reader parses the pickle
with the allow-list unpickler, records where each storage's bytes lie in the file, and reads a tensor's
bytes only when asked. Both layouts ``torch.save`` has used are supported: the zip archive (torch >= 1.6)
and the legacy stream (magic number, protocol, sys info, pickle, storage keys, raw storages).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .errors import ConversionError
from .safe_pickle import RestrictedUnpickler, TypeReference, UnsafePickleError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.save names a storage's element type by one of these legacy classes.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "torch.FloatStorage": torch.float32,
    "torch.DoubleStorage": torch.float64,
    "torch.HalfStorage": torch.float16,
    "torch.BFloat16Storage": torch.bfloat16,
    "torch.LongStorage": torch.int64,
    "torch.IntStorage": torch.int32,
    "torch.ShortStorage": torch.int16,
    "torch.CharStorage": torch.int8,
    "torch.ByteStorage": torch.uint8,
    "torch.BoolStorage": torch.bool,
    "torch.UntypedStorage": torch.uint8,
}


class TorchFileError(ValueError):
    """The file is not a readable ``torch.save`` file."""


# What reading a damaged, truncated or foreign file through :class:`TorchFile` may raise: every reader turns these
# into one "not readable" message (catch UnsafePickleError, a pickle.UnpicklingError, before them).
UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    TorchFileError, pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError, TypeError, AttributeError,
    UnicodeDecodeError, OSError, zipfile.BadZipFile, struct.error, RecursionError)


class _StorageSlot:
    """A storage as the pickle refers to it. ``file_offset`` (of its first byte) is -1 until known: legacy
    files tell where storages lie only after the pickle."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int, byte_offset: int = 0):
        self.key, self.dtype, self.numel, self.byte_offset = key, dtype, numel, byte_offset
        self.file_offset = -1


class LazyTensor:
    """A tensor of the file, read on :meth:`load`."""

    def __init__(self, reader: "TorchFile", storage: _StorageSlot, offset: int, shape: tuple[int, ...],
                 stride: tuple[int, ...]):
        self._reader, self._storage = reader, storage
        self.storage_offset, self.shape, self.stride = offset, tuple(shape), tuple(stride)

    @property
    def dtype(self) -> torch.dtype:
        return self._storage.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def _is_contiguous(self) -> bool:
        expected = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def file_span(self) -> tuple[Path, int] | None:
        """(file, byte offset) of this tensor's bytes when they lie contiguously in the file, else None."""
        if not self._is_contiguous() or self._storage.file_offset < 0:
            return None
        offset = self._storage.file_offset + self._storage.byte_offset + self.storage_offset * self.dtype.itemsize
        return self._reader.path, offset

    def load(self) -> torch.Tensor:
        """Read this tensor's bytes from the file into a fresh CPU tensor."""
        if self.numel == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        if self._is_contiguous():
            flat = self._reader.read_elements(self._storage, self.storage_offset, self.numel)
            return flat.view(self.shape)
        whole = self._reader.read_elements(self._storage, 0, self._storage.numel)
        return whole.as_strided(self.shape, self.stride, self.storage_offset).clone()

    def __repr__(self) -> str:
        return f"LazyTensor({list(self.shape)}, {self.dtype})"


def _rebuild_tensor(storage: Any, storage_offset: int, size: tuple, stride: tuple, *_rest: Any) -> Any:
    return ("__lazy_tensor__", storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


def _ordered_dict(*args: Any) -> OrderedDict:
    return OrderedDict(*args)


# The globals a plain tensor state dict needs. They map to our own small functions, never torch's.
TORCH_GLOBALS: dict[str, Any] = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "collections.OrderedDict": _ordered_dict,
    **{name: TypeReference(name) for name in STORAGE_DTYPES},
}


class TorchFile:
    """An open ``torch.save`` file: :attr:`obj` is the unpickled data with :class:`LazyTensor` leaves."""

    def __init__(self, path: Path, allowed: dict[str, Any]):
        self.path = Path(path)
        self._fh: BinaryIO = open(self.path, "rb")
        try:
            self._slots: dict[str, _StorageSlot] = {}
            self._views: list[tuple[_StorageSlot, _StorageSlot]] = []  # (view, the storage it is part of)
            if zipfile.is_zipfile(self._fh):
                raw = self._load_zip(allowed)
            else:
                self._fh.seek(0)
                raw = self._load_legacy(allowed)
            self.obj = self._resolve(raw)
        except BaseException:
            self._fh.close()
            raise

    # -- reading bytes ---------------------------------------------------------------------------------
    def read_elements(self, slot: _StorageSlot, first: int, count: int) -> torch.Tensor:
        itemsize = slot.dtype.itemsize
        if first + count > slot.numel:
            raise TorchFileError(f"a tensor reaches past the end of its storage {slot.key}")
        buf = bytearray(count * itemsize)
        self._fh.seek(slot.file_offset + slot.byte_offset + first * itemsize)
        got = self._fh.readinto(buf)
        if got != len(buf):
            raise TorchFileError("the file ends inside a tensor's data (is it truncated?)")
        return torch.frombuffer(buf, dtype=slot.dtype)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "TorchFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the two layouts -------------------------------------------------------------------------------
    def _persistent_load(self, pid: Any) -> _StorageSlot:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise TorchFileError(f"it holds an unknown persistent reference {pid!r:.80}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        name = getattr(storage_type, "pickled_name", None)
        if name not in STORAGE_DTYPES:
            raise TorchFileError(f"it holds a storage of unknown type {storage_type!r}")
        dtype = STORAGE_DTYPES[name]
        view = pid[5] if len(pid) > 5 else None
        if key not in self._slots:
            self._slots[key] = _StorageSlot(key, dtype, numel)
        base = self._slots[key]
        if view is not None:  # legacy files could pickle a view of a larger storage
            _view_key, offset, view_numel = view
            slot = _StorageSlot(key, dtype, int(view_numel), byte_offset=int(offset) * dtype.itemsize)
            slot.file_offset = base.file_offset
            self._views.append((slot, base))
            return slot
        return base

    def _load_zip(self, allowed: dict[str, Any]) -> Any:
        self._fh.seek(0)
        archive = zipfile.ZipFile(self._fh)
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise TorchFileError("it is a zip file but not a torch.save archive (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big":
            raise TorchFileError("it was saved on a big-endian machine, which this reader does not support")
        with archive.open(pkl[0]) as fh:
            raw = RestrictedUnpickler(fh, allowed, persistent_load=self._persistent_load).load()
        for key, slot in self._slots.items():
            info = archive.getinfo(f"{prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise TorchFileError("its tensor data is compressed, which torch.save never does")
            if info.file_size < slot.numel * slot.dtype.itemsize:
                raise TorchFileError(f"storage {key} is shorter than its tensors say (is the file truncated?)")
            self._fh.seek(info.header_offset)
            header = self._fh.read(30)
            if len(header) != 30 or header[:4] != b"PK\x03\x04":
                raise TorchFileError("its zip directory points at a damaged entry")
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            slot.file_offset = info.header_offset + 30 + name_len + extra_len
        return raw

    def _load_legacy(self, allowed: dict[str, Any]) -> Any:
        def small() -> Any:
            return RestrictedUnpickler(self._fh, allowed).load()

        try:
            magic = small()
        except UnsafePickleError:
            raise
        except Exception as exc:
            raise TorchFileError("it is neither a torch zip archive nor a legacy torch.save stream") from exc
        if magic != _LEGACY_MAGIC:
            raise TorchFileError("it is a pickle, but not one written by torch.save")
        if small() != _LEGACY_PROTOCOL:
            raise TorchFileError("it was written by a torch.save protocol this reader does not know")
        sys_info = small()
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise TorchFileError("it was saved on a big-endian machine, which this reader does not support")
        raw = RestrictedUnpickler(self._fh, allowed, persistent_load=self._persistent_load).load()
        keys = RestrictedUnpickler(self._fh, allowed).load()
        if not isinstance(keys, list):
            raise TorchFileError("its list of storages is damaged")
        position = self._fh.tell()
        end = self._fh.seek(0, 2)
        for key in keys:
            slot = self._slots.get(str(key))
            self._fh.seek(position)
            header = self._fh.read(8)
            if len(header) != 8:
                raise TorchFileError("the file ends inside its tensor data (is it truncated?)")
            (numel,) = struct.unpack("<q", header)
            itemsize = slot.dtype.itemsize if slot is not None else 1
            if slot is not None:
                slot.file_offset = position + 8
            position += 8 + numel * itemsize
            if position > end:
                raise TorchFileError("the file ends inside its tensor data (is it truncated?)")
        for view, base in self._views:
            view.file_offset = base.file_offset
        missing = [k for k, s in self._slots.items() if s.file_offset < 0]
        if missing:
            raise TorchFileError(f"storages {missing[:3]} have no data in the file")
        return raw

    # -- turning rebuild records into lazy tensors -----------------------------------------------------
    def _resolve(self, obj: Any, seen: set[int] | None = None) -> Any:
        """Replace rebuild records by :class:`LazyTensor`. Stand-in objects are visited once (omegaconf nodes
        point back at their parents, so the object graph has cycles)."""
        seen = set() if seen is None else seen
        if isinstance(obj, tuple) and len(obj) == 5 and obj[0] == "__lazy_tensor__":
            _, slot, offset, size, stride = obj
            return LazyTensor(self, slot, int(offset), size, stride)
        if isinstance(obj, dict):
            if id(obj) in seen:
                return obj
            seen.add(id(obj))
            for k, v in list(obj.items()):
                obj[k] = self._resolve(v, seen)
            return obj
        if isinstance(obj, list):
            if id(obj) in seen:
                return obj
            seen.add(id(obj))
            obj[:] = [self._resolve(v, seen) for v in obj]
            return obj
        if isinstance(obj, tuple):
            return tuple(self._resolve(v, seen) for v in obj)
        if hasattr(obj, "pickled_name") and getattr(obj, "state", None) is not None and id(obj) not in seen:
            seen.add(id(obj))
            obj.state = self._resolve(obj.state, seen)
        return obj


def open_torch_file(path: Path, allowed_globals: Any, *, what: str, refused_hint: str,
                    unreadable_hint: str) -> "TorchFile":
    """``TorchFile(path, allowed_globals)``, with each way of failing as one :class:`ConversionError`.

    ``what`` names the file kind in the message ("PyTorch checkpoint", "torchaudio state dict", ...). A refused
    global (nothing of it was run) gets ``refused_hint``; a damaged, truncated or foreign file ``unreadable_hint``.
    """
    try:
        return TorchFile(path, allowed_globals)
    except UnsafePickleError as exc:  # an UnpicklingError too: caught before UNREADABLE_ERRORS
        raise ConversionError(path, f"refused to load: {exc}", hint=refused_hint) from None
    except TorchFileError as exc:
        raise ConversionError(path, f"not a readable {what}: {exc}", hint=unreadable_hint) from None
    except UNREADABLE_ERRORS as exc:
        raise ConversionError(path, f"not a readable {what} ({type(exc).__name__}: {exc})",
                              hint=unreadable_hint) from None
