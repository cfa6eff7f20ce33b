"""The bundle format on its own: streamed safetensors, atomic directories, config validation, loading errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bundles import BundleError, load_bundle
from bundles.safetensors_stream import PendingTensor, write_safetensors_streaming
from bundles.waveform import normalize_waveforms
from bundles.wav2vec2_pretrain import GumbelVectorQuantizer
from converters.convert import convert_checkpoint

DEMO = Path(__file__).resolve().parents[2] / "continue_pt" / "demo_assets" / "tiny_hubert.pt"


def _pending(name: str, value: torch.Tensor, span=None) -> PendingTensor:
    return PendingTensor(name, tuple(value.shape), value.dtype, lambda: value, source_span=span)


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(2).bfloat16(),
               "d": torch.tensor([True, False]), "e": torch.empty(0, 3), "f": torch.randn(7).half()}
    path = tmp_path / "x.safetensors"
    write_safetensors_streaming(path, [_pending(k, v) for k, v in tensors.items()], {"k": "v"})
    back = load_file(path)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(back[k], v), k


def test_spans_are_copied_in_the_kernel_or_by_hand_with_the_same_bytes(tmp_path, monkeypatch):
    source = tmp_path / "src.bin"
    payload = torch.randn(1000)
    source.write_bytes(b"HEADER" + payload.numpy().tobytes())
    pending = [_pending("p", payload, span=(source, 6)), _pending("q", torch.ones(3))]
    write_safetensors_streaming(tmp_path / "kernel.safetensors", pending, {})
    assert torch.equal(load_file(tmp_path / "kernel.safetensors")["p"], payload)

    def unsupported(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    write_safetensors_streaming(tmp_path / "fallback.safetensors", pending, {})
    assert (tmp_path / "fallback.safetensors").read_bytes() == (tmp_path / "kernel.safetensors").read_bytes()


def test_produced_tensor_must_match_what_was_announced(tmp_path):
    bad = PendingTensor("w", (2, 2), torch.float32, lambda: torch.zeros(3))
    with pytest.raises(ValueError, match=r"tensor w: produced \[3\]"):
        write_safetensors_streaming(tmp_path / "x.safetensors", [bad], {})


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return convert_checkpoint(DEMO, tmp_path_factory.mktemp("fmt") / "bundle")


def _copy(bundle_dir: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in bundle_dir.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_config_is_versioned_and_self_describing(bundle_dir):
    config = json.loads((bundle_dir / "config.json").read_text())
    assert config["format"] == "continue-pt-bundle" and config["format_version"] == 1
    assert config["provenance"]["fairseq_config"]["model"]["_name"] == "hubert"
    assert config["files"] == {"model": "model.safetensors", "kmeans": None,
                               "fairseq_extras": "fairseq_extras.safetensors"}
    assert oct((bundle_dir).stat().st_mode & 0o777) != "0o700"


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c.update(format_version=99), "this kit reads versions up to 1"),
    (lambda c: c.update(family="bert"), "'family' is 'bert'"),
    (lambda c: c.update(surprise=1), "unknown keys ['surprise']"),
    (lambda c: c.pop("encoder_args"), "'encoder_args' is missing"),
])
def test_bad_config_is_reported(bundle_dir, tmp_path, edit, needle):
    d = _copy(bundle_dir, tmp_path / "b")
    config = json.loads((d / "config.json").read_text())
    edit(config)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_bundle(d)


def test_loading_errors_name_the_file(bundle_dir, tmp_path):
    with pytest.raises(BundleError, match="no such bundle directory"):
        load_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="must be converted first"):
        load_bundle(DEMO)
    d = _copy(bundle_dir, tmp_path / "b")
    (d / "config.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(d)
    d2 = _copy(bundle_dir, tmp_path / "c")
    (d2 / "fairseq_extras.safetensors").unlink()
    with pytest.raises(BundleError, match="is missing"):
        load_bundle(d2)
    d3 = _copy(bundle_dir, tmp_path / "d")
    config = json.loads((d3 / "config.json").read_text())
    config["encoder_args"]["encoder_ff_interm_features"] = 99
    (d3 / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="does not fit the model config.json describes"):
        load_bundle(d3).get_model()


def test_ctc_only_operations_are_refused_clearly(bundle_dir):
    b = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="holds no k-means model"):
        b.get_kmeans()


def test_models_are_strictly_loaded_and_ready(bundle_dir):
    b = load_bundle(bundle_dir)
    model = b.get_model()
    assert not model.training and not any(p.is_meta for p in model.parameters())
    heads = b.get_pretrain_model()
    assert heads.training and heads.logit_generator.label_embeddings.shape == (20, 32)


def test_waveform_normalisation_is_per_utterance_over_its_own_samples():
    wav = torch.randn(2, 1000) * torch.tensor([[0.1], [5.0]]) + 3
    lengths = torch.tensor([1000, 600])
    wav[1, 600:] = 0
    out = normalize_waveforms(wav, lengths)
    torch.testing.assert_close(out[0], torch.nn.functional.layer_norm(wav[0], (1000,)))
    torch.testing.assert_close(out[1, :600], torch.nn.functional.layer_norm(wav[1, :600], (600,)), atol=1e-5, rtol=0)
    assert (out[1, 600:] == 0).all()


def test_gumbel_temperature_follows_fairseqs_schedule():
    q = GumbelVectorQuantizer(8, 4, 2, 6, temperature=(2.0, 0.5, 0.999995))
    assert q.temperature == 2.0
    q.set_num_updates(100_000)
    assert q.temperature == pytest.approx(max(2.0 * 0.999995 ** 100_000, 0.5))
    q.set_num_updates(10_000_000)
    assert q.temperature == 0.5
