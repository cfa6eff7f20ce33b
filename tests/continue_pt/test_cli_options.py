"""`continue-pt pretrain`'s options through the CLI: every mistake found before anything starts and reported
together, nothing left behind by a run that fails early, defaults in --help, YAML numbers, the warm-up warning,
fast argument errors, and the messages of convert / inspect / verify / export / kmeans fit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bundles import load_bundle
from bundles.kmeans import KMeansModel, load_kmeans, save_kmeans
from continue_pt.cli import cli
from continue_pt.data import validation_share
from continue_pt.demo import CHECKPOINT, KMEANS, WAV2VEC2_CHECKPOINT, write_demo_corpus
from continue_pt.options import PretrainOptions, option_default
from converters.convert import convert_checkpoint

REPO = Path(__file__).resolve().parents[2]


def run(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_options")
    bundle = convert_checkpoint(CHECKPOINT, root / "bundle", kmeans=KMEANS, kmeans_layer=1)  # K = 20
    km7 = root / "km7.safetensors"
    save_kmeans(KMeansModel(torch.randn(7, 64), layer=1), km7)
    teacher7 = convert_checkpoint(CHECKPOINT, root / "teacher7", kmeans=km7)  # its k-means has K = 7
    audio = write_demo_corpus(root / "audio", num_files=4, seconds=2.5)
    junk_audio = root / "junk_audio"
    junk_audio.mkdir()
    (junk_audio / "a.wav").write_bytes(b"RIFF not really")
    return root, bundle, teacher7, audio, junk_audio


@pytest.fixture(scope="module")
def short_run(setup):
    """A 2-step run from a YAML file (numbers as PyYAML reads them) with the new flags."""
    root, bundle, _teacher7, audio, _junk = setup
    config = root / "run.yaml"
    config.write_text("lr: 1e-4\nmax_steps: 2.0\nnum_workers: 0\nmax_batch_seconds: 6\n")  # '1e-4' is a str
    out = root / "run"
    result = run("pretrain", "--config", config, "--init-from", bundle, "--train-data", audio, "--output-dir", out,
                 "--log-every", 1, "--checkpoint-every", 1, "--min-seconds", 1, "--max-sample-size", 32000,
                 "--val-fraction", 0.5)
    assert result.exit_code == 0, result.output
    return out, result.output


def _pretrain(bundle: Path, audio: Path, out: Path, *extra) -> list[str]:
    return ["pretrain", "--init-from", bundle, "--train-data", audio, "--output-dir", out, "--max-steps", 2,
            "--warmup-steps", 1, "--num-workers", 0, *extra]


# ------------------------------------------------------------------------------------ 8.2: before anything starts


def test_precision_and_devices_mistakes_are_reported_together_with_the_rest(setup, tmp_path):
    _root, bundle, _t, audio, _j = setup
    result = run(*_pretrain(bundle, audio, tmp_path / "out", "--precision", "fp13", "--devices", 0,
                            "--lr", -1, "--kmeans-layer", 2))
    assert result.exit_code == 1 and "Traceback" not in result.output
    for needle in ["precision is 'fp13'; expected one of bf16-mixed", "devices is 0; expected a number of devices",
                   "lr must be > 0", "--kmeans-layer was given without --kmeans", "Nothing was started"]:
        assert needle in result.output, needle
    assert not (tmp_path / "out").exists()


def test_teacher_kmeans_of_another_k_and_a_layer_outside_the_teacher_are_found_before_the_start(setup, tmp_path):
    _root, bundle, teacher7, audio, _j = setup
    result = run(*_pretrain(bundle, audio, tmp_path / "out", "--teacher", teacher7))
    assert result.exit_code == 1
    assert f"the k-means of {teacher7} has 7 clusters but the label head of {bundle} has 20" in result.output
    assert "--reinit-label-head" in result.output
    # with --kmeans km.bin --kmeans-layer 99: the layer, named with the file as given; K (20) matches the head
    config = tmp_path / "hw.yaml"
    config.write_text("accelerator: gpu\ndevices: 64\n")  # what only Lightning can judge: no 64 GPUs here
    result = run(*_pretrain(bundle, audio, tmp_path / "out", "--teacher", teacher7, "--kmeans", KMEANS,
                            "--kmeans-layer", 99, "--config", config))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"the k-means {KMEANS} (--kmeans-layer 99) clusters layer 99, outside the teacher {teacher7}'s " \
           "layers 1..2" in result.output
    assert "Lightning cannot train with accelerator 'gpu', devices 64" in result.output  # reported together
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ 14.2: nothing half-made


def test_a_run_without_readable_audio_leaves_no_output_directory(setup, tmp_path):
    _root, bundle, _t, _audio, junk_audio = setup
    out = tmp_path / "new" / "run"
    result = run(*_pretrain(bundle, junk_audio, out, "--kmeans", KMEANS, "--kmeans-layer", 1))
    assert result.exit_code == 1 and "holds no usable audio" in result.output
    assert not (tmp_path / "new").exists()  # neither the run directory nor the parent it created


def test_a_failed_run_in_an_existing_directory_removes_only_what_it_wrote(setup, tmp_path):
    _root, bundle, _t, _audio, junk_audio = setup
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run(*_pretrain(bundle, junk_audio, out, "--kmeans", KMEANS, "--kmeans-layer", 1))
    assert result.exit_code == 1
    assert sorted(p.name for p in out.rglob("*")) == ["notes.txt"]  # targets/ (the converted k-means) is gone


# ------------------------------------------------------------------------------------ 14.5: --help and flags


def test_help_shows_every_default_read_from_the_options():
    text = " ".join(run("pretrain", "--help").output.split())
    expected = {"--max-steps": "10,000", "--warmup-steps": "1000", "--checkpoint-every": "1000", "--min-seconds": "2 s", "--max-sample-size": "250,000",
                "--val-fraction": "0.02, i.e. 2 %", "--lr": "5e-05", "--max-batch-seconds": "87.5",
                "--accumulate": "1", "--seed": "0", "--devices": "1", "--loss-norm": "fairseq"}
    for flag, shown in expected.items():
        assert re.search(re.escape(flag) + r" [^\[]*?(\[[^\]]*\][^\[]*?)?\[default: " + re.escape(shown) + r"\]",
                         text), (flag, shown)
        value = option_default(flag[2:].replace("-", "_"))  # the number shown is the dataclass's
        assert shown.startswith(f"{value:,}" if isinstance(value, int) and value >= 10_000 else f"{value:g}"
                                if isinstance(value, float) else str(value))
    for flag in ["--val-labels", "--log-every", "--checkpoint-every", "--min-seconds", "--max-sample-size",
                 "--val-fraction"]:
        assert flag in text
    # chosen per run (None in the dataclass): the help says how
    for flag, rule in {"--log-every": "auto: min(50, max(1, max-steps // 50))",
                       "--num-workers": "auto: the CPUs per device, at most 4"}.items():
        assert option_default(flag[2:].replace("-", "_")) is None
        assert re.search(re.escape(flag) + r" [^\[]*?\[default: " + re.escape(rule), text), flag


def test_new_flags_reach_the_run(short_run, setup):
    out, output = short_run
    _root, _bundle, _t, audio, _j = setup
    assert (out / "checkpoints" / "step-step=1.ckpt").exists()  # --checkpoint-every 1
    import csv

    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len([r for r in rows if r["train/loss"]]) == 2  # --log-every 1
    # --val-fraction 0.5 holds out some of the 4 files (2 %, the default, none): validation ran on them
    assert 0 < sum(validation_share(p.name) < 0.5 for p in audio.iterdir()) < 4
    assert not any(validation_share(p.name) < option_default("val_fraction") for p in audio.iterdir())
    assert len([r for r in rows if r["val/loss"]]) == 2


# ------------------------------------------------------------------------------------ 14.7: warm-up


def test_warmup_longer_than_the_run_warns_up_front_with_the_numbers_and_the_fix(short_run):
    _out, output = short_run
    line = "Warning: warmup_steps (1000) is larger than max_steps (2)"
    assert output.count(line) == 1, output
    assert "Pass --warmup-steps 1" in output
    assert output.index(line) < output.index("bundle:")


# ------------------------------------------------------------------------------------ 14.8: YAML numbers


def test_yaml_numbers_are_coerced_and_bad_values_and_keys_are_option_problems(short_run, setup, tmp_path):
    out, _output = short_run
    record = load_bundle(out / "bundle").config.provenance["training"][-1]
    assert record["peak_lr"] == 1e-4 and record["steps"] == 2  # 'lr: 1e-4' (a str to PyYAML), 'max_steps: 2.0'
    _root, bundle, _t, audio, _j = setup
    config = tmp_path / "bad.yaml"
    config.write_text("lr: fast\nmax_steps: 2.5\nwarmup-step: 10\nreinit_label_head: maybe\n")
    result = run("pretrain", "--config", config, "--init-from", bundle, "--train-data", audio,
                 "--output-dir", tmp_path / "o")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "lr needs a number, got 'fast'" in result.output
    assert "max_steps needs an integer, got 2.5" in result.output
    assert "reinit_label_head needs true or false, got 'maybe'" in result.output
    assert "unknown option 'warmup_step'; valid options (closest first): warmup_steps, " in result.output
    assert not (tmp_path / "o").exists()


def test_options_given_in_python_are_type_checked_too(tmp_path):
    options = PretrainOptions(train_data=str(tmp_path), output_dir=str(tmp_path / "o"), init_from=str(tmp_path),
                              lr="1e-4", max_steps=True)
    assert sorted(options.structural_problems()) == ["lr needs a number, got '1e-4'",
                                                     "max_steps needs an integer, got True"]


# ------------------------------------------------------------------------------------ 14.15: fast argument errors


def test_argument_errors_come_before_torch_is_imported(tmp_path):
    script = ("import sys\nfrom continue_pt.cli import main\nsys.argv = ['continue-pt', 'pretrain', '--max-steps', "
              "'0', '--precision', 'fp13', '--train-data', 'nowhere', '--output-dir', 'out', '--init-from', 'b']\n"
              "try:\n    main()\nexcept SystemExit as exc:\n    print('exit', exc.code)\n"
              "print('torch imported:', 'torch' in sys.modules, 'lightning imported:', 'lightning' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "exit 1" in done.stdout and "max_steps must be >= 1" in done.stderr
    assert "torch imported: False lightning imported: False" in done.stdout
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ 14.16: messages


def test_convert_of_a_training_checkpoint_points_to_export(short_run, tmp_path):
    out, _output = short_run
    ckpt = out / "checkpoints" / "last.ckpt"
    result = run("convert", ckpt, "-o", tmp_path / "b")
    assert result.exit_code == 1
    assert "is a training checkpoint of `continue-pt pretrain`, not a fairseq checkpoint" in result.output
    assert f"continue-pt export {ckpt} -o {tmp_path / 'b'}" in result.output
    assert not (tmp_path / "b").exists()


def test_inspect_describes_a_training_checkpoint(short_run, setup):
    out, _output = short_run
    _root, bundle, _t, audio, _j = setup
    result = run("inspect", out / "checkpoints" / "step-step=1.ckpt", "--json")
    assert result.exit_code == 0, result.output
    facts = json.loads(result.output)
    assert facts["what"] == "continue-pt training checkpoint" and facts["family"] == "hubert"
    assert facts["step"] == 1 and facts["num_updates"] == 1001
    assert Path(facts["teacher"]) == Path(bundle).resolve() and facts["data"] == str(audio)
    assert facts["peak_lr"] == 1e-4 and facts["kmeans_layer"] == 1


def test_verify_against_a_checkpoint_of_another_family_says_so(setup):
    _root, bundle, _t, _a, _j = setup
    result = run("verify", bundle, "--against", WAV2VEC2_CHECKPOINT)
    assert result.exit_code == 1
    assert "is a wav2vec2 pretrain model (2 layers, 64 wide) checkpoint, but" in result.output
    assert "holds a hubert pretrain model" in result.output and "mismatch:" not in result.output


def test_export_of_a_safetensors_file_does_not_repeat_torchs_advice(setup, tmp_path):
    _root, bundle, _t, _a, _j = setup
    for source in (bundle / "model.safetensors", CHECKPOINT):
        result = run("export", source, "-o", tmp_path / "b")
        assert result.exit_code == 1 and str(source) in result.output
        assert "weights_only" not in result.output and "trust" not in result.output
    assert "is a safetensors file" in run("export", bundle / "model.safetensors", "-o", tmp_path / "b").output
    assert "`continue-pt convert`" in run("export", CHECKPOINT, "-o", tmp_path / "b").output


def test_kmeans_fit_provenance_names_the_teacher_and_audio_as_given(setup, monkeypatch):
    root, _bundle, _t, _audio, _j = setup
    monkeypatch.chdir(root)
    result = run("kmeans", "fit", "--teacher", "teacher7", "--layer", 2, "--audio", "audio", "-k", 4,
                 "-o", "fitted.safetensors", "--device", "cpu", "--max-hours", 0.001)
    assert result.exit_code == 0, result.output
    meta = load_kmeans(root / "fitted.safetensors").metadata
    assert meta["teacher_bundle"] == "teacher7" and meta["audio"] == "audio"
    assert meta["teacher_num_updates"] == "1000"


# ------------------------------------------------------------------------------------ the pieces behind them


def test_torch_free_names_agree_with_the_modules_they_stand_for():
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from typing import get_args

    from continue_pt.hubert.loss import LOSS_MODES
    from continue_pt.options import LOSS_NORMS, PRECISIONS, TRAINABLE_FAMILIES
    from continue_pt.pretrain import MODULES

    assert tuple(MODULES) == TRAINABLE_FAMILIES and tuple(LOSS_MODES) == LOSS_NORMS
    assert set(PRECISIONS) <= set(get_args(_PRECISION_INPUT_STR)) | set(get_args(_PRECISION_INPUT_STR_ALIAS))


def test_a_trainer_refusal_becomes_an_option_problem(tmp_path):
    from continue_pt.options import PretrainOptionsError
    from continue_pt.trainer_config import built_trainer

    with pytest.raises(PretrainOptionsError, match="Lightning cannot train with accelerator 'cpu', devices '0,1'"):
        built_trainer(tmp_path, accelerator="cpu", devices="0,1", logger=False)


def test_a_run_that_fails_after_its_first_checkpoint_keeps_everything(tmp_path):
    from continue_pt.run_output import removed_on_early_failure

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), removed_on_early_failure(out):
        (out / "checkpoints").mkdir(parents=True)
        (out / "hparams.yaml").write_text("x")
        (out / "checkpoints" / "step-step=1.ckpt").write_bytes(b"x")
        raise KeyboardInterrupt
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "hparams.yaml", "step-step=1.ckpt"]
    with pytest.raises(RuntimeError), removed_on_early_failure(out):  # an existing run: only what is new goes
        (out / "targets").mkdir()
        (out / "targets" / "km.safetensors").write_bytes(b"x")
        raise RuntimeError
    assert not (out / "targets").exists() and (out / "checkpoints" / "step-step=1.ckpt").exists()
