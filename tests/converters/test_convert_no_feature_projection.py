"""Checkpoints without ``post_extract_proj``: the conv front end is as wide as the encoder, so fairseq feeds the
features on unprojected; the bundle gets an identity projection and reproduces fairseq layer by layer."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.reference import require

require("fairseq")

import tests.fairseq_reference as fairseq_reference  # noqa: E402
from bundles.loading import load_bundle  # noqa: E402
from converters.convert import convert_checkpoint  # noqa: E402
from converters.verify import verify_bundle  # noqa: E402

pytestmark = pytest.mark.fairseq

TOLERANCE = {"hubert": 3e-5, "wav2vec2": 1.5e-5}  # as in test_convert_parity (torchaudio's import tests)
CONV_WIDTH = 512  # the last conv layer's channels in every published configuration


def _model_options(config: dict) -> dict:
    """Where a stored configuration keeps the encoder options (HuBERT: model; wav2vec 2.0: flat; CTC: w2v_args)."""
    model = config.get("model", config)
    return model["w2v_args"]["model"] if "w2v_args" in model else model


def _narrow_reference(name: str, monkeypatch) -> fairseq_reference.FairseqReference:
    """A fairseq model of configuration ``name`` with encoder_embed_dim = the conv width (8 heads of 64)."""
    stored = fairseq_reference.load_config

    def narrowed(config_name: str) -> dict:
        config = copy.deepcopy(stored(config_name))
        options = _model_options(config)
        options.update(encoder_embed_dim=CONV_WIDTH, encoder_attention_heads=8)
        return config

    monkeypatch.setattr(fairseq_reference, "load_config", narrowed)
    ref = fairseq_reference.build_fairseq_model(name, num_layers=2, seed=4)
    encoder_owner = ref.model.w2v_encoder.w2v_model if ref.fine_tuned else ref.model
    assert encoder_owner.post_extract_proj is None  # fairseq has no projection to convert
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hubert_base_ls960", "wav2vec_small", "wav2vec_small_960h"])
def test_a_checkpoint_without_post_extract_proj_converts_with_parity(name, tmp_path, monkeypatch):
    ref = _narrow_reference(name, monkeypatch)
    src = tmp_path / f"{name}_narrow.pt"
    fairseq_reference.save_checkpoint(ref, src, "dict")
    bundle = load_bundle(convert_checkpoint(src, tmp_path / "bundle"))  # before: "lacks tensors the model needs"
    assert "post_extract_proj" in bundle.config.provenance["identity_feature_projection"]
    assert verify_bundle(bundle.path, src).ok

    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0)) * 0.3
    expected = fairseq_reference.fairseq_layer_outputs(ref, wav)
    models = [bundle.get_model()]
    if bundle.kind == "pretrain":
        models.append(bundle.get_pretrain_model().wav2vec2.eval())  # the encoder that continued training uses
    for model in models:
        with torch.no_grad():
            actual, _ = model.extract_features(wav)
        assert len(actual) == len(expected) == 2
        for layer, (a, e) in enumerate(zip(actual, expected), start=1):
            assert a.shape == e.shape == (1, 49, CONV_WIDTH), f"layer {layer}"
            diff = (a - e).abs().max().item()
            assert diff <= TOLERANCE[bundle.family], f"layer {layer}: max abs difference {diff}"
    if bundle.kind == "ctc":
        with torch.no_grad():
            logits, _ = bundle.get_model()(wav)
        torch.testing.assert_close(logits, fairseq_reference.fairseq_ctc_logits(ref, wav), atol=3e-5, rtol=0)
