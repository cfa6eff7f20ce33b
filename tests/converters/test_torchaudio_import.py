"""torchaudio `.pth` state dicts -> encoder-only bundles that reproduce torchaudio's own model layer by layer.

The files behind torchaudio.pipelines are `torch.save(Wav2Vec2Model.state_dict())`. Here the same is done with
random-weight models built by torchaudio's own factory from its pipelines' parameters (cut to two layers, every width
the published one), then converted through the CLI's library function and compared with torchaudio on the same input.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torchaudio
from click.testing import CliRunner
from torch import nn

from bundles.catalogue import CATALOGUE
from bundles.loading import load_bundle
from continue_pt.cli import cli
from converters.convert import convert_checkpoint
from converters.errors import ConversionError
from converters.source_format import source_format
from converters.torchaudio_import import ARCHITECTURES, FAMILY_FLAG, Shapes, match_architecture

TOLERANCE = 1.5e-5
_PIPELINES = [name for name in dir(torchaudio.pipelines) if name.startswith(("HUBERT_", "WAV2VEC2_"))
              and hasattr(getattr(torchaudio.pipelines, name), "_params")]


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Every floating tensor re-drawn (no zero bias hides a swapped key); scales keep activations O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            noise = torch.randn(tensor.shape, generator=gen)
            if "layer_norm" in name and name.endswith("weight") or name.endswith("original0"):
                value = 1.0 + 0.1 * noise.abs()
            elif tensor.dim() >= 2:
                value = min(0.1, 1 / math.sqrt(tensor.numel() // tensor.shape[0])) * noise
            else:
                value = 0.1 * noise
            tensor.data.copy_(value)


def _torchaudio_model(pipeline: str, num_layers: int = 2, aux: int | None = None, seed: int = 0) -> nn.Module:
    params = dict(getattr(torchaudio.pipelines, pipeline)._params)
    params.update(encoder_num_layers=num_layers, aux_num_out=aux if params["aux_num_out"] else None)
    model = torchaudio.models.wav2vec2_model(**params)
    _reinitialise(model, seed)
    return model.eval()


def _save(model: nn.Module, path: Path, legacy_weight_norm: bool = False) -> Path:
    state = model.state_dict()
    if legacy_weight_norm:  # the published .pth files predate torch's parametrizations: weight_g / weight_v
        prefix = "encoder.transformer.pos_conv_embed.conv."
        state = {k.replace("parametrizations.weight.original0", "weight_g")
                  .replace("parametrizations.weight.original1", "weight_v") if k.startswith(prefix) else k: v
                 for k, v in state.items()}
    torch.save(state, path)
    return path


def _waveform(seconds: float = 1.0) -> torch.Tensor:
    return torch.randn(1, int(16000 * seconds), generator=torch.Generator().manual_seed(7)) * 0.5


CASES = [  # (pipeline, --family, kind, file suffix, legacy weight-norm names)
    ("HUBERT_BASE", "hubert", "encoder", ".pth", True),
    ("HUBERT_LARGE", None, "encoder", ".pth", False),
    ("WAV2VEC2_BASE", "wav2vec2", "encoder", ".bin", True),  # the name does not decide: the content does
    ("WAV2VEC2_LARGE_LV60K", None, "encoder", ".pth", True),
    ("WAV2VEC2_ASR_BASE_960H", "wav2vec2", "ctc", ".pth", True),
]


@pytest.mark.slow
@pytest.mark.parametrize("pipeline,family,kind,suffix,legacy", CASES)
def test_every_layer_matches_torchaudio(pipeline, family, kind, suffix, legacy, tmp_path):
    reference = _torchaudio_model(pipeline, aux=32)
    src = _save(reference, tmp_path / f"model{suffix}", legacy_weight_norm=legacy)
    assert source_format(src) == "torchaudio"
    bundle = load_bundle(convert_checkpoint(src, tmp_path / "bundle", family=family))
    published = getattr(torchaudio.pipelines, pipeline)
    assert (bundle.family, bundle.kind) == (family or pipeline.split("_")[0].lower(), kind)
    assert bundle.normalize_waveform == published._normalize_waveform
    enc = bundle.config.encoder_args
    for key in ("encoder_num_heads", "encoder_layer_norm_first", "extractor_mode", "extractor_conv_bias",
                "encoder_embed_dim", "encoder_ff_interm_features", "encoder_pos_conv_kernel",
                "encoder_pos_conv_groups"):
        assert enc[key] == published._params[key], key
    conv_layers = [tuple(c) for c in enc["extractor_conv_layer_config"]]
    assert conv_layers == list(published._params["extractor_conv_layer_config"])
    wav = _waveform()
    model = bundle.get_model()
    with torch.no_grad():
        expected_input = nn.functional.layer_norm(wav, wav.shape) if published._normalize_waveform else wav
        expected, _ = reference.extract_features(expected_input)
        actual, _ = model.extract_features(wav)
        assert len(actual) == len(expected) == 2
        for layer, (a, e) in enumerate(zip(actual, expected), start=1):
            assert (a - e).abs().max().item() <= TOLERANCE, f"layer {layer}"
        if kind == "ctc":
            torch.testing.assert_close(model(wav)[0], reference(expected_input)[0], atol=TOLERANCE, rtol=0)
            assert enc["aux_num_out"] == 32
    assert bundle.config.provenance["source_format"].startswith("torchaudio")
    assert bundle.config.provenance["num_layers_note"].startswith("2 layers")


@pytest.mark.parametrize("pipeline", _PIPELINES)
def test_architecture_table_agrees_with_torchaudio_and_the_catalogue(pipeline):
    """What a state dict lacks (heads, pre-/post-LN, normalisation) is what torchaudio's pipeline says for it."""
    published = getattr(torchaudio.pipelines, pipeline)
    p = published._params
    shapes = Shapes(p["extractor_mode"], p["extractor_conv_bias"],
                    tuple((d, k) for d, k, _ in p["extractor_conv_layer_config"]), p["encoder_embed_dim"],
                    p["encoder_num_layers"], p["encoder_ff_interm_features"], p["encoder_pos_conv_kernel"],
                    p["encoder_pos_conv_groups"], p["aux_num_out"])
    family = pipeline.split("_")[0].lower()
    arch = match_architecture(Path(published._path), shapes, family)
    assert (arch.num_heads, arch.layer_norm_first, arch.num_layers) == \
        (p["encoder_num_heads"], p["encoder_layer_norm_first"], p["encoder_num_layers"])
    assert [tuple(c) for c in arch.conv_layers] == list(p["extractor_conv_layer_config"])
    cards = [CATALOGUE[name] for name in arch.cards]
    assert {card.normalize_waveform for card in cards} == {published._normalize_waveform}
    assert {card.family for card in cards} == {family}


def test_every_architecture_names_catalogue_cards_of_its_family():
    for arch in ARCHITECTURES:
        assert arch.cards and all(CATALOGUE[name].family == arch.family for name in arch.cards), arch.name


def _run(args: list[str]):
    return CliRunner().invoke(cli, args)


def _assert_one_error(result, *pieces: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for piece in pieces:
        assert piece in result.output, result.output


def test_base_needs_the_family_flag_which_the_error_names(tmp_path):
    src = _save(_torchaudio_model("HUBERT_BASE", num_layers=1), tmp_path / "hubert_fairseq_base_ls960.pth")
    result = _run(["convert", str(src), "-o", str(tmp_path / "out")])
    _assert_one_error(result, FAMILY_FLAG, "cannot tell")
    assert not (tmp_path / "out").exists()
    assert _run(["convert", str(src), "-o", str(tmp_path / "out"), "--family", "hubert"]).exit_code == 0
    facts = _run(["inspect", str(tmp_path / "out"), "--json"]).output
    assert '"kind": "encoder"' in facts


def test_a_family_no_published_model_of_that_shape_has_is_refused(tmp_path):
    src = _save(_torchaudio_model("WAV2VEC2_LARGE_LV60K", num_layers=1), tmp_path / "m.pth")
    with pytest.raises(ConversionError, match="--family wav2vec2"):
        convert_checkpoint(src, tmp_path / "out", family="hubert")
    assert not (tmp_path / "out").exists()


def test_an_unpublished_architecture_is_refused_not_guessed(tmp_path):
    params = dict(torchaudio.pipelines.HUBERT_BASE._params, encoder_embed_dim=256, encoder_num_heads=4,
                  encoder_ff_interm_features=1024, encoder_num_layers=1)
    src = _save(torchaudio.models.wav2vec2_model(**params), tmp_path / "small.pth")
    result = _run(["convert", str(src), "-o", str(tmp_path / "out"), "--family", "hubert"])
    _assert_one_error(result, "matches no published", "heads")
    assert not (tmp_path / "out").exists()


def test_missing_and_foreign_tensors_are_all_reported(tmp_path):
    state = _torchaudio_model("HUBERT_BASE", num_layers=1).state_dict()
    del state["encoder.transformer.layers.0.attention.k_proj.bias"]
    state["encoder.transformer.layers.0.something.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ConversionError) as err:
        convert_checkpoint(tmp_path / "broken.pth", tmp_path / "out", family="hubert")
    assert "k_proj.bias" in str(err.value) and "something.weight" in str(err.value)
    assert not (tmp_path / "out").exists()


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def test_a_hostile_state_dict_is_refused_and_nothing_runs(tmp_path):
    canary = tmp_path / "CANARY"
    state = dict(_torchaudio_model("HUBERT_BASE", num_layers=1).state_dict())
    state["encoder.transformer.layers.0.attention.k_proj.bias"] = _Payload(os.system, f"touch {canary}")
    torch.save(state, tmp_path / "hostile.pth")
    result = _run(["convert", str(tmp_path / "hostile.pth"), "-o", str(tmp_path / "out"), "--family", "hubert"])
    _assert_one_error(result, "refused", "system")
    assert not canary.exists() and not (tmp_path / "out").exists()


def test_family_flag_contradicting_a_fairseq_checkpoint_is_refused(tmp_path):
    from continue_pt.demo import CHECKPOINT

    result = _run(["convert", str(CHECKPOINT), "-o", str(tmp_path / "out"), "--family", "wav2vec2"])
    _assert_one_error(result, "is a hubert checkpoint", "--family wav2vec2")
    assert not (tmp_path / "out").exists()


def test_verify_rereads_the_torchaudio_file(tmp_path):
    src = _save(_torchaudio_model("HUBERT_BASE", num_layers=1), tmp_path / "m.pth", legacy_weight_norm=True)
    bundle = convert_checkpoint(src, tmp_path / "bundle", family="hubert")
    result = _run(["verify", str(bundle), "--against", str(src)])
    assert result.exit_code == 0 and "ok:" in result.output, result.output


def test_a_pre_1_6_torch_file_is_read_too(tmp_path):
    """torch's legacy (non-zip) serialisation, which .pth files saved before torch 1.6 use."""
    reference = _torchaudio_model("HUBERT_LARGE", num_layers=1, seed=3)
    torch.save(reference.state_dict(), tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    bundle = load_bundle(convert_checkpoint(tmp_path / "old.pth", tmp_path / "bundle"))
    wav = _waveform(0.5)
    with torch.no_grad():
        expected, _ = reference.extract_features(nn.functional.layer_norm(wav, wav.shape))
        actual, _ = bundle.get_model().extract_features(wav)
    assert (actual[0] - expected[0]).abs().max().item() <= TOLERANCE
