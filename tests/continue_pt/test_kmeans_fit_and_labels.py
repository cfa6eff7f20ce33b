"""Streaming k-means fitting on a teacher's layer, and fairseq label files (tsv / km / dict) written from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from bundles.kmeans import load_kmeans, save_kmeans
from continue_pt.audio import read_audio
from continue_pt.demo import demo_audio
from continue_pt.kmeans_fit import (
    Reservoir,
    fit_kmeans,
    fit_stream,
    inertia_of,
)
from continue_pt.label_dump import dump_labels
from continue_pt.teacher import OnlineTargets, Teacher
from tests.reference import require

LENGTHS = [2.0, 3.1, 1.55, 2.7, 4.0, 2.33]  # odd lengths: frame counts that are not simple multiples


@pytest.fixture(scope="module")
def bundle(hubert_bundle):
    return hubert_bundle  # the demo HuBERT with its k-means of layer 1 (tests/conftest.py)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    audio = tmp_path_factory.mktemp("audio")
    for i, seconds in enumerate(LENGTHS):
        sub = audio / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        sf.write(sub / f"u{i}.wav", demo_audio(seconds, seed=200 + i)[0].numpy(), 16000)
    return audio


def _features(bundle, corpus) -> torch.Tensor:
    teacher = Teacher.from_bundle(bundle, 1)
    return torch.cat([teacher.features(read_audio(p, 16000))
                      for p in sorted(corpus.rglob("*.wav"))])


def test_streaming_fit_is_within_5_percent_of_sklearn_on_features_in_ram(bundle, corpus, tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    result = fit_kmeans(bundle, 1, corpus, 16, seed=0, batch_seconds=4.0)
    features = _features(bundle, corpus)  # 780 frames x 64: the same frames, all in RAM
    assert result.frames_seen == features.shape[0]
    assert result.hours_seen == pytest.approx(sum(LENGTHS) / 3600, rel=1e-3)
    ours = inertia_of(result.kmeans, features)
    sk = MiniBatchKMeans(16, batch_size=200, random_state=0, n_init=1).fit(features.numpy())
    theirs = inertia_of(type(result.kmeans)(torch.from_numpy(sk.cluster_centers_)), features)
    assert ours <= 1.05 * theirs, (ours, theirs)
    assert result.inertia == pytest.approx(ours, rel=0.05)  # measured on the reservoir (here: every frame)

    assert result.kmeans.layer == 1 and result.kmeans.num_clusters == 16
    meta = result.kmeans.metadata
    assert meta["teacher_sha256"] == bundle.config.provenance["sha256"]
    assert meta["teacher_source_file"] == "tiny_hubert.pt"
    assert meta["teacher_bundle"] == str(bundle.path) and meta["teacher_num_updates"] == "1000"
    assert meta["n_clusters"] == "16" and meta["seed"] == "0" and float(meta["inertia"]) == result.inertia
    save_kmeans(result.kmeans, tmp_path / "km.safetensors")
    again = load_kmeans(tmp_path / "km.safetensors")
    assert again.layer == 1 and torch.equal(again.centroids, result.kmeans.centroids)

    # same seed, same centroids
    assert torch.equal(fit_kmeans(bundle, 1, corpus, 16, seed=0, batch_seconds=4.0).kmeans.centroids,
                       result.kmeans.centroids)


def test_streaming_fit_matches_sklearn_on_a_larger_stream_with_bounded_memory():
    from sklearn.cluster import MiniBatchKMeans

    g = np.random.default_rng(0)
    centers = g.normal(size=(24, 32)).astype(np.float32) * 3
    x = centers[g.integers(0, 24, 20_000)] + g.normal(size=(20_000, 32)).astype(np.float32)
    blocks = [torch.from_numpy(x[i:i + 97]) for i in range(0, len(x), 97)]
    c, inertia, stats = fit_stream(lambda: iter(blocks), 16, batch_frames=1000, reservoir_size=2000)
    # memory is bounded by the reservoir and one mini-batch (+ one block), not by the 20,000 frames streamed
    assert stats["reservoir_frames"] == 2000 and stats["frames_pass1"] == 20_000
    assert stats["peak_buffer_frames"] < 1000 + 97 and stats["frames_seen"] == 20_000
    sk = MiniBatchKMeans(16, batch_size=1000, random_state=0, n_init=1).fit(x)
    X = torch.from_numpy(x)
    ours = inertia_of(_km(c), X)
    theirs = inertia_of(_km(torch.from_numpy(sk.cluster_centers_)), X)
    assert ours <= 1.05 * theirs, (ours, theirs)
    assert inertia == pytest.approx(ours, rel=0.1)  # the reservoir estimate of the whole stream's inertia


def _km(centroids):
    from bundles.kmeans import KMeansModel

    return KMeansModel(centroids)


def test_reservoir_is_a_uniform_sample_of_bounded_size():
    res = Reservoir(500, 1, "cpu", torch.Generator().manual_seed(0))
    for start in range(0, 50_000, 333):
        res.add(torch.arange(start, min(start + 333, 50_000), dtype=torch.float32)[:, None])
    assert res.filled == 500 and res.rows.shape == (500, 1) and res.seen == 50_000
    values = res.sample[:, 0]
    assert values.unique().numel() == 500
    # uniform over the stream: each tenth of the stream holds about a tenth of the sample
    per_tenth = torch.bincount((values // 5000).long(), minlength=10)
    assert per_tenth.min() >= 25 and per_tenth.max() <= 80, per_tenth


def test_a_corrupt_file_is_skipped_and_reported(bundle, corpus, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    copied = sorted(corpus.rglob("*.wav"))[:3]
    for p in copied:
        (audio / p.name).write_bytes(p.read_bytes())
    (audio / "broken.wav").write_bytes(b"RIFF....definitely not audio")
    truncated = copied[0].read_bytes()[:30]
    (audio / "trunc.wav").write_bytes(truncated)
    result = fit_kmeans(bundle, 1, audio, 4, seed=1, batch_seconds=2.0)
    skipped = {p.name: reason for p, reason in result.files_skipped}
    assert set(skipped) == {"broken.wav", "trunc.wav"}
    assert all(reason.startswith("unreadable") for reason in skipped.values())
    assert result.kmeans.num_clusters == 4

    dump = dump_labels(bundle, result.kmeans, audio, tmp_path / "labels")
    assert {p.name for p, _ in dump.files_skipped} == {"broken.wav", "trunc.wav"}
    listed = (tmp_path / "labels" / "train.tsv").read_text().splitlines()[1:]
    assert len(listed) == 3 and not any("broken" in line or "trunc" in line for line in listed)


def test_wrong_layer_is_refused(bundle, corpus):
    with pytest.raises(ValueError, match="outside the teacher's 1..2"):
        fit_kmeans(bundle, 3, corpus, 4)
    with pytest.raises(ValueError, match="fitted on layer 1, not layer 2"):
        dump_labels(bundle, bundle.get_kmeans(), corpus, Path("/nonexistent"), layer=2)


@pytest.fixture(scope="module")
def dumped(bundle, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    return dump_labels(bundle, bundle.get_kmeans(), corpus, out, split="train"), out


def test_dumped_files_have_fairseqs_formats_and_equal_online_targets(bundle, corpus, dumped):
    result, out = dumped
    km = bundle.get_kmeans()
    assert sorted(p.name for p in out.iterdir()) == ["dict.km.txt", "train.km", "train.tsv"]  # no temp files left
    tsv = (out / "train.tsv").read_text().split("\n")
    assert tsv[-1] == "" and tsv[0] == str(corpus.resolve())
    rows = [line.split("\t") for line in tsv[1:-1]]
    names = sorted(p.relative_to(corpus).as_posix() for p in corpus.rglob("*.wav"))
    assert [r[0] for r in rows] == names  # scan order
    km_lines = (out / "train.km").read_text().split("\n")
    assert km_lines[-1] == "" and len(km_lines) - 1 == len(rows)
    targets = OnlineTargets.from_bundle(bundle)
    counts = torch.zeros(km.num_clusters, dtype=torch.long)
    for (name, samples), line in zip(rows, km_lines):
        wav = read_audio(corpus / name, 16000)
        assert int(samples) == len(wav)
        labels = [int(t) for t in line.split(" ")]
        assert len(labels) == (len(wav) - 400) // 320 + 1  # conv output of the whole utterance
        assert labels == targets(wav[None])[0].tolist()
        counts += torch.bincount(torch.tensor(labels), minlength=km.num_clusters)
    dict_lines = (out / "dict.km.txt").read_text().splitlines()
    assert dict_lines == [f"{c} {int(n)}" for c, n in enumerate(counts)]
    assert len(dict_lines) == km.num_clusters and result.counts == counts.tolist()
    assert result.files_labelled == len(LENGTHS) and result.frames == int(counts.sum())


def test_labels_from_a_manifest_keep_its_root_and_names(bundle, corpus, dumped, tmp_path):
    result, out = dumped
    again = dump_labels(bundle, bundle.get_kmeans(), out / "train.tsv", tmp_path / "relabel", split="valid")
    assert (tmp_path / "relabel" / "valid.tsv").read_text() == (out / "train.tsv").read_text()
    assert (tmp_path / "relabel" / "valid.km").read_text() == (out / "train.km").read_text()
    assert again.counts == result.counts


@pytest.mark.fairseq
def test_fairseqs_hubert_task_reads_the_dumped_labels(bundle, dumped):
    require("fairseq")
    from fairseq.tasks.hubert_pretraining import (
        HubertPretrainingConfig,
        HubertPretrainingTask,
    )

    _, out = dumped
    cfg = HubertPretrainingConfig(data=str(out), label_dir=str(out), labels=["km"], label_rate=50.0,
                                  sample_rate=16000, pad_audio=False, random_crop=False)
    task = HubertPretrainingTask.setup_task(cfg)
    dictionary = task.dictionaries[0]
    assert len(dictionary) == 4 + 20 and [dictionary.index(str(c)) for c in range(20)] == list(range(4, 24))
    task.load_dataset("train")
    dataset = task.datasets["train"]
    assert len(dataset) == len(LENGTHS)
    km_lines = (out / "train.km").read_text().splitlines()
    for i in range(len(dataset)):
        sample = dataset[i]
        expected = [int(t) for t in km_lines[i].split()]
        assert sample["label_list"][0].tolist() == [c + 4 for c in expected]  # LabelEncoder: symbol c -> c + 4
        assert len(sample["source"]) == dataset.sizes[i]
        # fairseq's verify_label_lengths tolerance (0.1 s) holds with room to spare
        assert abs(len(sample["source"]) / 16000 - len(expected) / 50) < 0.03
