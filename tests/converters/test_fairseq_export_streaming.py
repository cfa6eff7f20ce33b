"""`export --to fairseq` streams: the ``.pt`` is written record by record in torch's zip format
(converters.torch_zip_writer), each tensor copied from its span in the bundle's safetensors files.

No fairseq needed. The file must be, byte for byte, what ``torch.save`` writes for the same checkpoint with every
tensor in memory (the former path); torch reads it back on every path (default = ``weights_only=True``,
``mmap=True``) and so does our allow-list reader; the bundle's big tensors are never materialised.
tests/converters/test_fairseq_export.py does the same comparison for every stored fairseq configuration and pickle era.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from bundles.safetensors_stream import pending_tensors_of
from continue_pt.cli import cli
from continue_pt.demo import ASSETS
from converters.convert import convert_checkpoint
from converters.fairseq_checkpoint import read_fairseq_checkpoint
from converters.fairseq_export import LABEL_EMBEDDINGS, NON_CLUSTER_ROWS, _Pickler, export_fairseq, \
    fairseq_checkpoint_dict
from converters.torch_zip_writer import StreamedTensor, contiguous_strides, write_torch_zip


class Dictionary:
    """Stands in for fairseq's Dictionary when torch's weights-only unpickler is told to allow it."""


FAIRSEQ_DICTIONARY = "fairseq.data.dictionary.Dictionary"


def in_memory_export(bundle_dir: Path, path: Path) -> Path:
    """The former path: every tensor of the checkpoint read into memory by safetensors, then ``torch.save`` with the
    export's pickler into an open file (as ``save_fairseq_file`` did)."""
    from bundles.loading import load_bundle

    checkpoint = fairseq_checkpoint_dict(load_bundle(bundle_dir), [])
    checkpoint["model"] = {k: t.pending.produce() for k, t in checkpoint["model"].items()}
    with open(path, "wb") as fh:
        torch.save(checkpoint, fh, pickle_module=SimpleNamespace(Pickler=_Pickler, __name__="pickle"),
                   pickle_protocol=2)
    return path


def assert_same_file(streamed: Path, reference: Path) -> None:
    """Byte-identical; on a difference, name the first zip record that differs."""
    a, b = streamed.read_bytes(), reference.read_bytes()
    if a == b:
        return
    za, zb = zipfile.ZipFile(streamed), zipfile.ZipFile(reference)
    assert za.namelist() == zb.namelist(), "the records differ"
    for info in za.infolist():
        other = zb.getinfo(info.filename)
        assert (info.header_offset, info.file_size, info.CRC) == (other.header_offset, other.file_size, other.CRC), \
            info.filename
        assert za.read(info) == zb.read(other), info.filename
    raise AssertionError(f"{len(a)} vs {len(b)} bytes: the files differ outside the records' data")


def _load(path: Path, **kwargs) -> dict:
    with torch.serialization.safe_globals([(Dictionary, FAIRSEQ_DICTIONARY)]):
        return torch.load(path, **kwargs)


@pytest.fixture(scope="module")
def w2v_bundle(tmp_path_factory) -> Path:
    return convert_checkpoint(ASSETS / "tiny_wav2vec2.pt", tmp_path_factory.mktemp("w2v") / "bundle")


@pytest.fixture(params=["hubert", "wav2vec2"])
def bundle(request, bundle_dir, w2v_bundle) -> Path:
    return bundle_dir if request.param == "hubert" else w2v_bundle


def test_the_streamed_file_is_what_torch_save_writes_with_the_tensors_in_memory(bundle, tmp_path):
    out = export_fairseq(bundle, tmp_path / "streamed.pt")
    assert_same_file(out, in_memory_export(bundle, tmp_path / "in_memory.pt"))


def test_torch_reads_it_back_on_every_path_and_so_does_our_reader(bundle, tmp_path):
    out = export_fairseq(bundle, tmp_path / "model.pt")
    default = _load(out)  # torch >= 2.6: weights_only=True
    mapped = _load(out, mmap=True)
    with read_fairseq_checkpoint(out) as ckpt:
        ours = {k: v.load() for k, v in ckpt.state.items()}
        symbols = [d.symbols for d in ckpt.dictionaries]
    assert default["model"].keys() == mapped["model"].keys() == ours.keys() and ours
    for key, value in ours.items():
        for other in (default["model"][key], mapped["model"][key]):
            assert other.dtype == value.dtype and other.shape == value.shape and torch.equal(other, value), key
    dictionaries = default["task_state"].get("dictionaries", [])
    assert [d.symbols for d in dictionaries] == symbols  # the Dictionary's state came through the BUILD
    assert default["optimizer_history"][-1]["num_updates"] == mapped["optimizer_history"][-1]["num_updates"]
    # every storage record starts on torch's alignment (what mmap=True relies on)
    archive = zipfile.ZipFile(out)
    with open(out, "rb") as fh:
        for info in archive.infolist():
            if "/data/" in info.filename:
                fh.seek(info.header_offset + 26)
                name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename


def test_the_bundles_tensors_are_copied_from_their_spans_not_materialised(bundle, tmp_path, monkeypatch):
    import bundles.loading
    import bundles.safetensors_stream as stream

    read = stream._read_tensor
    materialised = []

    def recording(path, name):
        materialised.append(name)
        return read(path, name)

    def refused(*_args, **_kwargs):
        raise AssertionError("the export loaded a whole safetensors file")

    monkeypatch.setattr(stream, "_read_tensor", recording)
    monkeypatch.setattr(bundles.loading, "load_file", refused)
    monkeypatch.setattr(torch, "save", refused)
    out = export_fairseq(bundle, tmp_path / "model.pt")
    # HuBERT's label_embs_concat is rebuilt from the two small tensors it comes from; nothing else is read whole
    assert set(materialised) <= {LABEL_EMBEDDINGS, NON_CLUSTER_ROWS}
    with read_fairseq_checkpoint(out) as ckpt:
        assert len(ckpt.state) > 10


def test_the_progress_callback_counts_every_byte_written(bundle_dir, tmp_path):
    calls = []
    out = export_fairseq(bundle_dir, tmp_path / "model.pt", on_progress=lambda done, total: calls.append((done, total)))
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == out.stat().st_size
    with read_fairseq_checkpoint(out) as ckpt:
        assert {t for _, t in calls} == {sum(v.nbytes for v in ckpt.state.values())}


def test_a_truncated_bundle_is_one_error_line_and_writes_nothing(bundle_dir, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    model = copy / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-1000])
    result = CliRunner().invoke(cli, ["export", str(copy), "--to", "fairseq", "-o", str(tmp_path / "model.pt")])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "truncated" in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# -- the writer on its own: every dtype and shape a bundle can hold --------------------------------------------------

def test_the_writer_equals_torch_save_for_every_dtype_and_shape(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 3, 4, generator=g).half(), "bf16": torch.randn(7, generator=g).bfloat16(),
        "i64": torch.arange(6).view(2, 3), "i32": torch.arange(5, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16), "i8": torch.arange(-2, 2, dtype=torch.int8),
        "u8": torch.arange(9, dtype=torch.uint8).view(3, 3), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "empty_last": torch.zeros(3, 0),
        "ones": torch.randn(1, 1, 6, generator=g),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    pending = pending_tensors_of(tmp_path / "t.safetensors")
    derived = torch.randn(8, 8, generator=g)[2:5]  # a view into a larger storage: only its own bytes are written
    streamed_tensors = {k: StreamedTensor(p) for k, p in pending.items()}
    from bundles.safetensors_stream import PendingTensor

    streamed_tensors["derived"] = StreamedTensor(PendingTensor("derived", (3, 8), torch.float32, lambda: derived))
    obj = {"model": streamed_tensors, "again": streamed_tensors["f32"], "cfg": {"x": [1, "0", None], "y": (2.0,)}}
    write_torch_zip(obj, tmp_path / "streamed.pt", pickler=pickle.Pickler, protocol=2)
    model = {**{k: tensors[k] for k in pending}, "derived": derived.clone()}
    in_memory = {"model": model, "again": model["f32"], "cfg": obj["cfg"]}
    with open(tmp_path / "torch.pt", "wb") as fh:
        torch.save(in_memory, fh, pickle_protocol=2)
    assert_same_file(tmp_path / "streamed.pt", tmp_path / "torch.pt")
    back = torch.load(tmp_path / "streamed.pt", mmap=True)
    for key, value in in_memory["model"].items():
        assert back["model"][key].dtype == value.dtype and torch.equal(back["model"][key], value), key
        assert back["model"][key].stride() == contiguous_strides(tuple(value.shape)) == value.contiguous().stride()
    assert back["again"] is back["model"]["f32"]


def test_a_span_cut_short_is_an_error_naming_the_file_and_tensor(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "t.safetensors")
    pending = pending_tensors_of(tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-40])
    with pytest.raises(ValueError, match=r"t\.safetensors ends inside the data of tensor 'a'"):
        write_torch_zip({"a": StreamedTensor(pending["a"])}, tmp_path / "out.pt")


def test_the_non_tensor_structure_reads_back_as_the_in_memory_exports(bundle_dir, tmp_path):
    """The non-tensor part (cfg, task state, updates, extra_state) reads back as the in-memory export's."""
    streamed = export_fairseq(bundle_dir, tmp_path / "streamed.pt")
    reference = in_memory_export(bundle_dir, tmp_path / "in_memory.pt")
    a, b = _load(streamed), _load(reference)
    for key in ("cfg", "optimizer_history", "extra_state", "args", "criterion", "last_optimizer_state"):
        assert json.dumps(a[key], sort_keys=True, default=str) == json.dumps(b[key], sort_keys=True, default=str), key
    assert [vars(d) for d in a["task_state"]["dictionaries"]] == [vars(d) for d in b["task_state"]["dictionaries"]]


@pytest.mark.parametrize("where", ["kernel copy", "torch's writes"])
def test_a_full_disk_mid_file_is_a_clear_error_and_leaves_nothing(where, bundle_dir, tmp_path, monkeypatch):
    """The disk fills after 100 kB, in a span's copy or in a write of torch's zip writer (whose destructor must not
    then run on a closed file: that would abort the process)."""
    import errno
    import os

    import converters.torch_zip_writer as writer
    from bundles.errors import DiskFull

    written = [0]

    def fills_up(n: int) -> None:
        written[0] += n
        if written[0] > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")

    if where == "kernel copy":
        copy = os.copy_file_range

        def copy_file_range(src, dst, count, offset_src=None, offset_dst=None):
            fills_up(count)
            return copy(src, dst, count, offset_src, offset_dst)

        monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    else:
        write_all = writer._write_all

        def filling(out, data):
            fills_up(memoryview(data).nbytes)
            write_all(out, data)

        monkeypatch.setattr(writer, "_write_all", filling)
        monkeypatch.setattr(writer, "_kernel_copy", lambda *args: False)  # every byte through the writes
    with pytest.raises(DiskFull, match="model.pt"):
        export_fairseq(bundle_dir, tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kernel", ["cannot copy across these files", "has no copy_file_range"])
def test_without_the_kernel_copy_the_file_is_the_same(kernel, bundle_dir, tmp_path, monkeypatch):
    """Where copy_file_range is refused (another file system, an old kernel) or missing (macOS), the bytes are read,
    summed and written by the writer itself."""
    import errno
    import os

    if kernel == "has no copy_file_range":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    else:
        def refuses(*_args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", refuses)
    out = export_fairseq(bundle_dir, tmp_path / "streamed.pt")
    assert_same_file(out, in_memory_export(bundle_dir, tmp_path / "in_memory.pt"))
