"""The training data pipeline: reading, scanning, labels, cropping, batching, Lightning resume."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from bundles.errors import FileProblem
from continue_pt.audio import AudioError, audio_info, read_audio, resampled_length
from continue_pt.batching import AudioDataset, BatchCollater, BucketBatchSampler, collate_audio
from continue_pt.corpus import AudioItem, scan_audio
from continue_pt.data import AudioDataModule, validation_share
from continue_pt.labels import read_label_dictionary, read_label_file

SR = 16000


def tone(seconds: float, rate: int = SR, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A sine plus noise, ``[frames]`` or ``[frames, channels]`` (each channel a different frequency)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * rate))) / rate
    chans = [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.01 * rng.standard_normal(len(t))
             for c in range(channels)]
    data = np.stack(chans, axis=1).astype(np.float32)
    return data[:, 0] if channels == 1 else data


def write(path: Path, seconds: float, rate: int = SR, channels: int = 1, seed: int = 0, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(seconds, rate, channels, seed), rate, **kwargs)
    return path


def hubert_frames(num_samples: int) -> int:
    """Frames of fairseq's / torchaudio's conv feature extractor (400-sample window, 320 stride): 50 Hz labels."""
    return (num_samples - 400) // 320 + 1


# --------------------------------------------------------------------------------------------------- audio


def test_read_audio_averages_channels_and_resamples(tmp_path):
    stereo = write(tmp_path / "stereo.flac", 1.0, rate=SR, channels=2)
    data, _ = sf.read(stereo, dtype="float32")
    assert torch.allclose(read_audio(stereo, SR), torch.from_numpy(data.mean(axis=1)), atol=1e-6)

    for rate, fmt in [(44100, "flac"), (8000, "wav"), (22050, "ogg")]:
        path = write(tmp_path / f"r{rate}.{fmt}", 1.3, rate=rate, channels=2)
        frames, file_rate, channels = audio_info(path)
        assert (file_rate, channels) == (rate, 2)
        waveform = read_audio(path, SR)
        assert waveform.dtype == torch.float32 and waveform.ndim == 1
        assert len(waveform) == resampled_length(frames, rate, SR) == math.ceil(frames * SR / rate)


@pytest.mark.parametrize("kind, message", [
    ("corrupt", "cannot be read as audio"),
    ("empty", "holds no samples"),
    ("zero_bytes", "cannot be read as audio"),
    ("missing", "no such file"),
    ("nan", "NaN or infinite"),
])
def test_read_audio_names_the_file_for_bad_files(tmp_path, kind, message):
    path = tmp_path / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "empty":
        sf.write(path, np.zeros(0, np.float32), SR)
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "nan":
        sf.write(path, np.full(100, np.nan, np.float32), SR, subtype="FLOAT")
    with pytest.raises(AudioError, match=message) as caught:
        read_audio(path, SR)
    assert isinstance(caught.value, FileProblem) and caught.value.path == path
    assert str(caught.value).startswith(str(path))


# --------------------------------------------------------------------------------------------------- scanning


@pytest.fixture
def messy_dir(tmp_path):
    root = tmp_path / "audio"
    write(root / "a.wav", 2.5)
    write(root / "b.WAV", 3.0, rate=8000)
    write(root / "sub" / "c.flac", 2.2, rate=44100, channels=2)
    write(root / "sub" / "deeper" / "d.ogg", 2.1)
    (root / "corrupt.wav").write_bytes(np.random.default_rng(1).bytes(3000))
    sf.write(root / "empty.wav", np.zeros(0, np.float32), SR)
    write(root / "short.flac", 0.5)
    (root / "clip.m4a").write_text("not decodable here")  # AAC: libsndfile cannot read it
    return root


def test_scan_directory_keeps_usable_files_and_says_why_others_are_skipped(messy_dir):
    scan = scan_audio(messy_dir, SR, min_seconds=2.0)
    assert [item.name for item in scan.items] == ["a.wav", "b.WAV", "sub/c.flac", "sub/deeper/d.ogg"]
    assert [item.num_samples for item in scan.items] == [40000, 48000, math.ceil(97020 * SR / 44100), 33600]
    reasons = {path.name: reason for path, reason in scan.skipped}
    assert set(reasons) == {"corrupt.wav", "empty.wav", "short.flac", "clip.m4a"}  # every file not read, named
    assert reasons["clip.m4a"].startswith("unsupported: .m4a is not a format read here")
    assert reasons["corrupt.wav"].startswith("unreadable: cannot be read as audio (")
    assert reasons["empty.wav"] == "empty: 0 frames"
    assert reasons["short.flac"] == "shorter than 2.0 s: 0.50 s"
    assert all("\n" not in reason for reason in reasons.values())
    assert scan.summary() == "skipped 4 of 8 files: 1 empty, 1 shorter than 2.0 s, 1 unreadable, 1 unsupported"
    # each item's num_samples is what read_audio returns
    assert [len(read_audio(item.path, SR)) for item in scan.items] == [item.num_samples for item in scan.items]
    # min_seconds is the flag for corpora of short utterances
    assert len(scan_audio(messy_dir, SR, min_seconds=0.25).items) == 5


def write_manifest(path: Path, root: Path, entries: list[tuple[str, int]]) -> Path:
    path.write_text(f"{root}\n" + "".join(f"{name}\t{frames}\n" for name, frames in entries))
    return path


def test_scan_manifest_skips_missing_stale_and_short_entries(tmp_path, messy_dir):
    manifest = write_manifest(tmp_path / "train.tsv", messy_dir, [
        ("a.wav", 40000), ("gone.wav", 40000), ("b.WAV", 24000), ("short.flac", 8000), ("sub/c.flac", 1234),
        ("corrupt.wav", 100), ("x.zip:12:400", 400)])
    scan = scan_audio(manifest, SR, min_seconds=2.0)
    assert [(item.name, item.num_samples, item.manifest_entry) for item in scan.items] == [
        ("a.wav", 40000, 0), ("b.WAV", 48000, 2)]  # b is 8 kHz: 24000 frames -> 48000 samples at 16 kHz
    assert scan.manifest_entries == 7
    reasons = [reason.split(":")[0] for _, reason in scan.skipped]
    assert reasons == ["missing", "shorter than 2.0 s", "stale manifest entry", "unreadable", "unsupported"]
    assert "the manifest lists 1234 frames, the file has 97020" in scan.skipped[2][1]
    # trusting the manifest (fairseq's way): only existence is checked
    trusted = scan_audio(manifest, SR, min_seconds=0.0, read_headers=False)
    assert [item.name for item in trusted.items] == ["a.wav", "b.WAV", "short.flac", "sub/c.flac", "corrupt.wav"]
    assert trusted.items[1].num_samples == 24000


def test_scan_raises_only_for_an_unusable_source(tmp_path):
    with pytest.raises(FileProblem, match="does not exist.*directory of audio files"):
        scan_audio(tmp_path / "nowhere", SR)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileProblem, match="holds no audio files"):
        scan_audio(tmp_path / "empty_dir", SR)
    (tmp_path / "list.txt").write_text("x")
    with pytest.raises(FileProblem, match="neither a directory nor a fairseq manifest"):
        scan_audio(tmp_path / "list.txt", SR)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(FileProblem, match="is empty"):
        scan_audio(tmp_path / "empty.tsv", SR)
    (tmp_path / "root_only.tsv").write_text(f"{tmp_path}\n")
    with pytest.raises(FileProblem, match="lists no audio files"):
        scan_audio(tmp_path / "root_only.tsv", SR)
    (tmp_path / "bad_root.tsv").write_text("/no/such/root\na.wav\t10\n")
    with pytest.raises(FileProblem, match="line 1 names the root directory '/no/such/root', which does not exist"):
        scan_audio(tmp_path / "bad_root.tsv", SR)
    (tmp_path / "bad_lines.tsv").write_text(f"{tmp_path}\na.wav\t10\nb.wav 20\n\nc.wav\tmany\n")
    with pytest.raises(FileProblem) as caught:
        scan_audio(tmp_path / "bad_lines.tsv", SR)
    assert [p.split(":")[0] for p in caught.value.problems] == ["line 3", "line 4", "line 5"]


# --------------------------------------------------------------------------------------------------- labels


def write_dictionary(path: Path, order: list[int]) -> Path:
    path.write_text("".join(f"{c} {100 + c}\n" for c in order))
    return path


def test_label_dictionary_maps_symbols_to_cluster_ids(tmp_path):
    assert read_label_dictionary(write_dictionary(tmp_path / "dict.km.txt", [3, 0, 2, 1])) == {
        "3": 3, "0": 0, "2": 2, "1": 1}
    (tmp_path / "bad.txt").write_text("0 5\nfoo 3\n1 2\n1 2\n07 1\nnocount\n")
    with pytest.raises(FileProblem) as caught:
        read_label_dictionary(tmp_path / "bad.txt")
    assert caught.value.problems == [
        "line 2: symbol 'foo' is not a cluster id (a non-negative integer)",
        "line 4: symbol '1' is listed twice",
        "line 5: symbol '07' is not a cluster id (a non-negative integer)",
        "line 6: expected 'symbol count', found 'nocount'",
    ]


@pytest.fixture
def labelled(tmp_path):
    """A manifest of 16 kHz files, 50 Hz labels as fairseq dumps them, a shuffled dictionary of 7 clusters."""
    root = tmp_path / "wavs"
    lengths = [41000, 35210, 52000, 33333, 60123, 38000]
    rng = np.random.default_rng(5)
    entries, km_lines = [], []
    for i, n in enumerate(lengths):
        write(root / f"u{i}.wav", n / SR, seed=i, subtype="PCM_16")
        entries.append((f"u{i}.wav", n))
        km_lines.append(" ".join(str(c) for c in rng.integers(0, 7, hubert_frames(n))))
    manifest = write_manifest(tmp_path / "train.tsv", root, entries)
    km = tmp_path / "train.km"
    km.write_text("".join(line + "\n" for line in km_lines))
    dictionary = write_dictionary(tmp_path / "dict.km.txt", [4, 1, 6, 0, 3, 5, 2])
    return manifest, km, dictionary, km_lines


def test_read_label_file_gives_cluster_ids_per_item(labelled):
    manifest, km, dictionary, km_lines = labelled
    scan = scan_audio(manifest, SR, min_seconds=2.1)  # drops u3 (33333 samples): its .km line is not read
    assert [item.manifest_entry for item in scan.items] == [0, 1, 2, 4, 5]
    labels = read_label_file(km, dictionary, scan.items, label_rate=50, sample_rate=SR,
                             manifest_entries=scan.manifest_entries)
    assert len(labels) == 5
    for item, row in zip(scan.items, labels):
        assert row.dtype == torch.int64
        assert row.tolist() == [int(c) for c in km_lines[item.manifest_entry].split()]
    assert labels.flat.dtype == np.int16


def test_read_label_file_reports_every_problem(labelled, tmp_path):
    manifest, km, dictionary, km_lines = labelled
    scan = scan_audio(manifest, SR, min_seconds=0.5)
    bad = tmp_path / "bad.km"
    bad.write_text("".join((line.replace("3", "9") if i in (1, 4) else line) + "\n"
                           for i, line in enumerate(km_lines)))
    with pytest.raises(FileProblem) as caught:
        read_label_file(bad, dictionary, scan.items, label_rate=50, sample_rate=SR)
    assert caught.value.problems == ["line 2: symbol '9' is not in dict.km.txt",
                                     "line 5: symbol '9' is not in dict.km.txt"]

    with pytest.raises(FileProblem, match="has 6 lines but the manifest lists 7 files"):
        read_label_file(km, dictionary, scan.items, label_rate=50, sample_rate=SR, manifest_entries=7)

    with pytest.raises(FileProblem) as caught:  # MFCC-rate labels read at HuBERT's rate
        read_label_file(km, dictionary, scan.items, label_rate=100, sample_rate=SR)
    assert len(caught.value.problems) == 6
    assert caught.value.problems[0] == "line 1: 127 labels at 100 Hz = 1.27 s, but u0.wav is 2.56 s"
    assert "Check label_rate (now 100 Hz" in str(caught.value)

    directory_items = [AudioItem(item.path, item.num_samples, item.name) for item in scan.items]
    with pytest.raises(FileProblem, match="need the audio listed in a fairseq manifest"):
        read_label_file(km, dictionary, directory_items, label_rate=50, sample_rate=SR)


# --------------------------------------------------------------------------------------------------- dataset


def test_dataset_normalises_the_whole_utterance_and_survives_vanished_files(tmp_path, caplog):
    items = [AudioItem(write(tmp_path / f"{i}.wav", 1.0 + i, rate=8000, seed=i), (1 + i) * SR) for i in range(3)]
    plain = AudioDataset(items, SR, normalize=False)
    normed = AudioDataset(items, SR, normalize=True)
    sample = normed[1]
    assert sample["index"] == 1 and sample["labels"] is None and len(sample["waveform"]) == 2 * SR
    raw = plain[1]["waveform"]
    assert torch.allclose(sample["waveform"], F.layer_norm(raw, raw.shape))
    assert abs(sample["waveform"].mean().item()) < 1e-5 and abs(sample["waveform"].std().item() - 1) < 1e-3

    items[0].path.unlink()
    items[2].path.write_bytes(b"garbage" * 100)
    with caplog.at_level(logging.WARNING, logger="continue_pt.data"):
        assert plain[0] is None and plain[2] is None
    assert plain.failures == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith(f"{items[0].path}: no such file")
    assert "\n" not in lines[1] and lines[1].startswith(str(items[2].path))

    # failures in data-loader workers are counted where the run can see them
    loader = DataLoader(AudioDataset(items, SR, False), batch_size=1, num_workers=2,
                        collate_fn=lambda s: collate_audio(s, 10**6, 50, SR, np.random.default_rng(0)))
    batches = list(loader)
    assert batches[0] is None and batches[2] is None and batches[1]["waveforms"].shape == (1, 2 * SR)
    assert loader.dataset.failures == 2


# --------------------------------------------------------------------------------------------------- cropping


def sample(index: int, n: int, labels: bool = False) -> dict:
    waveform = torch.arange(n, dtype=torch.float32)
    return {"index": index, "waveform": waveform,
            "labels": torch.arange(hubert_frames(n)) if labels else None}


def test_collate_crops_to_the_shortest_and_drops_nothing_but_failures():
    batch = collate_audio([sample(0, 40000), None, sample(2, 35000), sample(5, 300000)], 250000, 50, SR,
                          np.random.default_rng(0))
    assert batch["waveforms"].shape == (3, 35000)
    assert batch["indices"].tolist() == [0, 2, 5] and batch["lengths"].tolist() == [35000] * 3
    assert batch["labels"] is None and batch["starts"][1] == 0
    for row, start, n in zip(batch["waveforms"], batch["starts"].tolist(), [40000, 35000, 300000]):
        assert 0 <= start <= n - 35000 and row[0] == start and row[-1] == start + 34999  # a contiguous window

    long_only = collate_audio([sample(0, 300000), sample(1, 260000)], 250000, 50, SR, np.random.default_rng(1))
    assert long_only["waveforms"].shape == (2, 250000)
    assert collate_audio([None, None], 250000, 50, SR, np.random.default_rng(0)) is None

    collater = BatchCollater(250000, 50, SR, seed=0, sampler=BucketBatchSampler([1] * 9, 1, SR, 250000, True, 0))
    samples = [sample(3, 300000), sample(8, 280000)]
    first = collater(samples)["starts"]
    assert torch.equal(collater(samples)["starts"], first)  # crops are a function of (seed, epoch, batch)
    collater.sampler.set_epoch(1)
    assert not torch.equal(collater(samples)["starts"], first)

    with_labels = collate_audio([sample(0, 40000, True), sample(1, 36000, True)], 250000, 50, SR,
                                np.random.default_rng(3))
    frames = with_labels["labels"]
    assert frames.dtype == torch.int64 and frames.shape == (2, min(round(36000 / 320), hubert_frames(36000)))
    for row, start in zip(frames, with_labels["starts"].tolist()):
        assert row[0] == int(round(start * 50 / SR))  # labels are frame numbers here: the window starts there


class GivenStarts:
    """An rng whose ``integers`` returns chosen crop offsets (clipped into range)."""

    def __init__(self, starts):
        self.starts = iter(starts)

    def integers(self, low, high):
        return min(next(self.starts), high - 1)


@pytest.mark.fairseq
def test_label_cropping_matches_fairseq_hubert_dataset(labelled, monkeypatch):
    from fairseq.data import Dictionary
    from fairseq.data.audio import hubert_dataset
    from fairseq.tasks.hubert_pretraining import LabelEncoder

    manifest, km, dictionary_path, _ = labelled
    dictionary = Dictionary.load(str(dictionary_path))
    max_sample_size = 40000
    reference = hubert_dataset.HubertDataset(
        str(manifest), sample_rate=SR, label_paths=[str(km)], label_rates=[50.0], pad_list=[dictionary.pad()],
        eos_list=[dictionary.eos()], label_processors=[LabelEncoder(dictionary)],
        max_sample_size=max_sample_size, pad_audio=False, random_crop=True, normalize=True)
    scan = scan_audio(manifest, SR, min_seconds=0.5)
    labels = read_label_file(km, dictionary_path, scan.items, label_rate=50, sample_rate=SR,
                             manifest_entries=scan.manifest_entries)
    ours = AudioDataset(scan.items, SR, normalize=True, labels=labels)
    cluster_of_row = {dictionary.index(s): int(s) for s in dictionary.symbols[dictionary.nspecial:]}

    batches = [([0, 1, 2], np.random.default_rng(0)), ([2, 4, 5], np.random.default_rng(1)),
               ([4, 2, 0], np.random.default_rng(2)), ([0, 2, 4], GivenStarts([160, 480, 16080])),  # .5 frame starts
               ([4], np.random.default_rng(3)), ([3, 1], GivenStarts([1, 1]))]
    for indices, rng in batches:
        batch = collate_audio([ours[i] for i in indices], max_sample_size, 50, SR, rng)
        sizes = [scan.items[i].num_samples for i in indices]
        size = min(min(sizes), max_sample_size)
        expected_calls = iter([s for s, n in zip(batch["starts"].tolist(), sizes) if n > size])
        monkeypatch.setattr(hubert_dataset.np.random, "randint", lambda low, high: next(expected_calls))
        theirs = reference.collater([reference[i] for i in indices])
        assert next(expected_calls, None) is None  # fairseq drew exactly our crops
        assert torch.equal(theirs["id"], batch["indices"])
        assert torch.allclose(theirs["net_input"]["source"], batch["waveforms"], atol=1e-6)
        target = theirs["target_list"][0]
        assert target.shape == batch["labels"].shape
        assert [[cluster_of_row[int(r)] for r in row] for row in target] == batch["labels"].tolist()


# --------------------------------------------------------------------------------------------------- batching


def lengths_for_test(n: int = 400, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(SR // 2, 20 * SR, n)] + [40 * SR]  # one file over the batch budget


def test_bucket_batches_respect_the_budget_and_cover_every_file_once():
    lengths = lengths_for_test()
    sampler = BucketBatchSampler(lengths, max_batch_seconds=30, sample_rate=SR, max_sample_size=250000,
                                 shuffle=True, seed=1)
    budget = 30 * SR
    counts = set()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        counts.add(len(batches))
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            cost = len(b) * min(max(lengths[i] for i in b), 250000)
            assert cost <= budget or len(b) == 1
        # similar lengths: the batches are disjoint ranges of the (capped) length order
        spans = sorted((min(sampler.keys[b]), max(sampler.keys[b])) for b in batches)
        assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:]))
    assert counts == {len(sampler)}  # the same number of batches every epoch (Lightning counts once)
    assert [len(lengths) - 1] in [b for b in batches]  # the 40 s file: a batch of its own, cropped later

    again = BucketBatchSampler(lengths, 30, SR, 250000, shuffle=True, seed=1)
    again.set_epoch(2)
    assert list(again) == batches
    again.set_epoch(1)
    assert list(again) != batches
    other_seed = BucketBatchSampler(lengths, 30, SR, 250000, shuffle=True, seed=2)
    other_seed.set_epoch(2)
    assert list(other_seed) != batches
    ordered = BucketBatchSampler(lengths, 30, SR, 250000, shuffle=False, seed=1)
    assert list(ordered) == list(ordered) and ordered.keys[list(ordered)[0][0]] == 250000  # longest first


def test_sampler_state_resumes_with_the_next_batch():
    lengths = lengths_for_test(200)
    sampler = BucketBatchSampler(lengths, 20, SR, 250000, shuffle=True, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(5)]
    state = sampler.state_dict()
    assert state == {"epoch": 3, "seed": 7, "batches_done": 5, "num_batches": len(full),
                     "fingerprint": sampler.fingerprint, "num_replicas": 1}

    resumed = BucketBatchSampler(lengths, 20, SR, 250000, shuffle=True, seed=0)  # the checkpoint's seed wins
    resumed.load_state_dict(state)
    resumed.set_epoch(3)  # what Lightning does at the start of the resumed epoch
    assert head + list(resumed) == full
    resumed.set_epoch(4)
    expected = [b.tolist() for b in BucketBatchSampler(lengths, 20, SR, 250000, True, 7).epoch_batches(4)]
    assert list(resumed) == expected

    at_end = BucketBatchSampler(lengths, 20, SR, 250000, shuffle=True, seed=7)
    at_end.load_state_dict({**state, "batches_done": len(full)})  # saved at the end of epoch 3
    assert at_end.epoch == 4 and list(at_end) == expected


def test_lightning_sets_the_epoch_of_the_batch_sampler():
    from lightning.fabric.utilities.data import _set_sampler_epoch

    sampler = BucketBatchSampler(lengths_for_test(50), 20, SR, 250000, shuffle=True, seed=0)
    loader = DataLoader(list(range(51)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)  # Lightning 2.6 looks at loader.sampler and loader.batch_sampler.sampler only
    assert sampler.epoch == 5


def test_distributed_ranks_get_equal_disjoint_shares():
    lengths = lengths_for_test(101)
    single = BucketBatchSampler(lengths, 25, SR, 250000, shuffle=True, seed=3)
    ranks = [BucketBatchSampler(lengths, 25, SR, 250000, shuffle=True, seed=3, num_replicas=3, rank=r)
             for r in range(3)]
    shares = [list(r) for r in ranks]
    assert len({len(s) for s in shares} | {len(r) for r in ranks}) == 1
    all_batches = [b for s in shares for b in s]
    assert {tuple(b) for b in all_batches} == {tuple(b) for b in single}  # padded by repeating, nothing lost
    dropped = [BucketBatchSampler(lengths, 25, SR, 250000, True, 3, drop_last=True, num_replicas=3, rank=r)
               for r in range(3)]
    assert len(dropped[0]) == len(single) // 3 and len({tuple(b) for r in dropped for b in r}) == 3 * len(dropped[0])


# --------------------------------------------------------------------------------------------------- DataModule


def test_datamodule_logs_skips_and_holds_out_a_stable_validation_share(tmp_path, messy_dir, caplog):
    with caplog.at_level(logging.INFO, logger="continue_pt.data"):
        module = AudioDataModule(messy_dir, min_seconds=2.0, val_fraction=0.6, num_workers=0, max_batch_seconds=10)
        module.setup("fit")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith(f"skipped {messy_dir / 'clip.m4a'}: unsupported: ")
    assert f"skipped {messy_dir / 'corrupt.wav'}: unreadable: " in lines[1]
    assert lines[2] == f"skipped {messy_dir / 'empty.wav'}: empty: 0 frames"
    assert lines[3] == f"skipped {messy_dir / 'short.flac'}: shorter than 2.0 s: 0.50 s"
    assert lines[4] == (f"{messy_dir}: skipped 4 of 8 files: 1 empty, 1 shorter than 2.0 s, 1 unreadable, "
                        "1 unsupported")
    names = [item.name for item in module.train_dataset.items + module.val_dataset.items]
    assert sorted(names) == ["a.wav", "b.WAV", "sub/c.flac", "sub/deeper/d.ogg"]
    val_before = {item.name for item in module.val_dataset.items}
    assert val_before == {n for n in names if validation_share(n) < 0.6} == {"a.wav", "sub/c.flac"}

    for i in range(12):  # more files arrive: nobody changes sides
        write(messy_dir / "new" / f"n{i}.wav", 2.0, seed=i)
    grown = AudioDataModule(messy_dir, val_fraction=0.6, num_workers=0, max_batch_seconds=10)
    grown.setup("fit")
    val_after = {item.name for item in grown.val_dataset.items}
    assert val_after & set(names) == val_before and 0 < len(val_after - val_before) < 12

    batch = next(iter(module.train_dataloader()))
    assert batch["waveforms"].ndim == 2 and batch["labels"] is None


def test_datamodule_with_labels_and_argument_problems(labelled, tmp_path):
    manifest, km, dictionary, _ = labelled
    module = AudioDataModule(manifest, train_labels=km, label_dict=dictionary, val_fraction=0.3, num_workers=0,
                             max_batch_seconds=6, min_seconds=0.5, seed=4)
    module.setup()
    assert len(module.train_dataset) + len(module.val_dataset) == 6
    for batch in list(module.train_dataloader()) + list(module.val_dataloader()):
        frames = batch["labels"].shape[1]
        assert batch["labels"].shape[0] == batch["waveforms"].shape[0]
        assert abs(frames - batch["waveforms"].shape[1] / 320) <= 1.5
    with pytest.raises(FileProblem, match="need both a .km file and its dictionary"):
        AudioDataModule(manifest, train_labels=km)
    with pytest.raises(FileProblem, match="has no frame labels while the training audio has"):
        AudioDataModule(manifest, manifest, train_labels=km, label_dict=dictionary)
    (tmp_path / "nothing").mkdir()
    write(tmp_path / "nothing" / "tiny.wav", 0.1)
    with pytest.raises(FileProblem, match=r"holds no usable audio \(skipped 1 of 1 files: 1 shorter than 2.0 s\)"):
        AudioDataModule(tmp_path / "nothing").setup()


# --------------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resume_audio(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_audio")
    rng = np.random.default_rng(0)
    for i in range(40):
        write(root / f"f{i:03d}.wav", float(rng.integers(3, 12)) / 10, seed=i)
    return root


def recorder_class():
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        """Records which utterances (and crops) each training step saw."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple] = []

        def training_step(self, batch, batch_idx):
            self.seen.append((tuple(batch["indices"].tolist()), tuple(batch["starts"].tolist())))
            return (self.weight * batch["waveforms"].mean()).sum() + self.weight.pow(2).sum()

        def validation_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return Recorder


def fit(root: Path, max_steps: int, num_workers: int, callbacks=(), ckpt_path=None, **trainer_args):
    import lightning.pytorch as pl

    model = recorder_class()()
    data = AudioDataModule(root, max_batch_seconds=2.0, min_seconds=0.1, val_fraction=0.1,
                           num_workers=num_workers, seed=3)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks),
                         enable_checkpointing=bool(callbacks), num_sanity_val_steps=0, **trainer_args)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.seen, data


@pytest.fixture(scope="module")
def uninterrupted(resume_audio):
    seen, data = fit(resume_audio, 40, num_workers=0, val_check_interval=5)
    return seen, len(data.train_sampler)


@pytest.mark.slow
@pytest.mark.parametrize("where, num_workers", [
    ("mid", 0), ("mid", 2), ("last_of_epoch", 0), ("last_of_epoch", 2), ("first_of_next", 0)])
def test_lightning_mid_epoch_resume_continues_the_exact_batch_order(resume_audio, uninterrupted, tmp_path,
                                                                    where, num_workers, recwarn):
    from lightning.pytorch.callbacks import ModelCheckpoint

    full, per_epoch = uninterrupted
    assert len(full) == 40 and per_epoch < 20  # the run spans epochs
    stop = {"mid": 7, "last_of_epoch": per_epoch, "first_of_next": per_epoch + 1}[where]
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=stop, save_top_k=-1, filename="step{step}")
    before, _ = fit(resume_audio, stop, num_workers, callbacks=[checkpoint], val_check_interval=5)
    (path,) = tmp_path.glob("*.ckpt")
    state = torch.load(path, weights_only=True)["AudioDataModule"]["train_sampler"]
    assert state["batches_done"] == stop % per_epoch or state["batches_done"] == per_epoch
    after, _ = fit(resume_audio, 40, num_workers, callbacks=[checkpoint], ckpt_path=path, val_check_interval=5)
    assert before + after == full  # same utterances, same crops, nothing replayed or skipped
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


@pytest.mark.parametrize("with_labels", [False, True])
def test_micro_batch_plans_equal_the_batches_the_loader_makes(labelled, with_labels):
    """per-term with accumulation counts a step's masks from these plans before the batches are loaded."""
    manifest, km, dictionary, _ = labelled
    labels = dict(train_labels=km, label_dict=dictionary) if with_labels else {}
    module = AudioDataModule(manifest, val_fraction=0.0, num_workers=0, max_batch_seconds=5, min_seconds=0.5,
                             max_sample_size=40000, seed=4, **labels)
    module.setup()
    for epoch in (0, 3):
        loader = module.train_dataloader()
        module.train_sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) > 2
        plans = module.micro_batch_plans(0, len(batches))
        assert [p["indices"].tolist() for p in module.micro_batch_plans(1, 3)] == \
            [p["indices"].tolist() for p in plans[1:3]]
        for batch, plan in zip(batches, plans):
            assert torch.equal(plan["indices"], batch["indices"])
            assert plan["batch_size"] == batch["waveforms"].shape[0]
            assert plan["num_samples"] == batch["waveforms"].shape[1]
            assert plan["label_frames"] == (batch["labels"].shape[1] if with_labels else None)
