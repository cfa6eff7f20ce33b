"""`continue-pt pretrain`, `export` and `plot` through the CLI, with a YAML config and bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bundles import load_bundle
from continue_pt.cli import cli
from continue_pt.demo import CHECKPOINT, KMEANS, write_demo_corpus
from converters.convert import convert_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_pretrain")
    bundle = convert_checkpoint(CHECKPOINT, root / "bundle")  # no k-means inside: targets come from --kmeans
    audio = write_demo_corpus(root / "audio", num_files=8, seconds=2.5)
    return root, bundle, audio


@pytest.mark.slow
def test_pretrain_from_yaml_with_a_joblib_kmeans_then_export_and_plot(setup):
    root, bundle, audio = setup
    config = root / "run.yaml"
    config.write_text(f"init-from: {bundle}\ntrain_data: {audio}\nmax_steps: 4\nwarmup_steps: 1\n"
                      f"max_batch_seconds: 6\nnum_workers: 0\nlog_every: 1\ncheckpoint_every: 2\n")
    out = root / "run"
    result = CliRunner().invoke(cli, ["pretrain", "--config", str(config), "--output-dir", str(out),
                                      "--kmeans", str(KMEANS), "--kmeans-layer", "1", "--max-steps", "3",
                                      "--loss-norm", "per-term", "--unmasked-weight", "0.5", "--accumulate", "2"])
    assert result.exit_code == 0, result.output
    assert f"bundle: {out / 'bundle'}" in result.output
    trained = load_bundle(out / "bundle")
    assert trained.num_updates == 1000 + 3  # the flag overrode the YAML's max_steps
    assert trained.get_kmeans().layer == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (out / "curves.png").stat().st_size > 0  # Lightning logs steps from 0

    exported = root / "exported"
    result = CliRunner().invoke(cli, ["export", str(out / "checkpoints" / "last.ckpt"), "-o", str(exported)])
    assert result.exit_code == 0, result.output
    assert load_bundle(exported).num_updates == 1003

    (out / "summary.json").unlink()
    result = CliRunner().invoke(cli, ["plot", str(out)])
    assert result.exit_code == 0 and (out / "summary.json").exists()


def test_all_argument_problems_are_reported_at_once_before_anything_starts(setup, tmp_path):
    root, bundle, _audio = setup
    config = tmp_path / "bad.yaml"
    config.write_text("surprise: 1\nmax_steps: 0\n")
    result = CliRunner().invoke(cli, ["pretrain", "--config", str(config), "--init-from", str(bundle),
                                      "--resume", str(tmp_path / "none.ckpt"), "--kmeans", str(KMEANS)])
    assert result.exit_code == 1
    for needle in ["unknown option 'surprise'", "--train-data is required", "--output-dir is required",
                   "needs --kmeans-layer", "exactly one of init_from", "max_steps must be >= 1"]:
        assert needle in result.output, needle
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == [config]


def test_export_and_plot_bad_input(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["export", str(junk), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and str(junk) in result.output and not (tmp_path / "b").exists()
    result = CliRunner().invoke(cli, ["plot", str(tmp_path)])
    assert result.exit_code == 1 and "holds no metrics.csv" in result.output


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, caplog):
    result = CliRunner().invoke(cli, ["demo", "--output-dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    assert "label_rate" not in caplog.text  # online targets and wav2vec 2.0 read no label files: nothing to warn
    assert "0 mismatches" in result.output and "exported bundle loads (num_updates 1030)" in result.output
    # data2vec 2.0: the tiny fairseq checkpoint continued with a restarted teacher anneal, the teacher exported
    assert "exported bundle loads (num_updates 400010)" in result.output
    assert "teacher tensors moved by the EMA" in result.output and "continued data2vec 2.0 bundle" in result.output
