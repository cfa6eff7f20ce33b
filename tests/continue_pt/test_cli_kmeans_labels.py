"""`continue-pt kmeans fit` and `continue-pt labels dump` through the CLI, and their bad-input messages."""

from __future__ import annotations

import pytest
import soundfile as sf
from click.testing import CliRunner

from bundles.kmeans import load_kmeans
from continue_pt.cli import cli
from continue_pt.demo import CHECKPOINT, KMEANS, demo_audio
from converters.convert import convert_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_km")
    bundle = convert_checkpoint(CHECKPOINT, root / "bundle")
    audio = root / "audio"
    audio.mkdir()
    for i in range(4):
        sf.write(audio / f"u{i}.wav", demo_audio(2.0, seed=300 + i)[0].numpy(), 16000)
    (audio / "broken.wav").write_bytes(b"not audio")
    return root, bundle, audio


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_fit_then_dump_with_the_fitted_kmeans(setup):
    root, bundle, audio = setup
    km_path = root / "km.safetensors"
    result = run("kmeans", "fit", "--teacher", bundle, "--layer", 2, "--audio", audio, "-k", 8, "-o", km_path,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "broken.wav" in result.output and "K=8, layer 2" in result.output
    km = load_kmeans(km_path)
    assert km.layer == 2 and km.num_clusters == 8
    out = root / "labels"
    result = run("labels", "dump", "--teacher", bundle, "--kmeans", km_path, "--audio", audio, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "train.tsv").read_text().count("\n") == 5  # root line + 4 readable files
    assert len((out / "train.km").read_text().splitlines()) == 4
    assert len((out / "dict.km.txt").read_text().splitlines()) == 8


def test_dump_with_a_joblib_kmeans_needs_its_layer(setup):
    root, bundle, audio = setup
    result = run("labels", "dump", "--teacher", bundle, "--kmeans", KMEANS, "--audio", audio, "-o", root / "x")
    assert result.exit_code == 1 and "does not record which layer" in result.output and str(KMEANS) in result.output
    assert not (root / "x" / "train.km").exists()
    result = run("labels", "dump", "--teacher", bundle, "--kmeans", KMEANS, "--layer", 1, "--audio", audio,
                 "-o", root / "y")
    assert result.exit_code == 0, result.output


def test_dump_refuses_a_layer_other_than_the_kmeans_file_says(setup):
    root, bundle, audio = setup
    km_path = root / "km2.safetensors"
    assert run("kmeans", "fit", "--teacher", bundle, "--layer", 2, "--audio", audio, "-k", 4, "-o", km_path,
               "--device", "cpu").exit_code == 0
    result = run("labels", "dump", "--teacher", bundle, "--kmeans", km_path, "--layer", 1, "--audio", audio,
                 "-o", root / "z")
    assert result.exit_code == 1 and "layer 2" in result.output
