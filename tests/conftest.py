"""Fixtures the continued pre-training tests share (a module's own fixture of the same name overrides them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf

from bundles.loading import Bundle, load_bundle
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, WAV2VEC2_CHECKPOINT, demo_audio


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """The tiny fairseq HuBERT of the demo with its k-means, converted once (tests only read it)."""
    from converters.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    convert_checkpoint(CHECKPOINT, out, kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    return out


@pytest.fixture(scope="session")
def hubert_bundle(bundle_dir) -> Bundle:
    """:func:`bundle_dir`, loaded."""
    return load_bundle(bundle_dir)


@pytest.fixture(scope="session")
def w2v_bundle_dir(tmp_path_factory) -> Path:
    """The tiny fairseq wav2vec 2.0 of the demo (with its quantizer), converted once (tests only read it)."""
    from converters.convert import convert_checkpoint

    return convert_checkpoint(WAV2VEC2_CHECKPOINT, tmp_path_factory.mktemp("w2v") / "tiny")


@pytest.fixture(scope="session")
def audio_dir(tmp_path_factory) -> Path:
    """Eight 2-second files of the demo's generated audio at 16 kHz."""
    out = tmp_path_factory.mktemp("audio")
    for i in range(8):
        sf.write(out / f"utt{i}.wav", demo_audio(2.0, seed=i)[0].numpy(), 16000)
    return out
