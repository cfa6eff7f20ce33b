"""Audio at other sample rates and in other formats: ``labels dump`` output read back by training at 8/16/44.1/48 kHz
(mono and stereo), compressed formats (mp3, opus) and every skipped file named, windowed reads of long files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from continue_pt.audio import read_audio
from continue_pt.data import AudioDataModule
from continue_pt.demo import demo_audio
from continue_pt.frames import conv_layers_of, conv_output_frames
from continue_pt.label_dump import dump_labels

MODEL_RATE = 16000


@pytest.fixture(scope="module")
def bundle(hubert_bundle):
    return hubert_bundle  # the demo HuBERT with its k-means (tests/conftest.py)


def _write_at(path: Path, seconds: float, rate: int, channels: int, seed: int) -> None:
    """Generated speech-like audio stored at ``rate`` with ``channels`` channels (16-bit PCM)."""
    wav = torchaudio.functional.resample(demo_audio(seconds, seed)[0], MODEL_RATE, rate)
    data = torch.stack([wav * (1 - 0.3 * c) for c in range(channels)], dim=1).numpy()
    sf.write(path, data, rate)


@pytest.mark.parametrize("channels", [1, 2], ids=["mono", "stereo"])
@pytest.mark.parametrize("rate", [8000, 16000, 44100, 48000])
def test_dumped_labels_train_at_any_file_rate(bundle, tmp_path, rate, channels):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i, seconds in enumerate([2.3, 2.71]):
        _write_at(audio / f"u{i}.wav", seconds, rate, channels, seed=300 + i)
    out = tmp_path / "labels"
    result = dump_labels(bundle, bundle.get_kmeans(), audio, out)
    assert result.files_labelled == 2 and not result.files_skipped

    # the manifest lists each file's own frames (fairseq's convention), not its length after resampling
    rows = [line.split("\t") for line in (out / "train.tsv").read_text().splitlines()[1:]]
    assert [int(frames) for _, frames in rows] == [sf.info(audio / name).frames for name, _ in rows]

    data = AudioDataModule(out / "train.tsv", sample_rate=MODEL_RATE, normalize=False, max_batch_seconds=10.0,
                           min_seconds=1.0, val_fraction=0.0, train_labels=out / "train.km",
                           label_dict=out / "dict.km.txt", num_workers=0)
    data.setup("fit")
    dataset = data.train_dataset
    assert len(dataset) == 2  # before the fix every file was a "stale manifest entry" unless rate == 16000
    teacher = bundle.get_model()
    for i in range(len(dataset)):
        wav = read_audio(dataset.items[i].path, MODEL_RATE)
        assert dataset.items[i].num_samples == len(wav)
        # one label per conv frame of the audio as training reads it (resampled to the model's rate)
        assert len(dataset[i]["labels"]) == conv_output_frames(conv_layers_of(teacher), len(wav))
    batch = next(iter(data.train_dataloader()))
    frames = conv_output_frames(conv_layers_of(teacher), batch["waveforms"].shape[1])
    assert batch["labels"].shape == (2, frames) or batch["labels"].shape == (2, frames - 1)


def test_a_mixed_folder_reads_mp3_and_opus_and_names_every_skipped_file(tmp_path, caplog):
    import logging

    from continue_pt.corpus import scan_audio

    assert {"MP3", "OGG"} <= set(sf.available_formats()) and "OPUS" in sf.available_subtypes("OGG")
    audio = tmp_path / "mixed"
    (audio / "sub").mkdir(parents=True)
    _write_at(audio / "a.wav", 2.1, 16000, 1, seed=1)
    _write_at(audio / "b.flac", 2.2, 22050, 1, seed=2)
    speech = torchaudio.functional.resample(demo_audio(2.3, seed=3)[0], MODEL_RATE, 44100).numpy()
    sf.write(audio / "sub" / "c.mp3", np.stack([speech, 0.5 * speech], 1), 44100, format="MP3")  # Common Voice
    speech = torchaudio.functional.resample(demo_audio(2.4, seed=4)[0], MODEL_RATE, 48000).numpy()
    sf.write(audio / "d.opus", speech, 48000, format="OGG", subtype="OPUS")
    _write_at(audio / "e.ogg", 2.5, 16000, 1, seed=5)
    (audio / "f.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(64))  # AAC: libsndfile cannot decode it
    (audio / "notes.txt").write_text("recorded in 2024\n")
    (audio / "broken.mp3").write_bytes(b"ID3" + bytes(200))
    _write_at(audio / "short.wav", 0.2, 16000, 1, seed=6)

    scan = scan_audio(audio, MODEL_RATE, min_seconds=1.0)
    assert [item.name for item in scan.items] == ["a.wav", "b.flac", "d.opus", "e.ogg", "sub/c.mp3"]
    skipped = {path.name: reason.split(":")[0] for path, reason in scan.skipped}
    assert skipped == {"broken.mp3": "unreadable", "f.m4a": "unsupported", "notes.txt": "not audio",
                       "short.wav": "shorter than 1.0 s"}
    assert scan.summary() == "skipped 4 of 9 files: 1 not audio, 1 shorter than 1.0 s, 1 unreadable, 1 unsupported"
    for item, seconds in zip(scan.items, [2.1, 2.2, 2.4, 2.5, 2.3]):
        wav = read_audio(item.path, MODEL_RATE)  # decoded, channels averaged, resampled
        assert len(wav) == item.num_samples and abs(len(wav) / MODEL_RATE - seconds) < 0.01
    mp3 = read_audio(audio / "sub" / "c.mp3", MODEL_RATE)
    original = demo_audio(2.3, seed=3)[0] * 0.75  # the mean of the two channels
    assert torch.corrcoef(torch.stack([mp3, original[:len(mp3)]]))[0, 1] > 0.95  # lossy, but the same audio

    data = AudioDataModule(audio, sample_rate=MODEL_RATE, min_seconds=1.0, val_fraction=0.0, num_workers=0)
    with caplog.at_level(logging.INFO):
        data.setup("fit")
    assert len(data.train_dataset) == 5
    for name in ("broken.mp3", "f.m4a", "short.wav"):
        assert f"{name}: " in caplog.text, name
    assert "left out 1 file that is not audio (.txt: 1): notes.txt" in caplog.text


def test_text_beside_the_audio_is_one_line_not_a_warning_per_file(tmp_path, caplog):
    """A LibriSpeech-like tree (a .trans.txt per chapter) must not bury the real problems under one warning per
    transcript: they are counted per extension in one info line, and named at debug level."""
    import logging

    audio = tmp_path / "libri"
    for chapter in range(6):
        folder = audio / "19" / str(chapter)
        folder.mkdir(parents=True)
        _write_at(folder / f"19-{chapter}-0000.flac", 1.5, 16000, 1, seed=chapter)
        (folder / f"19-{chapter}.trans.txt").write_text("19-0-0000 HELLO\n")
    data = AudioDataModule(audio, sample_rate=MODEL_RATE, min_seconds=1.0, val_fraction=0.0, num_workers=0)
    with caplog.at_level(logging.INFO):
        data.setup("fit")
    assert len(data.train_dataset) == 6
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and ".trans.txt" in r.getMessage()]
    notes = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(notes) == 1 and "left out 6 files that are not audio (.txt: 6): 19-0.trans.txt" in notes[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "skipped" in r.getMessage()]


def test_load_audio_gives_the_models_rate_and_warns_when_it_resamples(bundle, tmp_path, caplog):
    import logging
    import warnings

    from continue_pt.audio import SampleRateWarning, load_audio

    _write_at(tmp_path / "at48k.wav", 1.5, 48000, 2, seed=8)
    _write_at(tmp_path / "at16k.wav", 1.5, 16000, 1, seed=9)
    with pytest.warns(SampleRateWarning, match="at48k.wav is at 48000 Hz; resampled to the model's 16000 Hz"):
        wav = load_audio(tmp_path / "at48k.wav", bundle)
    assert wav.shape == (1, 24000) and wav.dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the model's own rate: no warning
        same = load_audio(tmp_path / "at16k.wav", 16000)
    assert same.shape == (1, 24000)
    with torch.no_grad():  # what the README shows
        layers, _ = bundle.get_model().extract_features(wav)
    assert layers[0].shape[:2] == (1, conv_output_frames(conv_layers_of(bundle.get_model()), 24000))

    data = AudioDataModule(tmp_path, sample_rate=MODEL_RATE, min_seconds=1.0, val_fraction=0.0, num_workers=0)
    with caplog.at_level(logging.INFO):
        data.setup("fit")
    note = next(r for r in caplog.records if "not at the model's" in r.getMessage())
    assert note.levelno == logging.WARNING
    assert "1 of 2 files are not at the model's 16000 Hz (1 at 48000 Hz)" in note.getMessage()


def test_training_batches_decode_only_the_crop_window_and_equal_whole_file_crops(tmp_path, monkeypatch):
    audio = tmp_path / "long"
    audio.mkdir()
    _write_at(audio / "a.wav", 20.0, 44100, 2, seed=11)
    _write_at(audio / "b.flac", 14.0, 16000, 1, seed=12)
    _write_at(audio / "c.ogg", 17.5, 48000, 1, seed=13)
    speech = torchaudio.functional.resample(demo_audio(16.0, seed=14)[0], MODEL_RATE, 48000).numpy()
    sf.write(audio / "d.mp3", speech, 48000, format="MP3")  # decoded from the start (no exact seek in mpg123)
    crop = 40000  # 2.5 s of files of 14-20 s
    data = AudioDataModule(audio, sample_rate=MODEL_RATE, max_batch_seconds=6.0, max_sample_size=crop,
                           min_seconds=1.0, val_fraction=0.0, num_workers=0, seed=3)
    data.setup("fit")
    dataset = data.train_dataset
    decoded = []
    original_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, *a, **k: (
        decoded.append((Path(self.name).name, frames)), original_read(self, frames, *a, **k))[1])
    loader = data.train_dataloader()
    batches = list(loader)
    monkeypatch.setattr(sf.SoundFile, "read", original_read)
    assert len(batches) == 2 and sum(len(b["indices"]) for b in batches) == 4
    for name, frames in decoded:  # a window: the crop (+ the resampler's margin), never the whole file
        whole = sf.info(audio / name).frames
        if name == "d.mp3":
            assert frames < whole  # up to the window's end only
        else:
            rate = sf.info(audio / name).samplerate
            assert 0 < frames <= crop * rate // MODEL_RATE + rate // 20, (name, frames, whole)  # margin < 50 ms

    # the same crops, bit for bit, as the collater cuts from whole files (the seeded crop is unchanged)
    collater = data.train_collater
    for batch in batches:
        indices = batch["indices"].tolist()
        whole = collater([dataset[i] for i in indices])
        assert torch.equal(batch["starts"], whole["starts"]) and batch["waveforms"].shape[1] == crop
        assert torch.equal(batch["waveforms"], whole["waveforms"])
    plans = data.micro_batch_plans(0, 2)  # what per-term normalisation counts before loading: the same shapes
    assert [p["num_samples"] for p in plans] == [b["waveforms"].shape[1] for b in batches]


def test_normalised_crop_windows_use_the_whole_utterances_statistics(tmp_path):
    audio = tmp_path / "long"
    audio.mkdir()
    for i, (seconds, rate) in enumerate([(9.0, 44100), (7.5, 16000), (8.2, 48000)]):
        wav = torchaudio.functional.resample(demo_audio(seconds, seed=20 + i)[0], MODEL_RATE, rate)
        sf.write(audio / f"u{i}.flac", (wav * (1 + i) + 0.1 * i).numpy(), rate)  # other scales and offsets

    def epoch_batches(data):
        loader = data.train_dataloader()
        return {tuple(b["indices"].tolist()): b for b in loader}

    def module():
        data = AudioDataModule(audio, sample_rate=MODEL_RATE, normalize=True, max_batch_seconds=3.0,
                               max_sample_size=24000, min_seconds=1.0, val_fraction=0.0, num_workers=0, seed=1)
        data.setup("fit")
        return data

    cold = module()
    first = epoch_batches(cold)  # files read whole once: statistics learnt
    assert bool(cold.train_dataset._norm_known.all())
    again = epoch_batches(cold)  # windows only, normalised with the kept statistics
    for key, batch in first.items():
        assert torch.equal(batch["waveforms"], again[key]["waveforms"])  # the same samples, read either way
        whole = cold.train_collater([cold.train_dataset[i] for i in key])  # F.layer_norm(whole file), then cut
        assert torch.equal(batch["starts"], whole["starts"])
        torch.testing.assert_close(batch["waveforms"], whole["waveforms"], atol=2e-6, rtol=0)
        crop = batch["waveforms"]
        assert crop.abs().mean() > 0.1 and not torch.allclose(crop.mean(1), torch.zeros(len(key)), atol=1e-3)
