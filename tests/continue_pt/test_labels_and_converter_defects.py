"""Offline labels and converted checkpoints: the label set's K reaches the label head, a missing label_rate, the
``inspect`` of a fairseq label file, ``labels dump`` with the teacher's own k-means."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import soundfile as sf
import torch

from bundles import load_bundle
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio
from continue_pt.label_dump import dump_labels
from continue_pt.labels import bundle_label_rate, label_set_size
from continue_pt.options import PretrainOptionsError
from continue_pt.pretrain import PretrainOptions, run_pretraining
from converters.convert import convert_checkpoint

SECONDS = 2.0


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A bundle (K = 20), four files and their labels as ``labels dump`` writes them."""
    root = tmp_path_factory.mktemp("offline")
    bundle_dir = convert_checkpoint(CHECKPOINT, root / "b", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    audio = root / "audio"
    audio.mkdir()
    for i in range(4):
        sf.write(audio / f"u{i}.wav", demo_audio(SECONDS, seed=70 + i)[0].numpy(), 16000)
    bundle = load_bundle(bundle_dir)
    dump_labels(bundle, bundle.get_kmeans(), audio, root / "labels")
    return root, bundle_dir


def _relabelled(root: Path, out: Path, k: int) -> Path:
    """The dumped labels mapped onto a label set of ``k`` clusters (ids ``c * 7 % k``: every id below k is used
    when k > 20, so a head with fewer rows cannot index them)."""
    out.mkdir()
    (out / "train.tsv").write_bytes((root / "labels" / "train.tsv").read_bytes())
    lines = (root / "labels" / "train.km").read_text().splitlines()
    (out / "train.km").write_text("".join(" ".join(str(int(c) * 7 % k) for c in line.split()) + "\n"
                                          for line in lines))
    (out / "dict.km.txt").write_text("".join(f"{c} 1\n" for c in range(k)))
    return out


def _options(bundle_dir: Path, labels: Path, run: Path, **overrides) -> PretrainOptions:
    return PretrainOptions(init_from=str(bundle_dir), train_data=str(labels / "train.tsv"),
                           labels=str(labels / "train.km"), label_dict=str(labels / "dict.km.txt"),
                           output_dir=str(run), max_steps=1, warmup_steps=1, min_seconds=1.0,
                           max_batch_seconds=2 * SECONDS, num_workers=0, log_every=1, progress_bar=False,
                           **overrides)


def test_offline_labels_of_another_k_are_refused_without_a_new_head(labelled, tmp_path):
    root, bundle_dir = labelled
    assert label_set_size(root / "labels" / "dict.km.txt") == 20
    _options(bundle_dir, root / "labels", tmp_path / "same").validate()  # the head's own K: fine
    labels = _relabelled(root, tmp_path / "k32", 32)
    with pytest.raises(PretrainOptionsError, match="lists 32 clusters but the label head .* has 20"):
        _options(bundle_dir, labels, tmp_path / "run").validate()


@pytest.mark.parametrize("k", [32, 12])
def test_a_new_label_head_gets_the_label_sets_k(labelled, tmp_path, k):
    root, bundle_dir = labelled
    labels = _relabelled(root, tmp_path / f"k{k}", k)
    result = run_pretraining(_options(bundle_dir, labels, tmp_path / "run", reinit_label_head=True))
    trained = load_bundle(result.bundle_dir)
    assert trained.config.label_dictionary["num_clusters"] == k
    assert trained.get_pretrain_model().logit_generator.label_embeddings.shape[0] == k


def test_a_checkpoint_without_label_rate_converts_to_fairseqs_50_hz(tmp_path, caplog):
    ckpt = torch.load(CHECKPOINT, weights_only=False)  # the suite's own trusted asset
    ckpt["cfg"]["model"]["label_rate"] = None
    ckpt["cfg"]["task"].pop("label_rate", None)
    torch.save(ckpt, tmp_path / "no_rate.pt")
    bundle = load_bundle(convert_checkpoint(tmp_path / "no_rate.pt", tmp_path / "b"))
    assert bundle.config.objective["label_rate"] == 50.0
    assert "assumed" in bundle.config.objective["label_rate_note"]
    # bundles converted before: label_rate null in config.json
    with caplog.at_level(logging.WARNING):
        assert bundle_label_rate({"label_rate": None}) == 50.0
        assert bundle_label_rate({}) == 50.0
    assert "assuming fairseq's 50 Hz" in caplog.text
    assert bundle_label_rate({"label_rate": 100}) == 100.0


def test_inspect_says_a_km_file_holds_frame_labels(labelled, tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    root, _ = labelled
    km = root / "labels" / "train.km"
    result = CliRunner().invoke(cli, ["inspect", str(km), "--json"])
    assert result.exit_code == 0, result.output  # before: routed to the k-means reader, "Error: ... joblib ..."
    facts = json.loads(result.output)
    lines = km.read_text().splitlines()
    assert facts["what"].startswith("fairseq frame labels")
    assert facts["lines"] == len(lines) == 4
    assert facts["frames"] == sum(len(line.split()) for line in lines)
    assert facts["label_range"][1] <= 19
    # a k-means that happens to be named .km is still read as one
    (tmp_path / "model.km").write_bytes(Path(KMEANS).read_bytes())
    facts = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path / "model.km"), "--json"]).output)
    assert facts["what"] == "k-means" and facts["num_clusters"] == 20


def test_the_teacher_sees_the_students_cropped_normalised_input(tmp_path):
    from torch.nn import functional as F

    from continue_pt.hubert.module import HubertContinuedPretraining
    from continue_pt.module_options import ModuleOptions

    ckpt = torch.load(CHECKPOINT, weights_only=False)  # the suite's own trusted asset
    ckpt["cfg"]["task"]["normalize"] = True  # a LARGE-style model: student and teacher normalise
    torch.save(ckpt, tmp_path / "norm.pt")
    bundle_dir = convert_checkpoint(tmp_path / "norm.pt", tmp_path / "b", kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir)))
    assert module.data_normalizes and not module.normalize_student_input
    whole = demo_audio(4.0, seed=5)[0] * 3 + 0.2
    data = F.layer_norm(whole, whole.shape)  # what AudioDataset gives: normalised over the whole utterance
    crop = data[16000:40000][None]  # a crop's own mean and variance are not 0 and 1
    seen = []
    teacher = module.targets.teacher
    extract = teacher.extract_features
    teacher.extract_features = lambda w, *a, **k: (seen.append(w.clone()), extract(w, *a, **k))[1]
    labels = module.targets(crop, torch.tensor([crop.shape[1]]))
    assert torch.equal(seen[0], crop)  # the student's input, not the crop normalised again
    assert labels.shape[1] > 0


def test_labels_dump_uses_the_teachers_own_kmeans_without_kmeans(labelled, tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    root, bundle_dir = labelled
    result = CliRunner().invoke(cli, ["labels", "dump", "--teacher", str(bundle_dir), "--audio",
                                      str(root / "audio"), "-o", str(tmp_path / "own")])
    assert result.exit_code == 0, result.output  # before: "Missing option '--kmeans'"
    for name in ("train.tsv", "train.km", "dict.km.txt"):  # the same labels as with the k-means passed explicitly
        assert (tmp_path / "own" / name).read_text() == (root / "labels" / name).read_text()
    plain = convert_checkpoint(CHECKPOINT, tmp_path / "no_km")
    result = CliRunner().invoke(cli, ["labels", "dump", "--teacher", str(plain), "--audio", str(root / "audio"),
                                      "-o", str(tmp_path / "none")])
    assert result.exit_code == 1 and "holds no k-means to label with" in result.output
    assert result.output.startswith("Error:") and not (tmp_path / "none").exists()
