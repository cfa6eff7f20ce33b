"""Bundles without a pre-training head explain themselves: `inspect` says so, `pretrain --init-from` refuses with one
`Error:` line giving the ways on (HuBERT: a new label head on a k-means; wav2vec 2.0: a source with its quantizer).
Fine-tuned fairseq bundles (kind ctc) and torchaudio encoder-only bundles take the same path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchaudio
from click.testing import CliRunner

from bundles.encoder_only import NO_HEAD
from bundles.errors import BundleError
from bundles.loading import load_bundle
from continue_pt.cli import cli
from continue_pt.demo import write_demo_corpus
from converters.convert import convert_checkpoint


def _torchaudio_file(pipeline: str, path: Path) -> Path:
    params = dict(getattr(torchaudio.pipelines, pipeline)._params, encoder_num_layers=1)
    model = torchaudio.models.wav2vec2_model(**params)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoder_only")
    hubert_pth = _torchaudio_file("HUBERT_BASE", root / "hubert_base.pth")
    w2v_pth = _torchaudio_file("WAV2VEC2_LARGE_LV60K", root / "w2v_lv60k.pth")
    return {
        "hubert_pth": hubert_pth,
        "hubert": convert_checkpoint(hubert_pth, root / "hubert_bundle", family="hubert"),
        "wav2vec2": convert_checkpoint(w2v_pth, root / "w2v_bundle"),
        "audio": write_demo_corpus(root / "audio", num_files=2, seconds=2.0),
    }


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory) -> Path:
    """A fine-tuned fairseq HuBERT (CTC) bundle: what was already encoder-only before torchaudio files."""
    from tests.reference import require

    require("fairseq")
    from tests.fairseq_reference import build_fairseq_model, save_checkpoint

    root = tmp_path_factory.mktemp("fine_tuned")
    ref = build_fairseq_model("hubert_large_ll60k_finetune_ls960", num_layers=1, seed=0)
    save_checkpoint(ref, root / "ft.pt", "dict")
    return convert_checkpoint(root / "ft.pt", root / "ft_bundle")


def _one_error(result) -> str:
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.mark.parametrize("which", ["hubert", "wav2vec2", "fine_tuned"])
def test_inspect_says_there_is_no_pretraining_head(which, sources, request):
    bundle = request.getfixturevalue("fine_tuned") if which == "fine_tuned" else sources[which]
    text = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert text.exit_code == 0 and NO_HEAD in text.output
    facts = json.loads(CliRunner().invoke(cli, ["inspect", str(bundle), "--json"]).output)
    assert facts["pretrain_head"] is False
    assert NO_HEAD in facts["continue_pretraining"]
    assert ("--reinit-label-head" in facts["continue_pretraining"]) == (which != "wav2vec2")


def test_inspect_of_a_pretraining_bundle_says_it_has_its_head(bundle_dir):
    facts = json.loads(CliRunner().invoke(cli, ["inspect", str(bundle_dir), "--json"]).output)
    assert facts["pretrain_head"] is True and "continue_pretraining" not in facts


def test_inspect_of_a_torchaudio_file_that_cannot_tell_its_family(sources):
    facts = json.loads(CliRunner().invoke(cli, ["inspect", str(sources["hubert_pth"]), "--json"]).output)
    assert facts["family"].startswith("hubert or wav2vec2") and "--family" in facts["family"]
    assert facts["pretrain_head"] is False and facts["layers"] == 1


def _pretrain(init_from: Path, audio: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["pretrain", "--init-from", str(init_from), "--train-data", str(audio),
                                    "--output-dir", str(out), "--max-steps", "1", "--num-workers", "0", *extra])


@pytest.mark.parametrize("which", ["hubert", "fine_tuned"])
def test_pretrain_from_a_headless_hubert_bundle_names_the_ways_on(which, sources, request, tmp_path):
    bundle = request.getfixturevalue("fine_tuned") if which == "fine_tuned" else sources[which]
    line = _one_error(_pretrain(bundle, sources["audio"], tmp_path / "run"))
    assert NO_HEAD in line and "--reinit-label-head" in line and "--kmeans" in line and "continue-pt kmeans fit" in line
    assert not (tmp_path / "run").exists()


def test_pretrain_from_a_headless_wav2vec2_bundle_names_sources_with_a_quantizer(sources, tmp_path):
    line = _one_error(_pretrain(sources["wav2vec2"], sources["audio"], tmp_path / "run"))
    assert NO_HEAD in line and "quantizer" in line
    for source in ("fairseq pre-training .pt", "Wav2Vec2ForPreTraining", "s3prl"):
        assert source in line
    assert "--reinit-label-head" not in line
    assert not (tmp_path / "run").exists()


def test_get_pretrain_model_says_the_same(sources):
    with pytest.raises(BundleError, match=NO_HEAD) as err:
        load_bundle(sources["hubert"]).get_pretrain_model()
    assert "--reinit-label-head" in str(err.value)
    with torch.no_grad():  # the encoder itself loads and runs
        assert math.isfinite(float(load_bundle(sources["hubert"]).get_model()(torch.zeros(1, 4000))[0].sum()))
