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


@pytest.mark.slow
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


def _encoder_only_copy(bundle_dir: Path, out: Path) -> Path:
    """The demo HuBERT's encoder alone (as a torchaudio .pth or a fine-tuned checkpoint gives it), tiny and fast."""
    from bundles.config import BundleConfig
    from bundles.factory import ENCODER_PREFIX
    from bundles.safetensors_stream import PendingTensor
    from bundles.writing import write_bundle

    source = load_bundle(bundle_dir)
    config = BundleConfig.read(bundle_dir)
    config.kind, config.pretrain_args, config.objective, config.label_dictionary = "encoder", None, None, None
    config.provenance = {"source_file": "encoder-only copy of the demo HuBERT"}
    tensors = [PendingTensor(k[len(ENCODER_PREFIX):], tuple(t.shape), t.dtype, lambda t=t: t.contiguous())
               for k, t in source.state_dict().items() if k.startswith(ENCODER_PREFIX)]
    return write_bundle(out, config, tensors)


def test_the_hubert_way_on_works_a_new_head_on_a_kmeans(bundle_dir, sources, tmp_path):
    """What the error advises runs: --reinit-label-head with --kmeans continues an encoder-only HuBERT bundle, and
    the result is a complete pre-training bundle (head of the k-means' K, new mask embedding)."""
    from continue_pt.demo import KMEANS, KMEANS_LAYER

    encoder_only = _encoder_only_copy(bundle_dir, tmp_path / "encoder_only")
    refused = _pretrain(encoder_only, sources["audio"], tmp_path / "refused", "--kmeans", str(KMEANS),
                        "--kmeans-layer", str(KMEANS_LAYER))  # a k-means alone is not enough: the head is new
    assert "--reinit-label-head" in _one_error(refused)
    result = _pretrain(encoder_only, sources["audio"], tmp_path / "run", "--reinit-label-head", "--kmeans",
                       str(KMEANS), "--kmeans-layer", str(KMEANS_LAYER), "--max-steps", "2", "--warmup-steps", "1",
                       "--max-batch-seconds", "4")
    assert result.exit_code == 0, result.output
    trained = load_bundle(tmp_path / "run" / "bundle")
    assert trained.kind == "pretrain" and trained.num_updates == (load_bundle(encoder_only).num_updates or 0) + 2
    model = trained.get_pretrain_model()
    assert model.logit_generator.label_embeddings.shape[0] == 20  # the demo k-means' K
    assert trained.config.provenance["new_label_head"]["from_kind"] == "encoder"
    assert trained.config.provenance["training"][-1]["label_head_reinitialised"] is True
    encoder = load_bundle(encoder_only).state_dict()
    moved = [k for k, v in encoder.items() if not torch.equal(v, trained.state_dict()["wav2vec2." + k])]
    assert moved, "the encoder was trained"


def test_export_to_fairseq_of_a_torchaudio_encoder_says_why_not(sources, tmp_path):
    line = _one_error(CliRunner().invoke(cli, ["export", str(sources["hubert"]), "--to", "fairseq", "-o",
                                               str(tmp_path / "x.pt")]))
    assert "encoder without heads" in line and "fairseq configuration" in line
    assert not (tmp_path / "x.pt").exists()
