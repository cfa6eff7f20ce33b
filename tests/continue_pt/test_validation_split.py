"""The default validation split of a small corpus: one file held out when there are enough, else said plainly."""

from __future__ import annotations

import logging

import soundfile as sf

from continue_pt.data import MIN_FILES_TO_HOLD_OUT, AudioDataModule, held_out_files, validation_share
from continue_pt.demo import demo_audio


def _corpus(root, count: int):
    root.mkdir()
    for i in range(count):
        sf.write(root / f"u{i}.wav", demo_audio(0.3, seed=i)[0].numpy(), 16000)
    return root


def test_a_small_corpus_holds_out_one_file(tmp_path, caplog):
    names = [f"u{i}.wav" for i in range(33)]
    assert not any(validation_share(n) < 0.02 for n in names)  # 2 % of these 33 files is none of them
    held_out = held_out_files(names, 0.02)
    assert sum(held_out) == 1
    assert names[held_out.index(True)] == min(names, key=validation_share)  # stable: the smallest share
    data = AudioDataModule(_corpus(tmp_path / "a", 33), sample_rate=16000, min_seconds=0.1, num_workers=0)
    with caplog.at_level(logging.INFO):
        data.setup("fit")
    assert len(data.val_dataset) == 1 and len(data.train_dataset) == 32
    assert "training on 32 files" in caplog.text and "validating on 1 files" in caplog.text


def test_a_tiny_corpus_says_it_validates_on_nothing_and_what_to_do(tmp_path, caplog):
    count = MIN_FILES_TO_HOLD_OUT - 1
    assert sum(held_out_files([f"u{i}.wav" for i in range(count)], 0.02)) == 0  # every file trains
    data = AudioDataModule(_corpus(tmp_path / "a", count), sample_rate=16000, min_seconds=0.1, num_workers=0)
    with caplog.at_level(logging.INFO):
        data.setup("fit")
    assert len(data.val_dataset) == 0
    warning = next(r for r in caplog.records if "validating on 0 files" in r.getMessage())
    assert warning.levelno == logging.WARNING
    assert "too few to hold out 2%" in warning.getMessage() and "--val-data" in warning.getMessage()


def test_a_large_corpus_keeps_the_hashed_split():
    names = [f"clip{i:05d}.wav" for i in range(2000)]
    held_out = held_out_files(names, 0.02)
    assert held_out == [validation_share(n) < 0.02 for n in names] and 20 < sum(held_out) < 60
