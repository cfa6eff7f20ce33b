"""The click CLI: every command on the shipped tiny fairseq checkpoint, and its bad-input messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from continue_pt.cli import cli

ASSETS = Path(__file__).resolve().parents[2] / "continue_pt" / "demo_assets"
CKPT = ASSETS / "tiny_hubert.pt"
KM = ASSETS / "tiny_hubert_L1_km20.bin"


def run(*args: str) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "bundle"
    result = run("convert", CKPT, "-o", out, "--kmeans", KM, "--kmeans-layer", 1)
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    return out


def test_every_command_has_help():
    for command in ["convert", "inspect", "verify", "catalogue", "demo"]:
        result = run(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_convert_writes_a_complete_bundle(bundle_dir):
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "config.json", "fairseq_extras.safetensors", "kmeans.safetensors", "model.safetensors"]
    config = json.loads((bundle_dir / "config.json").read_text())
    assert config["provenance"]["source_file"] == "tiny_hubert.pt"
    assert len(config["provenance"]["sha256"]) == 64
    assert config["provenance"]["kmeans"]["layer"] == 1
    assert config["num_updates"] == 1000


def test_inspect_checkpoint_bundle_and_kmeans(bundle_dir):
    facts = json.loads(run("inspect", CKPT, "--json").output)
    assert facts["family"] == "hubert" and facts["kind"] == "pretrain" and facts["num_clusters"] == 20
    assert facts["heads"] == ["final_proj", "label embeddings", "mask embedding"]
    assert facts["num_updates"] == 1000 and facts["normalize_waveform"] is False
    facts = json.loads(run("inspect", bundle_dir, "--json").output)
    assert facts["what"] == "bundle" and facts["kmeans"] == {"num_clusters": 20, "dim": 64, "layer": 1}
    facts = json.loads(run("inspect", KM, "--json").output)
    assert facts["what"] == "k-means" and facts["num_clusters"] == 20 and facts["layer"] is None
    text = run("inspect", CKPT).output
    assert "family" in text and "hubert" in text


def test_verify_passes_then_catches_a_changed_tensor(bundle_dir, tmp_path):
    result = run("verify", bundle_dir, "--against", CKPT)
    assert result.exit_code == 0 and result.output.startswith("ok:")
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in bundle_dir.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tampered / "model.safetensors")
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["mask_generator.mask_embedding"][0] += 1.0
    save_file(tensors, tampered / "model.safetensors")
    result = CliRunner().invoke(cli, ["verify", str(tampered), "--against", str(CKPT)])
    assert result.exit_code == 1
    assert "mask_generator.mask_embedding differs" in result.output
    assert "1 of" in result.output


def test_catalogue_lists_published_models():
    result = run("catalogue")
    assert result.exit_code == 0 and "hubert_base_ls960" in result.output and "https://" in result.output
    cards = json.loads(run("catalogue", "--json").output)
    assert any(c["name"] == "hubert_base_ls960_L9_km500" for c in cards)


@pytest.mark.parametrize("args,needle", [
    (["convert", "missing.pt", "-o", "OUT"], "missing.pt: no such file"),
    (["convert", CKPT, "-o", "OUT", "--kmeans", KM], "the layer it clusters is not known"),
    (["convert", CKPT, "-o", "OUT", "--kmeans", KM, "--kmeans-layer", "5"], "layer 5 is outside the model's 1..2"),
    (["convert", CKPT, "-o", "OUT", "--kmeans-layer", "1"], "--kmeans-layer was given without --kmeans"),
    (["convert", CKPT, "-o", "OUT", "--kmeans", CKPT, "--kmeans-layer", "1"], "tiny_hubert.pt"),
    (["inspect", "nowhere"], "nowhere: no such file or directory"),
    (["verify", "nowhere", "--against", CKPT], "nowhere: no such bundle directory"),
])
def test_bad_input_gives_one_clear_line_and_no_output(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)  # restored after: later tests must not run in a deleted directory
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "OUT").exists()


def test_existing_output_needs_overwrite(bundle_dir, tmp_path):
    out = tmp_path / "b"
    assert run("convert", CKPT, "-o", out).exit_code == 0
    result = CliRunner().invoke(cli, ["convert", str(CKPT), "-o", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    assert run("convert", CKPT, "-o", out, "--overwrite").exit_code == 0


def test_loaded_bundle_labels_features_like_the_joblib_kmeans(bundle_dir):
    from bundles import load_bundle
    from converters.joblib_kmeans import read_joblib_kmeans

    bundle = load_bundle(bundle_dir)
    km = bundle.get_kmeans()
    assert torch.equal(km.centroids, read_joblib_kmeans(KM).centroids)
    feats = torch.randn(50, 64)
    assert torch.equal(km(feats), read_joblib_kmeans(KM)(feats))
