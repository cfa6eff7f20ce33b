"""`check_kmeans`: does a k-means give the targets a checkpoint was trained on? (tiny demo bundle, generated audio)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf

from bundles import load_bundle
from bundles.kmeans import KMeansModel
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio
from continue_pt.kmeans_check import DOES_NOT_MATCH, INCONCLUSIVE, MATCHES, check_kmeans

SECONDS = 3.0
TRAIN_STEPS = 200


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from converters.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("kmcheck")
    bundle_dir = convert_checkpoint(CHECKPOINT, root / "tiny", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    held = root / "held"
    held.mkdir()
    for i in range(14):  # ~1200 masked frames at the tiny model's mask_prob
        sf.write(held / f"h{i:02d}.wav", demo_audio(SECONDS, seed=5000 + i)[0].numpy(), 16000)
    (held / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 9)  # corrupt header
    return root, bundle_dir, held


def test_untrained_checkpoint_and_corrupt_file_is_skipped(setup):
    _, bundle_dir, held = setup
    bundle = load_bundle(bundle_dir)
    report = check_kmeans(bundle, None, held)
    # random-init checkpoint: its predictions know nothing of any labels
    assert report.verdict in (DOES_NOT_MATCH, INCONCLUSIVE)
    assert report.verdict != MATCHES
    assert any(Path(p).name == "broken.wav" for p, _ in report.skipped)
    assert report.num_files == 14 and report.num_masked_frames >= 1000
    assert report.chance == pytest.approx(1 / 20)
    assert 0 < report.label_entropy <= 1 and 1 <= report.clusters_used <= 20
    json.dumps(report.to_dict())
    assert report.summary_lines()[0].startswith("verdict: ")
    # deterministic
    again = check_kmeans(bundle, None, held)
    assert again.accuracy == report.accuracy and again.shuffled == report.shuffled


def test_k_mismatch_is_a_clear_does_not_match(setup):
    _, bundle_dir, held = setup
    bundle = load_bundle(bundle_dir)
    km = bundle.get_kmeans()
    other = KMeansModel(km.centroids[:10].clone(), layer=km.layer)
    report = check_kmeans(bundle, other, held)
    assert report.verdict == DOES_NOT_MATCH and report.k_differs
    assert report.accuracy is None and "K=10" in report.reason and "20 rows" in report.reason
    assert "(K differs)" in report.summary_lines()[0]
    json.dumps(report.to_dict())


def test_unusable_kmeans_is_refused(setup):
    _, bundle_dir, held = setup
    bundle = load_bundle(bundle_dir)
    km = bundle.get_kmeans()
    with pytest.raises(ValueError, match="layer"):
        check_kmeans(bundle, KMeansModel(km.centroids, layer=None), held)
    with pytest.raises(ValueError, match="dimensions"):
        check_kmeans(bundle, KMeansModel(km.centroids[:, :8].clone(), layer=1), held)


def test_cli_kmeans_check_reports_a_verdict_and_bad_input(setup, tmp_path):
    import json as _json

    from click.testing import CliRunner

    from continue_pt.cli import cli
    from continue_pt.demo import KMEANS

    _, bundle_dir, audio = setup
    result = CliRunner().invoke(cli, ["kmeans", "check", "--bundle", str(bundle_dir), "--audio", str(audio),
                                      "--kmeans", str(KMEANS), "--kmeans-layer", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = _json.loads(result.output)
    assert report["verdict"] in ("matches", "does not match", "inconclusive") and report["chance"] == 1 / 20
    text = CliRunner().invoke(cli, ["kmeans", "check", "--bundle", str(bundle_dir), "--audio", str(audio)]).output
    assert "verdict" in text.lower()
    bad = CliRunner().invoke(cli, ["kmeans", "check", "--bundle", str(tmp_path / "nope"), "--audio", str(audio)])
    assert bad.exit_code == 1 and "no such bundle directory" in bad.output
    bad = CliRunner().invoke(cli, ["kmeans", "check", "--bundle", str(bundle_dir), "--audio", str(audio),
                                   "--kmeans", str(KMEANS)])
    assert bad.exit_code == 1 and "does not record which layer" in bad.output and str(KMEANS) in bad.output
