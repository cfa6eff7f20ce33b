"""`continue-pt shards index`: existing WebDataset tar shards (no shards.json) indexed and trained on."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from continue_pt.audio import read_audio
from continue_pt.cli import cli
from continue_pt.demo import demo_audio
from continue_pt.shard_format import INDEX_NAME
from continue_pt.shard_index import expand_braces, index_shards
from continue_pt.shard_read import read_item, scan_shards
from continue_pt.shard_write import write_shards
from tests.range_server import served
from tests.training_helpers import logged_rows

wds = pytest.importorskip("webdataset")

SHARDS = 3
PER_SHARD = 3
AUDIO = ("wav", "flac", "mp3", "opus")


def _source_audio(root: Path, number: int) -> Path:
    """Utterance ``number``: 1.2-2 s, 16 kHz or 48 kHz, wav or flac (16/24-bit), one mp3, one opus, one stereo."""
    rate = 48000 if number % 3 == 1 else 16000
    wave = demo_audio(1.2 + 0.1 * number, seed=40 + number)[0].numpy()
    if rate != 16000:
        wave = np.repeat(wave, 3)
    if number == 4:
        wave = np.stack([wave, -0.5 * wave], axis=1)
    ext = {7: "mp3", 8: "opus"}.get(number, "flac" if number % 2 else "wav")
    path = root / f"utt{number:02d}.{ext}"
    if ext in ("mp3", "opus"):  # lossy: frames from their headers must still match what decoding gives
        sf.write(path, wave, rate, format="MP3" if ext == "mp3" else "OGG",
                 subtype="MPEG_LAYER_III" if ext == "mp3" else "OPUS")
    else:
        sf.write(path, wave, rate, subtype="PCM_24" if number == 5 else "PCM_16")
    return path


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """WebDataset shards as published: ``KEY.wav|flac`` beside ``KEY.json`` and ``KEY.txt``, written with
    webdataset's own TarWriter; one sample with a second audio member, one with an unreadable one, one without
    audio. Returns the shard directory and, per indexed name, the source file."""
    root = tmp_path_factory.mktemp("published")
    sources, shard_dir = root / "sources", root / "shards"
    sources.mkdir()
    shard_dir.mkdir()
    expected = {}
    for shard in range(SHARDS):
        with wds.TarWriter(str(shard_dir / f"train-{shard:06d}.tar")) as sink:
            for i in range(PER_SHARD):
                number = shard * PER_SHARD + i
                path = _source_audio(sources, number)
                key = f"spk{shard}_{number:04d}"
                ext = path.suffix.lstrip(".")
                sample = {"__key__": key, ext: path.read_bytes(), "json": {"speaker": shard, "name": "not ours"},
                          "txt": f"transcript {number}"}
                if number == 2:  # a second audio member (a denoised copy, say): the first is indexed
                    sample["x_denoised.wav"] = path.read_bytes() if ext == "wav" else b"RIFF"
                sink.write(sample)
                expected[f"{key}.{ext}"] = path
            if shard == 1:
                sink.write({"__key__": "broken_0001", "wav": b"RIFF not really a wav", "txt": "x"})
                sink.write({"__key__": "textonly_0001", "txt": "no audio here"})
    return shard_dir, expected


def _indexed(shard_dir: Path, out: Path | None = None, *extra: str):
    args = ["shards", "index", str(shard_dir), *(["-o", str(out)] if out else []), *extra]
    return CliRunner().invoke(cli, args)


def test_published_shards_are_indexed_and_read_back_as_their_sources(published, tmp_path):
    shard_dir, expected = published
    work = tmp_path / "shards"
    shutil.copytree(shard_dir, work)
    result = _indexed(work)
    assert result.exit_code == 0, result.output
    assert f"indexed {len(expected)} utterances" in result.output and "in 3 shards" in result.output
    assert "broken_0001.wav" in result.output  # the unreadable member is named, and skipped
    assert "more than one audio member" in result.output and "x_denoised.wav" in result.output
    assert "not audio" in result.output and ".txt" in result.output
    index = json.loads((work / INDEX_NAME).read_text())
    assert index["items"]["name"] == list(expected)  # shard order, then member order
    assert [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(SHARDS)]
    scan = scan_shards(work, 16000, min_seconds=0)
    assert [i.name for i in scan.items] == list(expected)
    for item in scan.items:
        source = expected[item.name]
        info = sf.info(source)
        position = index["items"]["name"].index(item.name)
        assert (index["items"]["frames"][position], index["items"]["sample_rate"][position],
                index["items"]["channels"][position]) == (info.frames, info.samplerate, info.channels)
        assert torch.equal(read_item(item, 16000), read_audio(source, 16000))  # every utterance, decoded
    assert {index["items"]["sample_rate"][i] for i in range(len(expected))} == {16000, 48000}
    assert max(index["items"]["channels"]) == 2
    assert {name.rsplit(".", 1)[1] for name in index["items"]["name"]} == set(AUDIO)


def test_samples_are_grouped_as_webdataset_groups_them(published, tmp_path):
    shard_dir, expected = published
    work = tmp_path / "shards"
    shutil.copytree(shard_dir, work)
    index_shards(work)
    index = json.loads((work / INDEX_NAME).read_text())
    urls = sorted(str(p) for p in work.glob("*.tar"))
    samples = [s for s in wds.WebDataset(urls, shardshuffle=False) if not s["__key__"].startswith("broken")]
    audio = [(s["__key__"], next((ext for ext in AUDIO if ext in s), None)) for s in samples]
    assert [f"{key}.{ext}" for key, ext in audio if ext] == index["items"]["name"]
    assert [len(s[ext]) for s, (_, ext) in zip(samples, audio) if ext] == index["items"]["size"]


def test_our_own_shards_index_to_the_index_shards_write_wrote(audio_dir, tmp_path):
    out = tmp_path / "set"
    write_shards(audio_dir, out, 70_000, "flac")
    written = json.loads((out / INDEX_NAME).read_text())
    (out / INDEX_NAME).unlink()
    report = index_shards(out)
    indexed = json.loads((out / INDEX_NAME).read_text())
    assert report.items == len(written["items"]["name"]) and len(written["shards"]) > 1
    assert indexed["items"] == written["items"]  # names (from our KEY.json), shards, offsets, sizes, lengths
    assert indexed["shards"] == written["shards"]  # names, bytes, sha256, members


def test_an_index_elsewhere_reads_local_shards_by_path_and_served_ones_by_url(published, tmp_path):
    shard_dir, expected = published
    local = tmp_path / "index_local"
    result = _indexed(shard_dir, local)
    assert result.exit_code == 0, result.output
    assert not (shard_dir / INDEX_NAME).exists()  # the tars' directory is left as it was
    names = [s["name"] for s in json.loads((local / INDEX_NAME).read_text())["shards"]]
    assert all(n.startswith("../") and n.endswith(".tar") for n in names)  # relative: the pair may move together
    scan = scan_shards(local, 16000, min_seconds=0)
    assert [i.name for i in scan.items] == list(expected)
    with served(shard_dir) as url:
        remote = tmp_path / "index_remote"
        assert _indexed(shard_dir, remote, "--base-url", url).exit_code == 0
        assert json.loads((remote / INDEX_NAME).read_text())["shards"][0]["name"] == url + "train-000000.tar"
        over_http = scan_shards(remote, 16000, min_seconds=0)
        for a, b in zip(scan.items, over_http.items):
            assert a.name == b.name and torch.equal(read_item(a, 16000), read_item(b, 16000))


def test_brace_patterns_name_the_shards_as_webdataset_expands_them(published, tmp_path):
    braceexpand = pytest.importorskip("braceexpand")
    for pattern in ("train-{000000..000012}.tar", "a{1..3}b{x,y}", "{009..011}", "plain.tar", "{3..1}"):
        assert expand_braces(pattern) == list(braceexpand.braceexpand(pattern)), pattern
    shard_dir, expected = published
    pattern = str(shard_dir / "train-{000000..000001}.tar")
    index_shards(pattern, tmp_path / "two")
    names = json.loads((tmp_path / "two" / INDEX_NAME).read_text())["items"]["name"]
    assert names == list(expected)[:2 * PER_SHARD]


@pytest.mark.slow
def test_pretrain_runs_from_indexed_published_shards(published, bundle_dir, tmp_path):
    shard_dir, _ = published
    work = tmp_path / "shards"
    shutil.copytree(shard_dir, work)
    assert _indexed(work).exit_code == 0
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--init-from", str(bundle_dir), "--train-data", str(work),
                                      "--output-dir", str(out), "--max-steps", "2", "--accelerator", "cpu",
                                      "--min-seconds", "1", "--max-batch-seconds", "4", "--num-workers", "0",
                                      "--val-fraction", "0", "--warmup-steps", "1", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    rows = logged_rows(out / "metrics.csv")
    assert len(rows) == 2 and all(np.isfinite(float(r["train/loss"])) for r in rows), result.output
    assert (out / "bundle" / "model.safetensors").is_file()


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("a_file", "is not a directory"),
    ("no_tars", "holds no .tar shards"),
    ("tar_gz", "compressed tars (a.tar.gz)"),
    ("gzip_inside", "a.tar is gzip-compressed"),
    ("empty_tar", "a.tar is empty"),
    ("not_a_tar", "a.tar is not a tar file"),
    ("no_audio", "hold no readable audio member"),
    ("foreign_index", "exists and is not a continue-pt shard index"),
    ("truncated", "a.tar: cannot be read to its end as a tar"),
    ("output_under_a_file", "is a file, not a directory"),
    ("url", "is remote"),
    ("bad_base_url", "is not an http(s):// URL"),
    ("missing_in_pattern", "1 of them missing: b-2.tar"),
])
def test_bad_input_is_one_error_line(case, expected, tmp_path):
    src, out, extra = tmp_path / "shards", None, []
    src.mkdir()
    good = _tar_bytes({"k.txt": b"x", "k.wav": _wav_bytes()})
    (src / "a.tar").write_bytes(good)
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "a_file":
        src = src / "a.tar"
    elif case == "no_tars":
        (src / "a.tar").rename(src / "a.zip")
    elif case == "tar_gz":
        (src / "a.tar").rename(src / "a.tar.gz")
        (src / "b.tar").write_bytes(good)
    elif case == "gzip_inside":
        (src / "a.tar").write_bytes(gzip.compress(good))
    elif case == "empty_tar":
        (src / "a.tar").write_bytes(_tar_bytes({}))
    elif case == "not_a_tar":
        (src / "a.tar").write_bytes(b"this is text, not a tar archive" * 40)
    elif case == "no_audio":
        (src / "a.tar").write_bytes(_tar_bytes({"k.txt": b"x", "k.json": b"{}"}))
    elif case == "truncated":  # cut inside the second member's header
        (src / "a.tar").write_bytes(good[:1024 + 100])
    elif case == "foreign_index":
        (src / INDEX_NAME).write_text('{"shards": "someone else\'s"}')
    elif case == "output_under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "index"
    elif case == "url":
        src = "http://127.0.0.1:9/shards/"
    elif case == "bad_base_url":
        extra = ["--base-url", "ftp://example.org/x"]
    elif case == "missing_in_pattern":
        (src / "b-1.tar").write_bytes(good)
        src = str(src / "b-{1..2}.tar")
    result = _indexed(src, out, *extra)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and expected in result.output, result.output
    assert "Traceback" not in result.output
    if case == "foreign_index":
        assert "someone else" in (src / INDEX_NAME).read_text()  # left as it was
    elif isinstance(src, Path) and src.is_dir():
        assert not (src / INDEX_NAME).exists()


def _wav_bytes() -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(1600, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def test_a_key_repeated_in_another_shard_gets_a_unique_name(tmp_path):
    (tmp_path / "a.tar").write_bytes(_tar_bytes({"000.wav": _wav_bytes(), "001.wav": _wav_bytes()}))
    (tmp_path / "b.tar").write_bytes(_tar_bytes({"000.wav": _wav_bytes()}))
    report = index_shards(tmp_path)
    names = json.loads((tmp_path / INDEX_NAME).read_text())["items"]["name"]
    assert names == ["000.wav", "001.wav", "b.tar/000.wav"] and report.renamed == 1
    assert any("repeat an earlier shard's key" in note for note in report.notes())


def test_a_read_only_shard_directory_asks_for_another_index_directory(tmp_path, monkeypatch):
    import os

    shards = tmp_path / "read_only"
    shards.mkdir()
    (shards / "a.tar").write_bytes(_tar_bytes({"k.wav": _wav_bytes()}))
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == shards else real(path, mode))
    result = _indexed(shards)  # as root the directory would be writable whatever its mode: access is faked
    assert result.exit_code == 1 and "is not writable" in result.output and "-o INDEX_DIR" in result.output
    assert _indexed(shards, tmp_path / "index").exit_code == 0
    assert len(scan_shards(tmp_path / "index", 16000, min_seconds=0).items) == 1
