"""Sharded corpora: `continue-pt shards write`, and training from local and remote (http on 127.0.0.1) shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from bundles import load_bundle
from continue_pt.cli import cli
from continue_pt.audio import read_audio
from continue_pt.demo import demo_audio
from continue_pt.options import PretrainOptions, PretrainOptionsError
from continue_pt.pretrain import run_pretraining
from continue_pt.shard_format import INDEX_NAME, ShardError, parse_size
from continue_pt.shard_read import read_item, scan_shards
from continue_pt.shard_write import write_shards
from tests.range_server import served
from tests.training_helpers import StopAt, logged_rows

SHARD_SIZE = 200_000
MIN_TEST_SHARD = 70_000
"""Three 2-second 16 kHz FLAC utterances per shard at most: the eight of `audio_dir` span several shards."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Twelve utterances of 1.2-2.3 s: 16-bit and 24-bit PCM, 16 and 48 kHz, one stereo, in a subdirectory too."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "spk").mkdir()
    for i in range(12):
        rate = 48000 if i % 4 == 3 else 16000
        wave = demo_audio(1.2 + 0.1 * i, seed=20 + i)[0].numpy()
        if rate != 16000:
            wave = np.repeat(wave, 3)
        if i == 5:
            wave = np.stack([wave, -0.5 * wave], axis=1)
        subtype = "PCM_24" if i % 5 == 1 else "PCM_16"
        sf.write(root / ("spk" if i % 2 else ".") / f"utt.{i:02d}.wav", wave, rate, subtype=subtype)
    (root / "README.txt").write_text("not audio")
    return root


@pytest.fixture(scope="module")
def shard_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "set"
    write_shards(corpus, out, SHARD_SIZE, "flac")
    return out


# ------------------------------------------------------------------------------------------------ writing


@pytest.mark.parametrize("fmt", ["original", "flac", "wav"])
def test_written_shards_decode_to_the_source_and_respect_the_size(corpus, tmp_path, fmt):
    report = write_shards(corpus, tmp_path / "set", SHARD_SIZE, fmt)
    index = json.loads((tmp_path / "set" / INDEX_NAME).read_text())
    names = index["items"]["name"]
    assert names == sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.wav"))
    assert report.items == 12 and len(index["shards"]) == len(report.shards) >= 3
    for shard in index["shards"]:
        path = tmp_path / "set" / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        assert shard["bytes"] <= SHARD_SIZE or shard["members"] == 1  # a larger utterance gets a shard of its own
        with tarfile.open(path) as tar:  # a plain tar: KEY.EXT + KEY.json per utterance (WebDataset's layout)
            members = tar.getnames()
        assert len(members) == 2 * shard["members"]
        assert all(m.split(".")[0] == n.split(".")[0] for m, n in zip(members[::2], members[1::2]))
    scan = scan_shards(tmp_path / "set", 16000, min_seconds=0)
    for item in scan.items:
        expected, _ = sf.read(corpus / item.name, dtype="float32", always_2d=True)
        data = (tmp_path / "set" / item.member.shard).read_bytes()[item.member.offset:][:item.member.size]
        got, _ = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        np.testing.assert_array_equal(got, expected)  # bit for bit, every format
        assert torch.equal(read_item(item, 16000), read_audio(corpus / item.name, 16000))
    assert max(s["members"] for s in index["shards"]) > 1
    if fmt == "flac":
        assert report.formats["flac"] == 12
    # byte-identical when written again (the tars carry no time or owner)
    write_shards(corpus, tmp_path / "again", SHARD_SIZE, fmt)
    assert json.loads((tmp_path / "again" / INDEX_NAME).read_text())["shards"] == index["shards"]


def test_a_manifest_is_written_in_its_own_order(corpus, tmp_path):
    names = [p.relative_to(corpus).as_posix() for p in sorted(corpus.rglob("*.wav"), reverse=True)][:5]
    manifest = tmp_path / "train.tsv"
    manifest.write_text(str(corpus) + "\n" + "".join(f"{n}\t{sf.info(corpus / n).frames}\n" for n in names))
    write_shards(manifest, tmp_path / "set", SHARD_SIZE, "original")
    assert [i.name for i in scan_shards(tmp_path / "set", 16000, 0).items] == names


def test_webdataset_reads_the_shards(shard_dir):
    wds = pytest.importorskip("webdataset")
    index = json.loads((shard_dir / INDEX_NAME).read_text())
    urls = [str(shard_dir / s["name"]) for s in index["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [json.loads(s["json"])["name"] for s in samples] == index["items"]["name"]
    assert [len(s["flac"]) for s in samples] == index["items"]["size"]


def test_a_failure_leaves_no_shard_and_no_index(corpus, tmp_path, monkeypatch):
    from continue_pt import shard_write

    real, calls = shard_write.encoded, []

    def failing(path, fmt):
        calls.append(path)
        if len(calls) == 9:
            raise OSError(28, "No space left on device")
        return real(path, fmt)

    monkeypatch.setattr(shard_write, "encoded", failing)
    with pytest.raises(OSError):
        write_shards(corpus, tmp_path / "set", SHARD_SIZE, "flac")
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("no_audio", "holds no audio files"),
    ("not_empty", "is not an empty directory"),
    ("under_a_file", "is a file, not a directory"),
    ("bad_size", "'1XB' is not a size"),
    ("tiny_size", "below the smallest useful size"),
])
def test_bad_input_is_one_error_line(corpus, tmp_path, case, expected):
    src, out, size = corpus, tmp_path / "out", "1GB"
    if case == "missing":
        src = tmp_path / "nowhere"
    elif case == "no_audio":
        src = tmp_path / "text"
        src.mkdir()
        (src / "a.txt").write_text("x")
    elif case == "not_empty":
        out.mkdir()
        (out / "old.tar").write_text("x")
    elif case == "under_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    elif case == "bad_size":
        size = "1XB"
    elif case == "tiny_size":
        size = "10KB"
    result = CliRunner().invoke(cli, ["shards", "write", str(src), "-o", str(out), "--shard-size", size])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and expected in result.output
    assert "Traceback" not in result.output
    assert not (out / INDEX_NAME).exists()


def test_sizes_parse_like_the_issue_writes_them():
    assert parse_size("1GB") == 10 ** 9 and parse_size("500MB") == 5 * 10 ** 8
    assert parse_size("2GiB") == 2 * 2 ** 30 and parse_size("4096") == 4096 and parse_size("1.5 kb") == 1500
    with pytest.raises(ValueError):
        parse_size("GB")


def test_the_cli_writes_and_says_what_it_did(corpus, tmp_path):
    result = CliRunner().invoke(cli, ["shards", "write", str(corpus), "-o", str(tmp_path / "s"),
                                      "--shard-size", "200KB", "--format", "flac"])
    assert result.exit_code == 0, result.output
    assert "wrote 12 utterances" in result.output and "README.txt" in result.output
    assert (tmp_path / "s" / INDEX_NAME).is_file()


# ------------------------------------------------------------------------------------------------ reading


def test_a_shard_set_scans_like_its_directory(corpus, shard_dir):
    from continue_pt.corpus import scan_audio

    direct, sharded = scan_audio(corpus, 16000, 1.5), scan_shards(shard_dir, 16000, 1.5)
    assert [(i.name, i.num_samples) for i in sharded.items] == [(i.name, i.num_samples) for i in direct.items]
    assert len(sharded.skipped) == len(direct.skipped) - 1  # the README.txt is not in the shards


def test_damaged_shard_sets_are_named(shard_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    (broken / "shard-000001.tar").unlink()
    with open(broken / "shard-000002.tar", "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(ShardError, match="shard-000001.tar is missing") as info:
        scan_shards(broken, 16000)
    assert "shard-000002.tar has 1000 bytes" in str(info.value)
    (broken / INDEX_NAME).write_text("{\"format\": \"other\"}")
    with pytest.raises(ShardError, match="not a continue-pt shard index"):
        scan_shards(broken, 16000)


@pytest.mark.slow
def test_remote_shards_read_like_local_ones(shard_dir):
    local = scan_shards(shard_dir, 16000, 0)
    with served(shard_dir.parent) as url:
        remote = scan_shards(url + shard_dir.name + "/", 16000, 0)
        assert [(i.name, i.num_samples) for i in remote.items] == [(i.name, i.num_samples) for i in local.items]
        for a, b in zip(local.items[:4], remote.items[:4]):
            assert torch.equal(read_item(a, 16000), read_item(b, 16000))
        with pytest.raises(ShardError, match="HTTP 404") as info:
            scan_shards(url + "nothing/", 16000)
        assert "http://127.0.0.1" in str(info.value)  # the URL as given, not folded into a path
    with served(shard_dir.parent, ignore_ranges=True) as url:
        item = scan_shards(url + shard_dir.name, 16000, 0).items[0]
        with pytest.raises(Exception, match="ignores Range requests"):
            read_item(item, 16000)


def test_validation_data_may_be_shards_and_training_a_held_out_share(corpus, shard_dir):
    from continue_pt.data import AudioDataModule

    held_out = AudioDataModule(shard_dir, min_seconds=1.0, val_fraction=0.2, num_workers=0)
    held_out.setup()
    as_directory = AudioDataModule(corpus, min_seconds=1.0, val_fraction=0.2, num_workers=0)
    as_directory.setup()
    for split in ("train_dataset", "val_dataset"):  # the same split by name as the directory's
        assert [i.name for i in getattr(held_out, split).items] == [i.name for i in getattr(as_directory, split).items]
    separate = AudioDataModule(corpus, shard_dir, min_seconds=1.0, num_workers=0)
    separate.setup()
    assert len(separate.val_dataset) == 12 and all(i.member is not None for i in separate.val_dataset.items)
    assert separate.val_dataset[0]["waveform"].shape[0] == separate.val_dataset.items[0].num_samples


def test_offline_labels_are_refused_with_shards(shard_dir, tmp_path, bundle_dir):
    options = PretrainOptions(train_data=str(shard_dir), output_dir=str(tmp_path / "o"), init_from=str(bundle_dir),
                              labels=str(shard_dir / INDEX_NAME), label_dict=str(shard_dir / INDEX_NAME))
    with pytest.raises(PretrainOptionsError, match="offline frame labels are not read with the shard set"):
        options.validate()


# ------------------------------------------------------------------------------------------------ verifying


def _verify(*args: str):
    result = CliRunner().invoke(cli, ["shards", "verify", *args])
    assert "Traceback" not in result.output, result.output
    return result


def test_verify_passes_a_good_set_locally_and_by_url(shard_dir):
    shards = len(json.loads((shard_dir / INDEX_NAME).read_text())["shards"])
    result = _verify(str(shard_dir), "--decode")
    assert result.exit_code == 0, result.output
    assert f"{shards} shards" in result.output and f"sha256 matches the index for {shards};" in result.output
    assert "12 utterances decoded to their indexed length" in result.output
    with served(shard_dir.parent) as url:
        remote = _verify(url + shard_dir.name + "/")
    assert remote.exit_code == 0 and f"sha256 matches the index for {shards};" in remote.output, remote.output


def test_verify_names_every_changed_shard_and_undecodable_utterance(shard_dir, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(shard_dir, damaged)
    index = json.loads((damaged / INDEX_NAME).read_text())
    first, second = index["shards"][0]["name"], index["shards"][1]["name"]
    items = index["items"]
    for name in (first, second):  # 64 bytes zeroed inside the shard's first utterance: same size, other bytes
        i = items["shard"].index(next(n for n, s in enumerate(index["shards"]) if s["name"] == name))
        with open(damaged / name, "r+b") as fh:
            fh.seek(items["offset"][i] + items["size"][i] // 2)
            fh.write(bytes(64))
    result = _verify(str(damaged))
    output = result.output
    assert result.exit_code == 1
    assert output.startswith(f"Error: {damaged}:") and f"{first}: sha256" in output and f"{second}: sha256" in output
    assert "Copy the shard set again" in output
    decoded = _verify(str(damaged), "--decode").output
    assert f"{first}/{items['name'][0]} does not decode" in decoded  # FLAC loses sync in the zeroed bytes
    (damaged / first).write_bytes((damaged / first).read_bytes()[:-1000])  # truncated: named before hashing
    assert f"{first} has " in _verify(str(damaged)).output


def test_verify_without_recorded_hashes_checks_sizes_and_decodes(shard_dir, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(shard_dir, bare)
    index = json.loads((bare / INDEX_NAME).read_text())
    for shard in index["shards"]:  # an index written by hand, or by another tool
        del shard["sha256"]
    (bare / INDEX_NAME).write_text(json.dumps(index))
    result = _verify(str(bare), "--decode")
    assert result.exit_code == 0, result.output
    assert "sha256 matches the index for 0 (" in result.output and "without a recorded sha256" in result.output
    assert "12 utterances decoded" in result.output


# ------------------------------------------------------------------------------------------------ k-means tools


@pytest.mark.slow
def test_kmeans_fit_and_check_read_a_shard_set_like_its_directory(corpus, shard_dir, hubert_bundle):
    """`kmeans fit` and `kmeans check` take a shard set, local or by URL, and measure what they measure on the
    directory it was written from: the same centroids, the same report."""
    from continue_pt.kmeans_check import check_kmeans
    from continue_pt.kmeans_fit import fit_kmeans

    def fit(source):
        return fit_kmeans(hubert_bundle, 1, source, 4, seed=3, batch_seconds=2.0, min_seconds=1.0)

    def report(source):
        data = check_kmeans(hubert_bundle, None, source, seed=1, shuffles=20).to_dict()
        return {k: v for k, v in data.items() if k != "skipped"}  # the README.txt is not in the shards

    direct, sharded = fit(corpus), fit(shard_dir)
    assert sharded.frames_seen == direct.frames_seen > 0 and not sharded.files_skipped
    assert torch.equal(sharded.kmeans.centroids, direct.kmeans.centroids)
    measured = report(corpus)
    assert measured["accuracy"] is not None and report(shard_dir) == measured
    with served(shard_dir.parent) as url:
        remote = fit(url + shard_dir.name + "/")
    assert torch.equal(remote.kmeans.centroids, direct.kmeans.centroids)


def test_labels_dump_refuses_a_shard_set_in_one_error_line(shard_dir, bundle_dir, tmp_path):
    for source in (str(shard_dir), "http://127.0.0.1:9/corpus/"):
        result = CliRunner().invoke(cli, ["labels", "dump", "--teacher", str(bundle_dir), "--audio", source,
                                          "-o", str(tmp_path / "labels")])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
        assert error and f"{source}: is a shard set" in error[0] and "online targets" in result.output
        assert not (tmp_path / "labels").exists()


# ------------------------------------------------------------------------------------------------ training


def _options(bundle_dir: Path, data: str, out: Path, **overrides) -> PretrainOptions:
    values = dict(train_data=data, output_dir=str(out), init_from=str(bundle_dir), max_steps=6, accumulate=1,
                  max_batch_seconds=4.0, min_seconds=1.0, num_workers=0, warmup_steps=2, checkpoint_every=3,
                  log_every=1, val_fraction=0.0)
    values.update(overrides)
    return PretrainOptions(**values)


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = load_bundle(a).state_dict(), load_bundle(b).state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_shards_train_like_the_directory_and_resume_exactly_mid_shard(bundle_dir, corpus, shard_dir, tmp_path):
    """The same weights from the directory, from its shards served over http, and from the local shards stopped
    after step 3 (inside an epoch: batches draw from every shard) and resumed, with a data-loader worker."""
    from_dir = run_pretraining(_options(bundle_dir, str(corpus), tmp_path / "dir"))
    with served(shard_dir.parent) as url:
        remote = run_pretraining(_options(bundle_dir, url + shard_dir.name + "/", tmp_path / "remote"))
    assert _same_weights(from_dir.bundle_dir, remote.bundle_dir)
    part = _options(bundle_dir, str(shard_dir), tmp_path / "part", num_workers=1)
    first = run_pretraining(part, callbacks=[StopAt(3)])
    assert len(logged_rows(first.metrics_csv)) == 3
    resumed = run_pretraining(_options(bundle_dir, str(shard_dir), tmp_path / "part", num_workers=1, init_from=None,
                                       resume=str(first.checkpoint_dir / "step-step=3.ckpt")))
    losses = [float(r["train/loss"]) for r in logged_rows(from_dir.metrics_csv)]
    assert [float(r["train/loss"]) for r in logged_rows(resumed.metrics_csv)][-3:] == losses[3:]
    assert _same_weights(from_dir.bundle_dir, resumed.bundle_dir)


_DDP_RUN = ("max_steps: 3\nwarmup_steps: 1\nlr: 0.001\nmax_batch_seconds: 2.0\nmin_seconds: 1.0\nval_fraction: 0\n"
            "num_workers: 0\ncheckpoint_every: 100\nlog_every: 1\nprogress_bar: false\naccelerator: cpu\n")
"""Eight 2-second files, one per micro-batch: 8 batches an epoch, 3 optimizer steps of 2 files."""


@pytest.mark.slow
def test_two_process_ddp_from_shards_equals_one_process_from_the_directory(bundle_dir, audio_dir, tmp_path):
    """Each rank reads only its own batches' utterances from the shards; together they train what one process
    accumulating both micro-batches trains from the directory."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[2]
    shards = tmp_path / "shards"
    write_shards(audio_dir, shards, MIN_TEST_SHARD, "flac")
    config = tmp_path / "run.yaml"
    config.write_text(_DDP_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK",
                                                             "LOCAL_RANK", "NODE_RANK") and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    outs = {}
    for name, data, flags in (("one", audio_dir, ["--accumulate", "2"]), ("ddp", shards, ["--devices", "2"])):
        outs[name] = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "continue_pt.cli", "pretrain", "--config", str(config),
                               "--init-from", str(bundle_dir), "--train-data", str(data), "--output-dir",
                               str(outs[name]), *flags], env=env, capture_output=True, text=True, timeout=240,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    ours, reference = (load_file(outs[n] / "bundle/model.safetensors") for n in ("ddp", "one"))
    start = load_file(bundle_dir / "model.safetensors")
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(not torch.equal(reference[k], start[k]) for k in start), "nothing was trained"


def test_pretrain_from_an_unreachable_shard_url_is_one_error_line(bundle_dir, tmp_path, monkeypatch):
    import socket

    from continue_pt import shard_read

    monkeypatch.setattr(shard_read, "HTTP_TRIES", 1)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/corpus/"
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--init-from", str(bundle_dir), "--train-data", url,
                                      "--output-dir", str(out), "--max-steps", "2", "--accelerator", "cpu"])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert error and f"{url}shards.json: cannot be fetched" in error[0], result.output
    assert "Traceback" not in result.output and not out.exists()
