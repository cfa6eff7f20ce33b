"""`check_kmeans`: does a k-means give the targets a checkpoint was trained on? (tiny demo bundle, generated audio)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from bundles import load_bundle
from bundles.kmeans import KMeansModel
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio
from continue_pt.kmeans_check import DOES_NOT_MATCH, INCONCLUSIVE, MATCHES, check_kmeans

SECONDS = 3.0


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


# ------------------------------------------------------------------------------------------------ positive case


@pytest.fixture(scope="module")
def trained(setup):
    """The tiny bundle after 300 steps of ``run_pretraining`` on its own k-means' labels, the bundle it started from
    (the teacher that made the training targets) and phone-like held-out audio (other seeds than the training
    audio: ~2500 masked frames). Prints the training wall time (~20-35 s on 2 cores)."""
    import time

    from tests.kmeans_check_fixture import train_on_own_kmeans, write_phone_corpus

    root, bundle_dir, _ = setup
    start = time.perf_counter()
    trained_dir = train_on_own_kmeans(bundle_dir, root / "trained")
    seconds = time.perf_counter() - start
    held = write_phone_corpus(root / "held_phones", 30, 3.0, first_seed=5000)
    print(f"training the tiny bundle on its own k-means' labels took {seconds:.1f} s")
    return load_bundle(trained_dir), load_bundle(bundle_dir), held


@pytest.fixture
def one_thread():
    """One intra-op thread for the checks below (many small convolutions: on a shared 2-core machine a second
    thread mostly waits for the other process)."""
    from tests.kmeans_check_fixture import one_thread as single

    with single():
        yield


def _show(name, report):
    print(f"{name}: {report.verdict}; accuracy {report.accuracy:.4f}, chance {report.chance:.4f}, marginal "
          f"{report.marginal_baseline:.4f}, relabelled mean {report.shuffled_mean:.4f} / q99 "
          f"{report.shuffled_q99:.4f} / max {report.shuffled_max:.4f}, thresholds: matches >= "
          f"{report.threshold_matches:.4f}, does not match <= {report.threshold_does_not_match:.4f}; "
          f"{report.num_masked_frames} masked frames, {report.clusters_used} clusters used")


def _random_kmeans(like: KMeansModel, seed: int) -> KMeansModel:
    """K random centroids of the same width, spread like the real ones (so that most clusters get frames)."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(like.centroids.shape, generator=g) * like.centroids.std() + like.centroids.mean(0)
    return KMeansModel(centroids, layer=like.layer)


@pytest.mark.slow
def test_a_head_trained_on_the_kmeans_labels_matches(trained, one_thread):
    trained_bundle, start, held = trained
    # the teacher that made the training targets: the frozen starting bundle (the trained bundle's own layer-1
    # features moved in training, so labelling with them gives other ids)
    report = check_kmeans(trained_bundle, None, held, teacher=start)
    _show("trained, own k-means", report)
    assert report.verdict == MATCHES, report.summary_lines()
    assert report.accuracy > report.shuffled_max and report.accuracy >= report.threshold_matches
    assert report.accuracy >= 2 * max(report.chance, report.marginal_baseline)
    assert report.num_masked_frames >= 2000 and report.clusters_used >= 15
    # control: the same labels, audio and masks with the checkpoint before training do not match, so the match
    # comes from what training taught the label head, not from the audio or the labels alone
    before = check_kmeans(start, None, held)
    _show("untrained, own k-means", before)
    assert before.verdict == DOES_NOT_MATCH
    assert before.num_masked_frames == report.num_masked_frames


@pytest.mark.slow
def test_a_random_or_renumbered_kmeans_does_not_match_the_trained_head(trained, one_thread):
    trained_bundle, start, held = trained
    own = start.get_kmeans()
    for seed in range(3):
        report = check_kmeans(trained_bundle, _random_kmeans(own, seed), held, teacher=start)
        _show(f"trained, random k-means {seed}", report)
        assert report.verdict == DOES_NOT_MATCH, report.summary_lines()
        assert report.num_masked_frames >= 2000 and not report.k_differs
    # the very same clusters numbered differently (what fitting the k-means again does): the partition the head
    # learned is intact, only the ids are wrong, and that too does not match
    perm = torch.randperm(own.num_clusters, generator=torch.Generator().manual_seed(0))
    assert bool((perm != torch.arange(own.num_clusters)).all()), "choose a permutation without fixed points"
    renumbered = KMeansModel(own.centroids[perm].clone(), layer=own.layer)
    report = check_kmeans(trained_bundle, renumbered, held, teacher=start)
    _show("trained, renumbered own k-means", report)
    assert report.verdict == DOES_NOT_MATCH, report.summary_lines()


def test_a_kmeans_agreeing_only_in_its_largest_cluster_does_not_match(setup, one_thread):
    """An untrained checkpoint predicts one id at most masked frames (~3/4 of them); a k-means that puts every frame
    in the cluster of that id scores that fraction, far above chance and above most relabellings, without its ids
    saying anything frame by frame: its accuracy is exactly the marginal baseline. The rule used to say "matches"."""
    _, bundle_dir, held = setup
    bundle = load_bundle(bundle_dir)
    k, width = bundle.get_kmeans().centroids.shape

    def one_cluster(j: int) -> KMeansModel:
        centroids = torch.full((k, width), 1e3)
        centroids[j] = 0.0  # nearest to every frame
        return KMeansModel(centroids, layer=KMEANS_LAYER)

    # the id this checkpoint predicts most often (on one file: with every label j, the accuracy is how often j is
    # predicted)
    shares = [check_kmeans(bundle, one_cluster(j), held, max_files=1, shuffles=0, min_masked_frames=0).accuracy
              for j in range(k)]
    favourite = max(range(k), key=shares.__getitem__)
    report = check_kmeans(bundle, one_cluster(favourite), held)
    _show(f"untrained, one-cluster k-means (id {favourite})", report)
    assert report.clusters_used == 1
    assert report.accuracy == pytest.approx(report.marginal_baseline)
    # the trap: far above chance and above the first three relabellings (what the rule used to compare with)
    assert report.accuracy >= 2 * max(report.chance, *report.shuffled[:3])
    assert report.verdict == DOES_NOT_MATCH, report.summary_lines()
