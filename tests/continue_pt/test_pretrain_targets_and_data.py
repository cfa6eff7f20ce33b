"""Continued pre-training: offline fairseq labels, online labels equal to offline ones, waveform normalisation
routing between student and teacher, validation, and unusable audio skipped during a run."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import soundfile as sf
import torch

from bundles import load_bundle
from bundles.waveform import normalize_waveforms
from continue_pt.audio import read_audio
from continue_pt.data import AudioDataModule
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio
from continue_pt.hubert.module import HubertContinuedPretraining
from continue_pt.module_options import ModuleOptions
from continue_pt.hubert.options import HubertOptions
from continue_pt.pretrain import PretrainOptions, run_pretraining
from continue_pt.teacher import OnlineTargets
from converters.convert import convert_checkpoint

SECONDS = 2.0


def _bundle(root: Path, name: str, normalize: bool) -> Path:
    ckpt = torch.load(CHECKPOINT, weights_only=False)  # the suite's own trusted asset
    ckpt["cfg"]["task"]["normalize"] = normalize
    src = root / f"{name}.pt"
    torch.save(ckpt, src)
    return convert_checkpoint(src, root / name, kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Equal-length utterances (no crop differs from the whole file), a fairseq manifest, and fairseq label files
    made by the teacher on each whole file, as fairseq's dump_hubert_feature + dump_km_label would."""
    root = tmp_path_factory.mktemp("corpus")
    bundle_dir = _bundle(root, "plain", normalize=False)
    audio = root / "audio"
    audio.mkdir()
    teacher = OnlineTargets.from_bundle(load_bundle(bundle_dir))
    manifest, km = [str(audio)], []
    for i in range(6):
        sf.write(audio / f"u{i}.wav", demo_audio(SECONDS, seed=50 + i)[0].numpy(), 16000)
        wav = read_audio(audio / f"u{i}.wav", 16000)[None]  # as stored (16-bit PCM), like fairseq's feature dump
        manifest.append(f"u{i}.wav\t{wav.shape[1]}")
        km.append(" ".join(str(int(c)) for c in teacher(wav)[0]))
    (root / "train.tsv").write_text("\n".join(manifest) + "\n")
    (root / "train.km").write_text("\n".join(km) + "\n")
    (root / "dict.km.txt").write_text("".join(f"{c} 1\n" for c in range(20)))
    return root, bundle_dir


def test_online_targets_equal_the_offline_labels_of_the_same_teacher(corpus):
    root, bundle_dir = corpus
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir)))
    data = AudioDataModule(str(root / "train.tsv"), sample_rate=16000, normalize=False, max_batch_seconds=3 * SECONDS,
                           min_seconds=1.0, train_labels=str(root / "train.km"), label_dict=str(root / "dict.km.txt"),
                           num_workers=0, val_fraction=0.0)
    data.setup("fit")
    batches = 0
    for batch in data.train_dataloader():
        online = module.targets(batch["waveforms"], batch["lengths"])
        assert batch["labels"].shape == online.shape
        assert torch.equal(batch["labels"], online)
        batches += 1
    assert batches >= 2


def test_training_on_offline_labels_runs_and_exports(corpus, tmp_path):
    root, bundle_dir = corpus
    options = PretrainOptions(init_from=str(bundle_dir), train_data=str(root / "train.tsv"),
                              labels=str(root / "train.km"), label_dict=str(root / "dict.km.txt"),
                              output_dir=str(tmp_path / "run"), max_steps=3, warmup_steps=1, min_seconds=1.0,
                              max_batch_seconds=2 * SECONDS, num_workers=0, log_every=1, progress_bar=False)
    result = run_pretraining(options)
    trained = load_bundle(result.bundle_dir)
    assert trained.num_updates == 1003
    assert json.loads((result.bundle_dir / "config.json").read_text())["provenance"]["training"]


@pytest.mark.parametrize("student,teacher,data_normalizes,normalize_student", [
    (False, False, False, False), (True, True, True, False), (True, False, False, True), (False, True, False, False),
])
def test_waveform_normalisation_follows_each_model(tmp_path, student, teacher, data_normalizes, normalize_student):
    s = _bundle(tmp_path, "student", student)
    t = _bundle(tmp_path, "teacher", teacher)
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(s), hubert=HubertOptions(teacher=str(t))))
    assert module.data_normalizes is data_normalizes
    assert module.normalize_student_input is normalize_student
    assert module.targets.normalize_waveform is teacher
    raw = demo_audio(1.0, seed=3) * 7 + 0.5
    expected = OnlineTargets.from_bundle(load_bundle(t))(raw)
    given = normalize_waveforms(raw) if data_normalizes else raw
    assert torch.equal(module.targets(given), expected)  # the teacher always sees what it expects


def test_validation_is_logged_and_unusable_audio_is_skipped_and_named(corpus, tmp_path, caplog):
    root, bundle_dir = corpus
    train = tmp_path / "train"
    train.mkdir()
    for f in (root / "audio").iterdir():
        (train / f.name).write_bytes(f.read_bytes())
    (train / "broken.wav").write_bytes(b"RIFF....not audio at all")
    (train / "empty.wav").write_bytes(b"")
    sf.write(train / "short.wav", demo_audio(0.3, seed=1)[0].numpy(), 16000)
    val = tmp_path / "val"
    val.mkdir()
    for i in range(2):
        sf.write(val / f"v{i}.wav", demo_audio(SECONDS, seed=90 + i)[0].numpy(), 16000)
    options = PretrainOptions(init_from=str(bundle_dir), train_data=str(train), val_data=str(val),
                              output_dir=str(tmp_path / "run"), max_steps=4, warmup_steps=1, min_seconds=1.0,
                              max_batch_seconds=2 * SECONDS, num_workers=0, log_every=1, val_check_interval=2,
                              progress_bar=False)
    with caplog.at_level(logging.INFO):
        result = run_pretraining(options)
    log = caplog.text
    for name in ("broken.wav", "empty.wav", "short.wav"):
        assert name in log, name
    assert "skipped 3 of 9 files" in log
    with open(next(result.output_dir.rglob("metrics.csv")), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert any(row.get("val/loss") for row in rows)
    assert any(row.get("val/accuracy_masked") for row in rows)
