"""``hf://org/repo[@rev]`` offline, against a hub cache filled here in huggingface_hub's own layout.

The repository is a directory written by ``continue-pt export --to hf`` from the test bundle; its blobs are named
by the checksums the hub publishes (sha256 for LFS files, git's blob id for the others), as huggingface_hub stores
them, so the verification sees what it would see after a real download.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from converters.convert import convert_checkpoint
from converters.download import DownloadError
from converters.hf_export import export_hf
from converters.hub import _weight_patterns, fetch_hf, parse_hf_id
from converters.integrity import git_blob_sha1_of_file, sha256_of_file
from converters.sources import FetchSettings, resolve_source

REPO = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_dir(bundle_dir, tmp_path_factory) -> Path:
    return export_hf(bundle_dir, tmp_path_factory.mktemp("hf") / "tiny")


def _fill_hub_cache(hf_dir: Path, cache: Path, repo_id: str = "org/tiny") -> Path:
    """huggingface_hub's layout: models--ORG--REPO/{blobs/ETAG, snapshots/COMMIT/FILE -> blob, refs/main}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir()
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    for file in sorted(hf_dir.iterdir()):
        etag = sha256_of_file(file) if file.suffix == ".safetensors" else git_blob_sha1_of_file(file)
        shutil.copyfile(file, root / "blobs" / etag)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", etag))
    return snapshot


@pytest.fixture
def offline_cache(hf_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    _fill_hub_cache(hf_dir, cache)
    return cache


def test_git_blob_ids_are_what_git_computes(tmp_path):
    file = tmp_path / "f"
    file.write_bytes(b"hello\n")
    assert git_blob_sha1_of_file(file) == "ce013625030ba8dba906f756967f9e9ca394464a"  # `git hash-object`


def test_an_id_in_the_offline_cache_converts_to_the_bundle_it_came_from(offline_cache, bundle_dir, tmp_path):
    snapshot = fetch_hf("hf://org/tiny", verified_dir=tmp_path / "ours", hub_cache=offline_cache)
    assert snapshot == offline_cache / "models--org--tiny" / "snapshots" / COMMIT
    out = convert_checkpoint(snapshot, tmp_path / "bundle")
    original, back = load_file(bundle_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == back.keys()
    assert all(original[k].equal(back[k]) for k in original)
    # every file was verified once and remembered
    assert len(list((tmp_path / "ours" / "hub-verified").iterdir())) == len(list(snapshot.iterdir()))


def test_a_revision_selects_that_snapshot(offline_cache, tmp_path):
    assert fetch_hf(f"hf://org/tiny@{COMMIT}", verified_dir=tmp_path, hub_cache=offline_cache).name == COMMIT
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE is set"):
        fetch_hf("hf://org/tiny@v2", verified_dir=tmp_path, hub_cache=offline_cache)


def test_verified_files_are_not_hashed_again(offline_cache, tmp_path, monkeypatch):
    fetch_hf("hf://org/tiny", verified_dir=tmp_path, hub_cache=offline_cache)

    def no_hashing(path):
        raise AssertionError(f"{path} hashed again")

    monkeypatch.setattr("converters.hub.sha256_of_file", no_hashing)
    monkeypatch.setattr("converters.hub.git_blob_sha1_of_file", no_hashing)
    fetch_hf("hf://org/tiny", verified_dir=tmp_path, hub_cache=offline_cache)


def test_a_corrupted_blob_is_deleted_and_named(offline_cache, tmp_path):
    snapshot = offline_cache / "models--org--tiny" / "snapshots" / COMMIT
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(DownloadError) as info:
        fetch_hf("hf://org/tiny", verified_dir=tmp_path, hub_cache=offline_cache)
    message = str(info.value)
    assert message.startswith("hf://org/tiny: ") and f"model.safetensors: expected sha256 {blob.name}" in message
    assert "deleted" in message and "again" in message
    assert not blob.exists() and not (snapshot / "model.safetensors").is_symlink()


def test_an_id_missing_from_the_offline_cache_says_why(offline_cache, tmp_path):
    with pytest.raises(DownloadError, match=r"hf://org/other: could not be fetched.*HF_HUB_OFFLINE is set"):
        fetch_hf("hf://org/other", verified_dir=tmp_path, hub_cache=offline_cache)


@pytest.mark.parametrize("text", ["hf://", "hf://org", "hf://org/a/b", "hf://../x", "hf://org/x@"])
def test_malformed_ids_are_refused(text):
    with pytest.raises(DownloadError, match="not a Hugging Face model id"):
        parse_hf_id(text)


def test_ids_and_revisions_are_parsed():
    assert parse_hf_id("hf://facebook/hubert-large-ll60k") == ("facebook/hubert-large-ll60k", None)
    assert parse_hf_id("hf://facebook/hubert-large-ll60k@refs/pr/1") == ("facebook/hubert-large-ll60k", "refs/pr/1")


def test_weights_are_fetched_in_one_format_only():
    class Hub:
        def __init__(self, files):
            self.files = files

        def HfApi(self):  # noqa: N802 - huggingface_hub's name
            return self

        def list_repo_files(self, repo_id, revision=None):
            if isinstance(self.files, Exception):
                raise self.files
            return self.files

    assert _weight_patterns(Hub(["config.json", "model.safetensors", "pytorch_model.bin"]), "o/r", None) == \
        ["*.safetensors"]
    assert _weight_patterns(Hub(["config.json", "pytorch_model.bin"]), "o/r", None) == ["*.bin"]
    # unreachable: snapshot_download then falls back to what the cache holds, in either format
    assert _weight_patterns(Hub(ConnectionError("no route")), "o/r", None) == ["*.safetensors", "*.bin"]
    with pytest.raises(ZeroDivisionError):  # a bug is not taken for a network problem
        _weight_patterns(Hub(ZeroDivisionError()), "o/r", None)


def test_sha256_and_output_directory_do_not_apply_to_hub_ids(tmp_path):
    with pytest.raises(DownloadError, match="--sha256 does not apply"):
        resolve_source("hf://org/tiny", FetchSettings(cache_dir=tmp_path, sha256="0" * 64))
    with pytest.raises(DownloadError, match="not in -o DIR"):
        resolve_source("hf://org/tiny", FetchSettings(cache_dir=tmp_path, out_dir=tmp_path / "o"))


def test_without_huggingface_hub_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(DownloadError, match=r"pip install 'continue-pt\[hub\]'"):
        fetch_hf("hf://org/tiny", verified_dir=tmp_path)


@pytest.mark.slow
def test_cli_convert_and_download_of_an_id_honour_hf_hub_offline(hf_dir, tmp_path):
    """In a fresh process: HF_HUB_OFFLINE and HF_HUB_CACHE are read by huggingface_hub as the user sets them."""
    cache = tmp_path / "hub"
    snapshot = _fill_hub_cache(hf_dir, cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO),
           "CONTINUE_PT_CACHE": str(tmp_path / "ours")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "continue_pt.cli", *args], env=env, capture_output=True,
                              text=True, timeout=300)

    done = run("download", "hf://org/tiny")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(snapshot)
    done = run("convert", "hf://org/tiny", "-o", str(tmp_path / "bundle"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bundle" / "config.json").is_file()
    failed = run("convert", "hf://org/absent", "-o", str(tmp_path / "other"))
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert [line for line in failed.stderr.splitlines() if line.startswith("Error:")][0].startswith(
        "Error: hf://org/absent: could not be fetched")
    assert not (tmp_path / "other").exists()
