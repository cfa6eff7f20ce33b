"""Write a ``torch.save`` zip archive record by record, tensors copied from their spans in other files.

``torch.save`` needs every tensor in memory (or memory-mapped, which counts every page in the resident set). A 1.3 GB
export that only renames tensors would then hold the whole model. Here the object is pickled with a
:class:`StreamedTensor` in each tensor's place: it pickles exactly as torch pickles a contiguous CPU tensor
(``torch._utils._rebuild_tensor_v2`` with a persistent id ``("storage", torch.FloatStorage, key, "cpu", numel)``).
The archive is made by torch's own zip writer (``torch._C.PyTorchFileWriter``, what ``torch.save`` uses), so its
records, their order, alignment (what ``mmap=True`` needs), zip64 and version records are torch's. A storage record
whose bytes lie in a file is announced to it by size only (``write_record_metadata``, as ``torch.save`` does under
``skip_data``); where the writer skips those bytes they are copied in the kernel (``os.copy_file_range``, as ``cp``
does), never through memory, and their CRC-32 is summed from small reads of the source. Having had no bytes to sum,
the writer wrote 0 for those CRC-32s (and folded 0 into its serialization id): they, and the id, are put right at the
end. The file reads back with ``torch.load`` (default, ``weights_only=True``, ``mmap=True``), Python's ``zipfile`` and
our allow-list reader, and is byte for byte what ``torch.save`` writes for the object with its tensors in memory.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bundles.safetensors_stream import PendingTensor

from .torch_file import STORAGE_DTYPES

# dtype -> the legacy storage class torch.save names in a tensor's persistent id (torch's own names, read back by
# converters.torch_file); every dtype a bundle's safetensors files can hold has one.
STORAGE_CLASSES: dict[torch.dtype, Any] = {
    dtype: getattr(torch, name.split(".")[1])
    for name, dtype in STORAGE_DTYPES.items() if name != "torch.UntypedStorage"
}
_FORMAT_VERSION = "1"  # torch.save's .format_version: storages keyed by number in the order the pickle meets them
# The bytes come from safetensors files, which are little-endian by definition (not the writing machine's order).
_BYTE_ORDER = "little"


class StreamedTensor:
    """A contiguous CPU tensor to be saved whose bytes are copied from their span (or produced, without one) only
    when its storage record is written."""

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


_CHUNK = 1 << 20  # CRC-32 over reads of this size: they stay in the CPU's cache
_DESCRIPTOR = b"PK\x07\x08"  # zip data descriptor: follows a record's bytes, holds its CRC-32 at +4
_CENTRAL = b"PK\x01\x02"  # zip central directory entry: CRC-32 at +16
_ID_RECORD = ".data/serialization_id"
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EPERM}


@dataclass
class _SpanRecord:
    """A storage record whose bytes are copied from a span of another file; where they went and their CRC-32."""

    name: str
    pending: PendingTensor
    data_offset: int = -1
    crc: int | Future[int] = 0


class _Sources:
    """The source files, open; copies a span's bytes to the output and sums their CRC-32 (in background threads
    while the kernel copies the next spans: zlib releases the GIL, and the CRCs are needed only at the end)."""

    def __init__(self) -> None:
        self.files: dict[Path, io.FileIO] = {}
        self.chunk = memoryview(bytearray(_CHUNK))
        self.summing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="crc32")

    def close(self) -> None:
        self.summing.shutdown(wait=True, cancel_futures=True)  # no thread may read a file closed below
        for fh in self.files.values():
            fh.close()

    def copy(self, pending: PendingTensor, out: io.FileIO) -> int | Future[int]:
        """Append ``pending``'s bytes to ``out`` (at its position); their CRC-32, or its future: copied in the
        kernel (``os.copy_file_range``, as ``cp`` does) where it can, with the CRC summed from reads of the source
        in a background thread; else read, summed and written chunk by chunk."""
        path, offset = pending.source_span  # type: ignore[misc]
        if path not in self.files:
            self.files[path] = open(path, "rb", buffering=0)
        src = self.files[path]
        start = out.tell()
        if _kernel_copy(src, offset, pending, out):
            return self.summing.submit(_summed, src, offset, pending)
        out.seek(start)
        out.truncate(start)
        return self._crc(src, offset, pending, out)

    def _crc(self, src: io.FileIO, offset: int, pending: PendingTensor, out: io.FileIO) -> int:
        crc, done = 0, 0
        src.seek(offset)
        while done < pending.nbytes:
            got = src.readinto(self.chunk[:min(_CHUNK, pending.nbytes - done)])
            if not got:
                raise _cut_short(src, pending)
            crc = zlib.crc32(self.chunk[:got], crc)
            _write_all(out, self.chunk[:got])
            done += got
        return crc


def _summed(src: io.FileIO, offset: int, pending: PendingTensor) -> int:
    """CRC-32 of ``pending``'s span of ``src``, read with ``os.pread`` (no shared file position: threads share
    ``src``)."""
    crc, done = 0, 0
    while done < pending.nbytes:
        chunk = os.pread(src.fileno(), min(_CHUNK, pending.nbytes - done), offset + done)
        if not chunk:
            raise _cut_short(src, pending)
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
    return crc


def _kernel_copy(src: io.FileIO, offset: int, pending: PendingTensor, out: io.FileIO) -> bool:
    """Copy the span in the kernel; False when the kernel or file system cannot (nothing else is wrong)."""
    if not hasattr(os, "copy_file_range"):
        return False
    done = 0
    try:
        while done < pending.nbytes:
            copied = os.copy_file_range(src.fileno(), out.fileno(), pending.nbytes - done, offset + done)
            if copied == 0:
                raise _cut_short(src, pending)
            done += copied
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def _cut_short(src: io.FileIO, pending: PendingTensor) -> ValueError:
    return ValueError(f"{src.name} ends inside the data of tensor {pending.name!r} (is it truncated?)")


def _write_all(out: io.FileIO, data: memoryview) -> None:
    view = data if data.format == "B" else data.cast("B")
    while view.nbytes:
        view = view[out.write(view):]


class _ArchiveFile(io.RawIOBase):
    """The output file as torch's zip writer sees it. Its writes go through whole (counted for the progress bar).
    A record announced by size only (``write_record_metadata``, what ``torch.save`` does under ``skip_data``) makes
    the writer skip the record's bytes with ``seek(n, SEEK_CUR)`` right after its header: there they are copied in."""

    def __init__(self, out: io.FileIO, sources: _Sources, on_bytes: Callable[[int], None]):
        self.out, self.sources, self.on_bytes = out, sources, on_bytes
        self.expected: _SpanRecord | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        _write_all(self.out, view)
        self.on_bytes(view.nbytes)
        return view.nbytes

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        record, self.expected = self.expected, None
        if record is None or whence != os.SEEK_CUR or offset != record.pending.nbytes:
            raise RuntimeError(f"torch's zip writer skipped {offset} bytes (whence {whence}) where no record's "
                               f"bytes were due: its layout is not the one this writer knows")
        record.data_offset = self.out.tell()
        record.crc = self.sources.copy(record.pending, self.out)
        self.on_bytes(offset)
        return self.out.tell()

    def tell(self) -> int:
        return self.out.tell()

    def flush(self) -> None:
        self.out.flush()


def write_torch_zip(obj: Any, path: Path, *, pickler: type[pickle.Pickler] = pickle.Pickler, protocol: int = 2,
                    on_bytes: Callable[[int], None] | None = None) -> None:
    """Write ``obj`` to ``path`` as ``torch.save(obj, path, pickle_protocol=protocol)`` would with every
    :class:`StreamedTensor` materialised; ``on_bytes(n)`` after every write. ``path`` is written in place (the
    caller makes it atomic). Raises ``ValueError`` naming the file and tensor when a source span is cut short."""
    from torch.utils.serialization import config

    data, storages = _pickle_with_storages(obj, pickler, protocol)
    alignment = str(config.save.storage_alignment)
    sources = _Sources()
    try:
        with open(path, "w+b", buffering=0) as out:  # read back to put the CRCs in
            target = _ArchiveFile(out, sources, on_bytes or (lambda n: None))
            # CRC-32 always: Python's zipfile (and so our own reader) checks it, whatever torch's save config says
            writer = torch._C.PyTorchFileWriter(target, True, int(alignment))
            try:
                writer.write_record("data.pkl", data, len(data))
                writer.write_record(".format_version", _FORMAT_VERSION, len(_FORMAT_VERSION))
                writer.write_record(".storage_alignment", alignment, len(alignment))
                writer.write_record("byteorder", _BYTE_ORDER, len(_BYTE_ORDER))
                copied = _write_storages(writer, target, storages)
            except BaseException:
                # torch's writer finishes an unfinished archive in its destructor; run after the file is closed,
                # that write fails inside a C++ destructor and aborts the process. Finish it now; the caller drops
                # the file.
                with contextlib.suppress(Exception):
                    writer.write_end_of_file()
                raise
            writer.write_end_of_file()
            for record in copied:
                if isinstance(record.crc, Future):
                    record.crc = record.crc.result()
            _put_crcs(out, path, f"{writer.archive_name()}/", copied)
    finally:
        sources.close()


def _write_storages(writer: Any, target: _ArchiveFile, storages: dict[str, StreamedTensor]) -> list[_SpanRecord]:
    """Each storage record in turn: one with a span is announced by size and copied in when torch's writer skips
    its bytes (never in memory); a tensor without a span (a small derived one) is produced and written by torch."""
    copied = []
    for key, tensor in storages.items():
        pending, name = tensor.pending, f"data/{key}"
        if pending.source_span is not None and pending.nbytes:
            record = target.expected = _SpanRecord(name, pending)
            writer.write_record_metadata(name, pending.nbytes)
            if record.data_offset < 0:
                raise RuntimeError(f"torch's zip writer did not skip the bytes of {name}: its layout is not the one "
                                   f"this writer knows")
            copied.append(record)
        else:
            value = _produced(pending)
            writer.write_record(name, value.untyped_storage(), pending.nbytes)
    return copied


def _central_entries(out: io.FileIO, path: Path) -> list[tuple[str, int, int, bool]]:
    """(name, offset of its CRC-32 field, that CRC-32, whether it has bytes) of each central directory entry, in
    the order written."""
    with zipfile.ZipFile(path) as archive:
        start = archive.start_dir  # where the central directory begins (zip64 or not)
    out.seek(start)
    directory = out.read()
    entries, pos = [], 0
    while directory[pos:pos + 4] == _CENTRAL:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", directory, pos + 28)
        crc, _, size = struct.unpack_from("<III", directory, pos + 16)  # a zip64 size reads 0xFFFFFFFF here
        entries.append((directory[pos + 46:pos + 46 + name_len].decode("utf-8"), start + pos + 16, crc, size > 0))
        pos += 46 + name_len + extra_len + comment_len
    return entries


def _put_crc(out: io.FileIO, offset: int, crc: int, where: str) -> None:
    out.seek(offset)
    if out.read(4) != b"\0\0\0\0":
        raise RuntimeError(f"torch's zip writer left a CRC-32 in {where}: its layout is not the one this writer knows")
    out.seek(offset)
    _write_all(out, memoryview(struct.pack("<I", crc)))


def _put_crcs(out: io.FileIO, path: Path, prefix: str, copied: list[_SpanRecord]) -> None:
    """The CRC-32 of each copied record where torch's streaming writer keeps one (its data descriptor and its central
    directory entry: torch wrote 0 there, having had no bytes to sum), then the serialization id torch derives from
    every record's CRC-32, recomputed with them."""
    crcs = {prefix + r.name: r.crc for r in copied}
    for record in copied:
        descriptor = record.data_offset + record.pending.nbytes
        out.seek(descriptor)
        if out.read(4) != _DESCRIPTOR:
            raise RuntimeError(f"no zip data descriptor after {record.name}: torch's zip writer's layout is not the "
                               f"one this writer knows")
        _put_crc(out, descriptor + 4, record.crc, f"the data descriptor of {record.name}")
    entries = _central_entries(out, path)
    for name, crc_offset, _, _ in entries:
        if name in crcs:
            _put_crc(out, crc_offset, crcs[name], f"the central directory entry of {name}")
    _put_serialization_id(out, path, prefix + _ID_RECORD, entries, crcs)


def _combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t: how torch folds each record's CRC-32 into the serialization id."""
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + ((seed << 6) & mask) + (seed >> 2)) & mask)) & mask


def _put_serialization_id(out: io.FileIO, path: Path, id_name: str, entries: list[tuple[str, int, int, bool]],
                          crcs: dict[str, int]) -> None:
    """torch's id is 20 digits of a hash of the record names, then 20 digits of the CRC-32 of every record that has
    bytes, folded in order. Its second half is recomputed with the copied records' CRC-32 (torch folded in 0 for
    them), so the file is the one ``torch.save`` writes. Should torch's id ever be made otherwise (its second half not the fold of what
    torch summed), it is left as torch wrote it: it is an identifier, not a checksum."""
    others = [(name, crc) for name, _, crc, has_bytes in entries if name != id_name and has_bytes]
    id_entry = [(offset, crc) for name, offset, crc, _ in entries if name == id_name]
    if len(id_entry) != 1:
        return
    with zipfile.ZipFile(path) as archive:
        header = archive.getinfo(id_name).header_offset
    out.seek(header + 26)
    name_len, extra_len = struct.unpack("<HH", out.read(4))
    data_offset = header + 30 + name_len + extra_len
    out.seek(data_offset)
    old = out.read(40)
    torch_fold, ours = 0, 0
    for name, crc in others:
        torch_fold, ours = _combine(torch_fold, crc), _combine(ours, crcs.get(name, crc))
    if len(old) != 40 or not old.isdigit() or int(old[20:]) != torch_fold:
        return
    new = old[:20] + f"{ours:020d}".encode()
    out.seek(data_offset)
    _write_all(out, memoryview(new))
    out.seek(data_offset + len(new))
    if out.read(4) != _DESCRIPTOR:
        raise RuntimeError("no zip data descriptor after the serialization id: torch's zip writer's layout is not the "
                           "one this writer knows")
    crc = zlib.crc32(new)
    for offset in (data_offset + len(new) + 4, id_entry[0][0]):
        out.seek(offset)
        _write_all(out, memoryview(struct.pack("<I", crc)))


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
