"""Online targets: the teacher's layer-L features labelled by the k-means, aligned with the student's frames."""

from __future__ import annotations

import pytest
import torch

from continue_pt.demo import demo_audio
from continue_pt.teacher import IGNORE_LABEL, OnlineTargets


@pytest.fixture(scope="module")
def bundle(hubert_bundle):
    return hubert_bundle  # the demo HuBERT with its k-means of layer 1 (tests/conftest.py)


def test_online_labels_equal_kmeans_of_the_teachers_layer_and_match_frame_count(bundle):
    targets = OnlineTargets.from_bundle(bundle)
    wav = torch.cat([demo_audio(1.0, 1), demo_audio(1.0, 2)])
    labels = targets(wav)
    with torch.no_grad():
        feats, _ = bundle.get_model().extract_features(wav, num_layers=1)
    assert torch.equal(labels, bundle.get_kmeans()(feats[-1]))
    with torch.no_grad():
        student_frames, _ = bundle.get_pretrain_model().wav2vec2.feature_extractor(wav, None)
    assert labels.shape == student_frames.shape[:2] == (2, 49)  # (16000 - 400) // 320 + 1


def test_padded_frames_are_ignored(bundle):
    targets = OnlineTargets(bundle.get_model(), bundle.get_kmeans(), bundle.normalize_waveform)
    wav = torch.cat([demo_audio(1.0, 1), demo_audio(1.0, 2)])
    wav[1, 8000:] = 0
    labels = targets(wav, torch.tensor([16000, 8000]))
    assert (labels[1, 24:] == IGNORE_LABEL).all() and (labels[1, :24] >= 0).all() and (labels[0] >= 0).all()


def test_teacher_is_frozen_and_cut_at_the_kmeans_layer(bundle):
    targets = OnlineTargets(bundle.get_model(), bundle.get_kmeans(), bundle.normalize_waveform)
    targets.train()
    assert not targets.teacher.training
    assert len(targets.teacher.encoder.transformer.layers) == 1
    assert not any(p.requires_grad for p in targets.teacher.parameters())


def test_kmeans_of_the_wrong_width_is_refused(bundle):
    from bundles.kmeans import KMeansModel

    with pytest.raises(ValueError, match="32 dimensions, the teacher's layers 64"):
        OnlineTargets(bundle.get_model(), KMeansModel(torch.randn(5, 32), layer=1), False)
    with pytest.raises(ValueError, match="outside the teacher's 1..2"):
        OnlineTargets(bundle.get_model(), KMeansModel(torch.randn(5, 64), layer=3), False)
