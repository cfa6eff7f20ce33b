"""`continue-pt export SRC --to fairseq -o model.pt` on the tiny demo bundle and a training checkpoint.

No fairseq needed: the file is read back with the kit's own allow-list reader (test_fairseq_export.py has fairseq
load it)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from bundles import load_bundle
from continue_pt.cli import cli
from continue_pt.pretrain import PretrainOptions, run_pretraining
from converters.convert import convert_checkpoint
from converters.fairseq_checkpoint import read_fairseq_checkpoint


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def _same_tensors(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bundle_exports_to_fairseq_and_converts_back_to_the_same_bundle(bundle_dir, tmp_path):
    result = _invoke("export", bundle_dir, "--to", "fairseq", "-o", tmp_path / "model.pt")
    assert result.exit_code == 0, result.output
    with read_fairseq_checkpoint(tmp_path / "model.pt") as ckpt:
        assert ckpt.era == "dict" and ckpt.num_updates == load_bundle(bundle_dir).num_updates
        assert ckpt.task_state_key == "dictionaries"  # fairseq's task needs no dict.km.txt on disk
        assert ckpt.dictionaries[0].symbols == load_bundle(bundle_dir).config.label_dictionary["source_symbols"]
    back = load_bundle(convert_checkpoint(tmp_path / "model.pt", tmp_path / "back"))
    original = load_bundle(bundle_dir)
    assert _same_tensors(back.state_dict(), original.state_dict())
    assert _same_tensors(back.fairseq_extras(), original.fairseq_extras())
    inspected = _invoke("inspect", tmp_path / "model.pt", "--json")
    facts = json.loads(inspected.output)
    assert facts["what"] == "fairseq checkpoint (dict era)" and facts["exported_by"].startswith("continue-pt export")


def test_a_training_checkpoint_exports_to_fairseq(bundle_dir, audio_dir, tmp_path):
    options = PretrainOptions(train_data=str(audio_dir), output_dir=str(tmp_path / "run"), init_from=str(bundle_dir),
                              max_steps=2, max_batch_seconds=4.0, min_seconds=1.0, num_workers=0, warmup_steps=1,
                              checkpoint_every=2, log_every=1)
    run = run_pretraining(options)
    ckpt = run.checkpoint_dir / "last.ckpt"
    result = _invoke("export", ckpt, "--to", "fairseq", "-o", tmp_path / "trained.pt")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "trained.pt"]  # no temporary bundle left
    back = load_bundle(convert_checkpoint(tmp_path / "trained.pt", tmp_path / "back"))
    trained = load_bundle(run.bundle_dir)
    assert back.num_updates == trained.num_updates == load_bundle(bundle_dir).num_updates + 2
    assert _same_tensors(back.state_dict(), trained.state_dict())
    assert not _same_tensors(back.state_dict(), load_bundle(bundle_dir).state_dict())  # the trained weights


def _no_fairseq_config(bundle_dir, tmp_path):
    copy = tmp_path / "copied"
    shutil.copytree(bundle_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["provenance"]["fairseq_config"]
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("case,needle", [
    ("exists", "already exists"),
    ("missing", "no such bundle or training checkpoint"),
    ("out_is_dir", "is a directory"),
    ("no_config", "no fairseq configuration"),
])
def test_refusals_are_one_error_line_and_write_nothing(case, needle, bundle_dir, tmp_path):
    src, out = bundle_dir, tmp_path / "model.pt"
    if case == "exists":
        out.write_bytes(b"keep me")
    elif case == "missing":
        src = tmp_path / "nothing"
    elif case == "out_is_dir":
        out.mkdir()
    elif case == "no_config":
        src = _no_fairseq_config(bundle_dir, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _invoke("export", src, "--to", "fairseq", "-o", out)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert out.read_bytes() == b"keep me"
