"""Issue 15, items 2 and 5: online targets under bf16 autocast equal ``labels dump``'s; the teacher gets no
lengths when nothing is padded."""

from __future__ import annotations


import pytest
import soundfile as sf
import torch

from bundles.kmeans import KMeansModel
from continue_pt.audio import read_audio
from continue_pt.demo import demo_audio
from continue_pt.label_dump import dump_labels
from continue_pt.device_batch import padded
from continue_pt.teacher import OnlineTargets

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def bundle(hubert_bundle):
    return hubert_bundle  # the demo HuBERT with its k-means (tests/conftest.py)


def test_kmeans_labels_in_fp32_inside_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    km = KMeansModel(torch.randn(200, 64, generator=g), layer=1)
    features = torch.randn(4000, 64, generator=g)
    with torch.autocast(**BF16):
        inside = km(features)
    assert torch.equal(inside, km(features))


def test_online_targets_under_bf16_autocast_equal_labels_dump(bundle, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(8):  # the crops of one training batch, as files of exactly that length
        sf.write(audio / f"crop{i}.wav", demo_audio(4.0, seed=200 + i)[0].numpy(), 16000, subtype="FLOAT")
    dumped = dump_labels(bundle, bundle.get_kmeans(), audio, tmp_path / "labels")
    names = [line.split("\t")[0] for line in dumped.tsv.read_text().splitlines()[1:]]
    offline = torch.tensor([[int(v) for v in line.split()] for line in dumped.km.read_text().splitlines()])
    waveforms = torch.stack([read_audio(audio / name, 16000) for name in names])
    lengths = torch.full((len(names),), waveforms.shape[1])
    targets = OnlineTargets.from_bundle(bundle)
    with torch.autocast(**BF16):  # what Lightning's bf16-mixed wraps training_step in
        online = targets(waveforms, lengths)
    assert online.shape == offline.shape == (8, 199)
    assert torch.equal(online, offline)


def test_teacher_gets_lengths_only_when_an_utterance_is_padded(bundle, monkeypatch):
    targets = OnlineTargets.from_bundle(bundle)
    seen = []
    original = targets.teacher.extract_features

    def spy(waveforms, lengths=None, num_layers=None):
        seen.append(lengths)
        return original(waveforms, lengths, num_layers=num_layers)

    monkeypatch.setattr(targets.teacher, "extract_features", spy)
    wav = torch.cat([demo_audio(1.0, 1), demo_audio(1.0, 2)])
    unpadded = targets(wav, torch.tensor([16000, 16000]))
    assert seen[-1] is None
    assert torch.equal(unpadded, targets(wav))
    wav[1, 8000:] = 0
    targets(wav, torch.tensor([16000, 8000]))
    assert seen[-1] is not None and seen[-1].tolist() == [16000, 8000]
    assert padded(torch.tensor([5, 4]), 5) and not padded(torch.tensor([5, 5]), 5) and not padded(None, 5)
