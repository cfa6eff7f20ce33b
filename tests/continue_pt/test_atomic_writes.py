"""Nothing half-written: a full disk while writing a bundle or a training checkpoint leaves what was there intact and
says which file and how much space it needed; files and bundle folders get the permissions the umask gives."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
import soundfile as sf
import torch

from bundles import load_bundle
from bundles.errors import DiskFull, FileProblem
from bundles.kmeans import KMeansModel, save_kmeans
from continue_pt import checkpoint_io
from continue_pt.checkpoint_io import AtomicCheckpointIO, checkpoint_bytes
from continue_pt.curves import write_curves
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio
from continue_pt.labels import write_texts_atomically
from converters.convert import convert_checkpoint


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------------ permissions


def test_atomically_written_files_follow_the_umask(tmp_path, umask_027):
    save_kmeans(KMeansModel(torch.randn(4, 3), layer=1), tmp_path / "kmeans.safetensors")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss\n0,2.5\n1,2.0\n")
    png, summary = write_curves(run)
    labels = {tmp_path / "train.tsv": "/\n", tmp_path / "train.km": "1 2\n", tmp_path / "dict.km.txt": "0 1\n"}
    write_texts_atomically(labels)
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "ckpts" / "last.ckpt")
    bundle = convert_checkpoint(CHECKPOINT, tmp_path / "bundle", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    files = [tmp_path / "kmeans.safetensors", png, summary, *labels, tmp_path / "ckpts" / "last.ckpt",
             *bundle.iterdir()]
    assert {f.name: oct(_mode(f)) for f in files} == {f.name: oct(0o640) for f in files}
    assert _mode(bundle) == 0o750
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary left anywhere


# ------------------------------------------------------------------------------------------------ bundles


def test_a_full_disk_while_overwriting_a_bundle_leaves_the_old_one(tmp_path, monkeypatch):
    out = convert_checkpoint(CHECKPOINT, tmp_path / "bundle", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    before = _tree(out)
    from bundles import safetensors_stream

    real_write_all = safetensors_stream._write_all
    calls = []

    def fills_up(fh, data):  # the header and a first tensor go in, then the disk is full half-way into the next
        calls.append(1)
        if len(calls) == 3:
            real_write_all(fh, memoryview(data)[: len(memoryview(data)) // 2])
            _no_space()
        real_write_all(fh, data)

    monkeypatch.delattr(os, "copy_file_range", raising=False)  # every byte through _write_all
    monkeypatch.setattr(safetensors_stream, "_write_all", fills_up)
    with pytest.raises(FileProblem) as full:  # the converter's ConversionError, with the DiskFull's message
        convert_checkpoint(CHECKPOINT, out, kmeans=KMEANS, kmeans_layer=KMEANS_LAYER, overwrite=True)
    message = str(full.value)
    size = (out / "model.safetensors").stat().st_size
    assert f"{out / 'model.safetensors'}: could not be written (No space left on device): it needs" in message
    assert f"({size} bytes)" in message and "the whole bundle needs" in message and "free there" in message
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no .partial directory left
    load_bundle(out).get_pretrain_model()


def test_a_full_disk_on_a_kmeans_file_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "km.safetensors"
    save_kmeans(KMeansModel(torch.ones(4, 3), layer=1), path)
    before = path.read_bytes()
    monkeypatch.setattr("bundles.kmeans.save_file", _no_space)
    with pytest.raises(DiskFull, match=r"km.safetensors: could not be written \(No space left on device\): it needs"):
        save_kmeans(KMeansModel(torch.zeros(4, 3), layer=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["km.safetensors"]


# ------------------------------------------------------------------------------------------------ checkpoints


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(10)}, path)
    before = path.read_bytes()
    big = {"step": 2, "w": torch.ones(1000), "same": None}
    big["same"] = big["w"]  # shared storage counts once

    def half_then_full(checkpoint, tmp):
        tmp.write_bytes(b"PK" * 100)
        _no_space()

    monkeypatch.setattr(checkpoint_io, "write_checkpoint", half_then_full)
    with pytest.raises(DiskFull) as full:
        io.save_checkpoint(big, path)
    assert f"{path}: could not be written (No space left on device): it needs 3.9 KiB (4000 bytes)" in str(full.value)
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert checkpoint_bytes(big) == 4000


def test_a_full_disk_mid_training_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from continue_pt.pretrain import PretrainOptions, run_pretraining

    bundle = convert_checkpoint(CHECKPOINT, tmp_path / "bundle", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(4):
        sf.write(audio / f"utt{i}.wav", demo_audio(2.0, seed=i)[0].numpy(), 16000)
    real = checkpoint_io.write_checkpoint

    def full_at_step_4(checkpoint, tmp):
        if checkpoint["global_step"] >= 4:
            _no_space()
        real(checkpoint, tmp)

    monkeypatch.setattr(checkpoint_io, "write_checkpoint", full_at_step_4)
    out = tmp_path / "run"
    options = PretrainOptions(train_data=str(audio), output_dir=str(out), init_from=str(bundle), max_steps=4,
                              max_batch_seconds=4.0, min_seconds=1.0, num_workers=0, warmup_steps=1,
                              checkpoint_every=2, log_every=1, progress_bar=False)
    with pytest.raises(DiskFull, match=r"step-step=4.ckpt: could not be written \(No space left"):
        run_pretraining(options)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-step=2.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")["global_step"] == 2
    assert not (out / "bundle").exists()


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import bundles.writing as writing
    from continue_pt.cli import cli

    monkeypatch.setattr(writing, "write_safetensors_streaming", _no_space)
    result = CliRunner().invoke(cli, ["convert", str(CHECKPOINT), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "model.safetensors: could not be written (No space left on device)" in lines[0]
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []
