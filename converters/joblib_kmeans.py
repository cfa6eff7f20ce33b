"""Read fairseq's k-means files (joblib pickles of sklearn k-means) as data, without sklearn or joblib.

fairseq's ``learn_kmeans.py`` writes ``joblib.dump(MiniBatchKMeans(...).fit(x), path)``, e.g. the published
``hubert_base_ls960_L9_km500.bin``. Loading that with joblib runs whatever the pickle asks for, needs sklearn,
and breaks across sklearn versions. Only ``cluster_centers_`` is needed, so this module reads the pickle with
an allow-list unpickler (see :mod:`converters.safe_pickle`): sklearn estimators, numpy random states and
joblib's array wrapper become inert stubs, numpy arrays are rebuilt from their raw bytes with
``np.frombuffer``, and any other global is refused, naming it, before anything could run.

joblib's format is a pickle stream with each array's bytes written inline, right after the BUILD opcode of a
``joblib.numpy_pickle.NumpyArrayWrapper``: joblib's own unpickler reads them from the file at that BUILD. The C
unpickler reads ahead of the opcode it runs, so this reader subclasses the pure-Python ``pickle._Unpickler``,
which reads exactly one opcode at a time.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from bundles.hashing import file_sha256
from bundles.kmeans import KMeansModel

from .errors import ConversionError
from .safe_pickle import PickledObject, TypeReference, UnsafePickleError, stub_class, pickled_bytes

# Decompressed bytes read at most. A 10k x 4096 float64 k-means is 330 MB; a file holding more than this is
# not a k-means file, and a small compressed file must not be able to fill the memory (a "zip bomb").
MAX_DATA_BYTES = 4 << 30
_CHUNK = 1 << 20

_HINT_SAFE = ("Only joblib/pickle files of a fitted sklearn KMeans or MiniBatchKMeans are read, and nothing in the "
              "file was run. If you made this file yourself and trust it, load it with joblib and save its "
              "cluster_centers_ with bundles.kmeans.save_kmeans")
_HINT_REDUMP = ("Load it with the joblib version that wrote it and dump it again with a current joblib, or save its "
                "cluster_centers_ with bundles.kmeans.save_kmeans")
_HINT_TRUNCATED = "Download or copy it again"
_OLD_JOBLIB = ("it was written by joblib older than 0.10, which keeps arrays in separate .npy files; "
               "this kit reads only the single-file format of joblib >= 0.10")


class _Refused(pickle.UnpicklingError):
    """The stream holds something a k-means file never does; the message says what."""


class _Truncated(EOFError):
    """The data ended before the pickle or an array in it did."""


# --------------------------------------------------------------------------------------------------------
# numpy stand-ins. Each checks its (untrusted) arguments and builds plain numeric arrays only.

# numpy pickles a dtype as numpy.dtype(code, False, True) plus a BUILD state: these are the plain numeric codes.
_NUMERIC_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})
_NDARRAY_NAMES = ("numpy.ndarray", "numpy.memmap", "numpy.core.memmap.memmap", "numpy._core.memmap.memmap")


class _Resolvable(PickledObject):
    """A stub that becomes a real numpy value once its state is set (``resolved``).

    The pickle memo keeps the stub itself, so a later reference to the same object gets the stub:
    :func:`_resolved` unwraps it wherever a value is used.
    """

    resolved: Any = None


def _resolved(value: Any) -> Any:
    return value.resolved if isinstance(value, _Resolvable) and value.resolved is not None else value


def _as_dtype(value: Any) -> np.dtype:
    value = _resolved(value)
    if not isinstance(value, np.dtype):
        raise _Refused(f"it gives {type(value).__name__} where a numpy dtype belongs")
    return value


class _Dtype(_Resolvable):
    pickled_name = "numpy.dtype"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Dtype:
        obj = super().__new__(cls, *args, **kwargs)
        code = args[0] if args else None
        if isinstance(code, str) and code.startswith("O"):
            raise _Refused("it holds an array of Python objects (numpy dtype 'O'), which this kit refuses to "
                           "read: only numeric arrays are read as data")
        if not isinstance(code, str) or code not in _NUMERIC_DTYPES:
            raise _Refused(f"it holds numpy dtype {code!r}; a k-means file holds only plain numeric arrays")
        obj.resolved = np.dtype(code)
        return obj

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags[, metadata])
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in ("<", ">", "|", "=")
                and state[2] is None and state[3] is None and state[4] is None):
            raise _Refused(f"it holds a structured or unusual numpy dtype ({state!r:.80})")
        self.state = state
        if state[1] in "<>":
            self.resolved = self.resolved.newbyteorder(state[1])


def _native(array: np.ndarray) -> np.ndarray:
    """``array`` in the machine's byte order (torch reads only that)."""
    return array if array.dtype.isnative else array.astype(array.dtype.newbyteorder("="))


def _as_bytes(data: Any) -> bytes | bytearray | memoryview:
    if isinstance(data, str):  # Python 2 pickles read with encoding="latin1"
        return data.encode("latin1")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _Refused(f"it gives {type(data).__name__} where array bytes belong")
    return data


def _check_shape(shape: Any) -> tuple[int, ...]:
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise _Refused(f"it gives an invalid array shape {shape!r:.80}")
    return shape


def _array_from_bytes(data: Any, dtype: np.dtype, shape: tuple[int, ...], fortran: bool) -> np.ndarray:
    data = _as_bytes(data)
    count = math.prod(shape)
    if len(data) != count * dtype.itemsize:
        raise _Refused(f"it holds {len(data)} bytes for an array of shape {shape} and dtype {dtype}")
    array = np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C")
    return _native(array)


class _PlainArray(_Resolvable):
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`` + BUILD state: an array pickled the numpy way."""

    pickled_name = "numpy.ndarray"

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, rawdata); numpy also accepts the legacy layout without the version.
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _Refused("it holds a numpy array with an unknown state layout")
        shape, dtype, fortran, data = state
        self.state = None
        self.resolved = _array_from_bytes(data, _as_dtype(dtype), _check_shape(shape), bool(fortran))


def _is_ndarray_type(value: Any) -> bool:
    return isinstance(value, TypeReference) and value.pickled_name in _NDARRAY_NAMES


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> _PlainArray:
    if not _is_ndarray_type(subtype):
        raise _Refused(f"it rebuilds an array of type {subtype!r}, not a numpy.ndarray")
    return _PlainArray()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's protocol-5 array pickling: ``numpy.core.numeric._frombuffer(buf, dtype, shape, order)``."""
    if order not in ("C", "F"):
        raise _Refused(f"it gives an invalid array order {order!r:.20}")
    return _array_from_bytes(buffer, _as_dtype(dtype), _check_shape(shape), order == "F")


def _scalar(dtype: Any, data: Any = None) -> Any:
    """``numpy.core.multiarray.scalar(dtype, raw bytes)``: a numpy scalar such as ``inertia_``."""
    return _array_from_bytes(data, _as_dtype(dtype), (), False)[()]


_OBJECT = TypeReference("builtins.object")


def _reconstructor(cls: Any, base: Any, state: Any = None) -> PickledObject:
    """Protocols 0-1 make objects with ``copyreg._reconstructor(cls, object, None)``; allow it for stubs only."""
    if not (isinstance(cls, type) and issubclass(cls, PickledObject) and base is _OBJECT and state is None):
        raise _Refused(f"it calls copyreg._reconstructor with {cls!r:.60}")
    return cls.__new__(cls)


# --------------------------------------------------------------------------------------------------------
# The allow-list.

class _JoblibArray(_Resolvable):
    """``joblib.numpy_pickle.NumpyArrayWrapper``: its state says what the inline array bytes are."""

    pickled_name = "joblib.numpy_pickle.NumpyArrayWrapper"


_ESTIMATORS = {name: stub_class(name) for name in (
    "sklearn.cluster._kmeans.MiniBatchKMeans",
    "sklearn.cluster._kmeans.KMeans",
    "sklearn.cluster.k_means_.MiniBatchKMeans",  # sklearn < 0.22
    "sklearn.cluster.k_means_.KMeans",
)}
# A RandomState passed as random_state is pickled with the estimator; its bit generator state is of no use.
_INERT = [
    "numpy.random._pickle.__randomstate_ctor", "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor", "numpy.random.__RandomState_ctor",
    "numpy.random.mtrand.RandomState", "numpy.random.bit_generator.SeedSequence",
    *(f"numpy.random._{mod}.{name}" for mod, name in (
        ("mt19937", "MT19937"), ("pcg64", "PCG64"), ("pcg64", "PCG64DXSM"), ("philox", "Philox"), ("sfc64", "SFC64"))),
]
_PRE_0_10 = {f"{prefix}numpy_pickle{suffix}.{name}" for prefix in ("joblib.", "sklearn.externals.joblib.")
             for suffix in ("", "_compat") for name in ("NDArrayWrapper", "ZNDArrayWrapper")}

_ALLOWED: dict[str, Any] = {
    **_ESTIMATORS,
    **{name: stub_class(name) for name in _INERT},
    "joblib.numpy_pickle.NumpyArrayWrapper": _JoblibArray,
    "sklearn.externals.joblib.numpy_pickle.NumpyArrayWrapper": _JoblibArray,  # joblib vendored in sklearn < 0.23
    "numpy.dtype": _Dtype,
    **{name: TypeReference(name) for name in _NDARRAY_NAMES},
    **{f"numpy.{core}.multiarray._reconstruct": _reconstruct for core in ("core", "_core")},
    **{f"numpy.{core}.multiarray.scalar": _scalar for core in ("core", "_core")},
    **{f"numpy.{core}.numeric._frombuffer": _frombuffer for core in ("core", "_core")},
    "_codecs.encode": pickled_bytes,
    "copyreg._reconstructor": _reconstructor,
    "copy_reg._reconstructor": _reconstructor,
    "builtins.object": _OBJECT,
    "__builtin__.object": _OBJECT,
}


# --------------------------------------------------------------------------------------------------------
# Streams.

class _ZlibReader(io.RawIOBase):
    """Streaming reader of a raw zlib stream (joblib's ``compress=N``); the stdlib has no file class for it."""

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._decompressor = zlib.decompressobj()
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._decompressor.eof:
            if not self._pending:
                self._pending = self._raw.read(64 * 1024)
                if not self._pending:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
            out = self._decompressor.decompress(self._pending, len(buffer))
            self._pending = self._decompressor.unconsumed_tail
            if out:
                buffer[:len(out)] = out
                return len(out)
        return 0


class _BoundedReader:
    """Reads in chunks and counts: a hostile length field cannot make one huge allocation, and at most
    :data:`MAX_DATA_BYTES` are read in all."""

    def __init__(self, stream: BinaryIO, compressed: bool):
        self._stream = stream
        self.compressed = compressed
        self.count = 0
        self.exhausted = False  # a read came back short: the data ended

    def _counted(self, n: int) -> None:
        self.count += n
        if self.count > MAX_DATA_BYTES:
            raise _Refused(f"it holds more than {MAX_DATA_BYTES >> 30} GiB of data, far more than any k-means file")

    def read_into_bytearray(self, n: int) -> bytearray:
        data = bytearray()
        while len(data) < n:
            chunk = self._stream.read(min(_CHUNK, n - len(data)))
            if not chunk:
                self.exhausted = True
                break
            self._counted(len(chunk))
            data += chunk
        return data

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = MAX_DATA_BYTES + 1
        if n <= _CHUNK:
            data = self._stream.read(n)
            self._counted(len(data))
            self.exhausted |= len(data) < n
            return data
        return bytes(self.read_into_bytearray(n))

    def readline(self) -> bytes:
        line = self._stream.readline(MAX_DATA_BYTES - self.count + 1)
        self._counted(len(line))
        self.exhausted |= not line.endswith(b"\n")
        return line


def _decompressed(raw: io.BufferedReader) -> BinaryIO:
    """``raw`` itself, or a streaming decompressor over it, chosen by the magic bytes joblib writes."""
    head = raw.peek(8)[:8]
    if head.startswith(b"ZF"):
        raise _Refused(_OLD_JOBLIB)
    if head.startswith(b"\x78"):
        return io.BufferedReader(_ZlibReader(raw))
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if head.startswith(b"\xfd7zXZ") or head.startswith(b"\x5d\x00"):
        return lzma.LZMAFile(raw, format=lzma.FORMAT_AUTO)
    if head.startswith(b"\x04\x22\x4d\x18"):
        raise _Refused("it is compressed with lz4, which the Python standard library cannot read; "
                       "decompress it first with `lz4 -d FILE FILE.raw`")
    return raw


# --------------------------------------------------------------------------------------------------------
# The unpickler.

class _KMeansUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # pure-Python: reads one opcode at a time
    def __init__(self, stream: _BoundedReader):
        super().__init__(stream, encoding="latin1")
        self._stream = stream

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full in _PRE_0_10:
            raise _Refused(_OLD_JOBLIB)
        try:
            return _ALLOWED[full]
        except KeyError:
            raise UnsafePickleError(full) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it holds a persistent reference, which a joblib k-means file does not")

    def _load_build(self) -> None:
        # Only our stubs take state: BUILD must not set attributes on anything else.
        target = self.stack[-2] if len(self.stack) >= 2 else None
        if not isinstance(target, PickledObject):
            raise _Refused(f"it sets the state of a {type(target).__name__}, which a k-means file never does")
        pickle._Unpickler.load_build(self)  # type: ignore[attr-defined]
        if isinstance(target, _JoblibArray):
            target.resolved = self._read_inline_array(target.state)
        if isinstance(target, _Resolvable) and target.resolved is not None:
            self.stack[-1] = target.resolved

    def _load_bytearray8(self) -> None:
        # pickle's own BYTEARRAY8 allocates the length the file claims before reading any of it.
        (n,) = struct.unpack("<Q", self.read(8))
        if n > MAX_DATA_BYTES:
            raise _Refused(f"it claims a {n}-byte buffer, far more than any k-means file")
        data = self.read(n)
        if len(data) != n:
            raise _Truncated("the data ended inside a buffer")
        self.append(bytearray(data))

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8

    def _read_inline_array(self, state: Any) -> np.ndarray:
        """The array bytes joblib wrote right after this BUILD (``NumpyArrayWrapper.read_array``)."""
        if not isinstance(state, dict):
            raise _Refused("it holds a joblib array wrapper without its description")
        if not _is_ndarray_type(state.get("subclass")):
            raise _Refused(f"it holds an array of type {state.get('subclass')!r:.60}, not a numpy.ndarray")
        dtype = _as_dtype(state.get("dtype"))
        shape = _check_shape(state.get("shape"))
        order = state.get("order", "C")
        if order not in ("C", "F"):
            raise _Refused(f"it gives an invalid array order {order!r:.20}")
        # Protocol 4+ frames the pickle; joblib ends a frame right before the array bytes. Bytes left in the
        # current frame mean the BUILD was not joblib's, and reading on would take opcodes for data.
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getvalue()):
            raise _Refused("it holds a joblib array wrapper in the middle of a pickle frame")
        alignment = state.get("numpy_array_alignment_bytes")  # absent before joblib 1.2: no padding
        if alignment is not None:
            if type(alignment) is not int or not 0 < alignment < 256:
                raise _Refused(f"it gives an invalid array alignment {alignment!r:.20}")
            pad = self._stream.read(1)
            if not pad:
                raise _Truncated("the data ended inside an array")
            if pad[0] > alignment:
                raise _Refused(f"it gives {pad[0]} padding bytes for an alignment of {alignment}")
            if len(self._stream.read(pad[0])) != pad[0]:
                raise _Truncated("the data ended inside an array")
        nbytes = math.prod(shape) * dtype.itemsize
        data = self._stream.read_into_bytearray(nbytes)
        if len(data) != nbytes:
            raise _Truncated("the data ended inside an array")
        # joblib writes Fortran-ordered arrays as the C-ordered transpose.
        return _array_from_bytes(data, dtype, shape[::-1], False).T if order == "F" else \
            _array_from_bytes(data, dtype, shape, False)


# --------------------------------------------------------------------------------------------------------

def _describe(value: Any) -> str:
    if isinstance(value, PickledObject):
        return value.pickled_name
    if isinstance(value, np.ndarray):
        return f"numpy array of shape {value.shape}"
    return type(value).__name__


def _read_to_end(stream: _BoundedReader) -> None:
    """Read what is left, so that a decompressor checks its end marker and checksum."""
    while stream.read(_CHUNK):
        pass


def _explain(path: Path, exc: Exception, stream: _BoundedReader | None) -> ConversionError:
    """The :class:`ConversionError` for a failure while reading ``path``."""
    if isinstance(exc, UnsafePickleError):
        return ConversionError(path, f"it is not a k-means file this kit can read safely: {exc}", hint=_HINT_SAFE)
    if isinstance(exc, _Refused):
        return ConversionError(path, f"it is not a k-means file this kit can read: {exc}", hint=_HINT_REDUMP)
    if isinstance(exc, EOFError):
        return ConversionError(path, f"it ends early: the file is truncated ({str(exc) or 'no more data'})",
                               hint=_HINT_TRUNCATED)
    if isinstance(exc, (OSError, zlib.error, lzma.LZMAError)):
        return ConversionError(path, f"its compressed data is corrupt or unreadable ({exc})", hint=_HINT_TRUNCATED)
    if stream is not None and stream.exhausted:  # a short read made the parser fail
        return ConversionError(path, f"it ends early: the file is truncated or not a pickle "
                                     f"({type(exc).__name__}: {exc!s:.100})", hint=_HINT_TRUNCATED)
    if stream is not None and stream.compressed:
        # Corrupt compressed data decompresses to garbage before the checksum at the end is reached: read on, and
        # report the corruption rather than the garbage.
        try:
            _read_to_end(stream)
        except Exception as later:  # noqa: BLE001
            if isinstance(later, (OSError, zlib.error, lzma.LZMAError, EOFError)):
                return _explain(path, later, None)
    return ConversionError(path, f"it is not a joblib or pickle file of a k-means model (parsing failed: "
                                 f"{type(exc).__name__}: {exc!s:.100})",
                           hint="Pass the .bin written by fairseq's learn_kmeans.py (joblib.dump of a fitted "
                                "sklearn MiniBatchKMeans)")


def _unpickle(path: Path) -> Any:
    """The object in the joblib/pickle file ``path``, read through the allow-list."""
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise ConversionError(path, f"it cannot be opened ({exc.strerror or exc})",
                              hint="Check the path and its permissions") from None
    with raw:
        stream: _BoundedReader | None = None
        try:
            data = _decompressed(raw)
            stream = _BoundedReader(data, compressed=data is not raw)
            value = _KMeansUnpickler(stream).load()
            # A compressed file cut short after the pickle's STOP would otherwise pass unnoticed.
            _read_to_end(stream)
            return value
        except Exception as exc:  # noqa: BLE001 - untrusted bytes can fail the parser in any way; none of it ran code
            raise _explain(path, exc, stream) from None


def read_joblib_kmeans(path: str | Path) -> KMeansModel:
    """The k-means model in a fairseq/sklearn joblib file (e.g. ``hubert_base_ls960_L9_km500.bin``).

    Reads ``cluster_centers_`` of a pickled sklearn ``KMeans``/``MiniBatchKMeans`` (any sklearn version,
    joblib >= 0.10, uncompressed or zlib/gzip/bz2/xz/lzma-compressed) without importing sklearn or joblib and
    without running pickled code. ``layer`` is None: the file does not record which layer was clustered.
    Raises :class:`ConversionError` naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(path, "no such file" if not path.exists() else "it is not a file",
                              hint="Check the path of the k-means .bin")
    if path.stat().st_size == 0:
        raise ConversionError(path, "the file is empty", hint=_HINT_TRUNCATED)
    estimator = _unpickle(path)

    if not isinstance(estimator, tuple(_ESTIMATORS.values())):
        raise ConversionError(path, f"it holds a {_describe(estimator)}, not a fitted sklearn KMeans or "
                                    "MiniBatchKMeans", hint="Pass the k-means file fairseq's learn_kmeans.py wrote")
    name = estimator.pickled_name
    state = estimator.state if isinstance(estimator.state, dict) else {}
    centers = _resolved(state.get("cluster_centers_"))
    if centers is None:
        raise ConversionError(path, f"it holds an unfitted {name}: there is no cluster_centers_",
                              hint="Pass the file written after fitting (learn_kmeans.py dumps the fitted model)")
    if not (isinstance(centers, np.ndarray) and centers.ndim == 2 and centers.dtype.kind == "f"):
        raise ConversionError(path, f"its cluster_centers_ is a {_describe(centers)}"
                                    f"{' of ' + str(centers.dtype) if isinstance(centers, np.ndarray) else ''}, "
                                    "not a 2-D float array", hint=_HINT_REDUMP)
    metadata = {"source_file": path.name, "source_sha256": file_sha256(path), "sklearn_class": name,
                "n_clusters": str(centers.shape[0])}
    if isinstance(state.get("_sklearn_version"), str):
        metadata["sklearn_version"] = state["_sklearn_version"]
    if centers.dtype != np.float32:
        metadata["source_dtype"] = str(centers.dtype)  # converted to float32 below
    try:
        return KMeansModel(torch.from_numpy(np.array(centers, dtype=np.float32)), None, metadata)
    except ValueError as exc:
        raise ConversionError(path, f"its cluster_centers_ are not a usable k-means model: {exc}",
                              hint=_HINT_REDUMP) from None
