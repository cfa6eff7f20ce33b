"""The CLI's error boundary: every command, given bad input, ends in a message and exit status 1 or 2, never a
traceback, and leaves no partial output (neither the path it was asked to write nor a stray temporary file)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from continue_pt.cli import cli
from continue_pt.demo import CHECKPOINT, KMEANS, WAV2VEC2_CHECKPOINT, write_demo_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Good inputs to combine with one bad one: a HuBERT bundle (with k-means), audio, junk files."""
    from converters.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("bad_input_inputs")
    bundle = convert_checkpoint(CHECKPOINT, root / "bundle", kmeans=KMEANS, kmeans_layer=1)
    audio = write_demo_corpus(root / "audio", num_files=3, seconds=2.5)
    junk = root / "junk.bin"
    junk.write_bytes(random.Random(0).randbytes(300))  # junk: what torch, pickle and joblib readers choke on
    junk_audio = root / "junk_audio"
    junk_audio.mkdir()
    (junk_audio / "a.wav").write_bytes(b"RIFF not really")
    (junk_audio / "b.flac").write_bytes(b"fLaC not really")
    text = root / "notes.txt"
    text.write_text("hello\n")
    yaml_list = root / "list.yaml"
    yaml_list.write_text("- 1\n- 2\n")
    yaml_broken = root / "broken.yaml"
    yaml_broken.write_text("lr: [1e-4\n")
    yaml_bad_values = root / "values.yaml"
    yaml_bad_values.write_text("lr: fast\nmax_steps: many\nlrr: 1\n")
    empty_dir = root / "empty"
    empty_dir.mkdir()
    return {"bundle": bundle, "audio": audio, "junk": junk, "junk_audio": junk_audio, "text": text,
            "yaml_list": yaml_list, "yaml_broken": yaml_broken, "yaml_bad_values": yaml_bad_values,
            "empty": empty_dir, "ckpt": CHECKPOINT, "w2v": WAV2VEC2_CHECKPOINT, "km": KMEANS}


P = "pretrain --init-from {bundle} --train-data {audio} --output-dir {out} --max-steps 2 --num-workers 0"
# (command line, a piece of the message, whether {out} is a path the command was asked to write)
CASES = [
    # convert
    ("convert {tmp}/missing.pt -o {out}", "no such file"),
    ("convert {junk} -o {out}", "junk.bin"),
    ("convert {text} -o {out}", "notes.txt"),
    ("convert {empty} -o {out}", "empty"),
    ("convert {ckpt} -o {out} --kmeans {km}", "the layer it clusters is not known"),
    ("convert {ckpt} -o {out} --kmeans {junk} --kmeans-layer 1", "junk.bin"),
    ("convert {ckpt} -o {out} --kmeans {km} --kmeans-layer 0", "--kmeans-layer"),
    ("convert {ckpt}", "Missing option '-o'"),
    ("convert {ckpt} -o {out} --bogus", "No such option"),
    # inspect
    ("inspect {tmp}/nowhere", "no such file or directory"),
    ("inspect {junk}", "junk.bin"),
    ("inspect {text}", "notes.txt"),
    ("inspect {empty}", "empty"),
    ("inspect", "Missing argument"),
    # verify
    ("verify {tmp}/nowhere --against {ckpt}", "no such bundle directory"),
    ("verify {bundle} --against {junk}", "junk.bin"),
    ("verify {bundle} --against {tmp}/missing.pt", "missing.pt"),
    ("verify {bundle}", "Missing option '--against'"),
    # catalogue
    ("catalogue --bogus", "No such option"),
    ("catalogue extra", "unexpected extra argument"),
    # pretrain: structure
    (P + " --precision fp13", "precision is 'fp13'"),
    (P + " --devices 0", "devices is 0"),
    (P + " --devices two", "devices is 'two'"),
    (P + " --max-steps 0", "max_steps must be >= 1"),
    (P + " --lr -1", "lr must be > 0"),
    (P + " --val-fraction 1.5", "val_fraction must be in [0, 1)"),
    (P + " --resume {tmp}/last.ckpt", "exactly one of init_from"),
    (P + " --kmeans {km}", "needs --kmeans-layer"),
    (P + " --kmeans-layer 3", "--kmeans-layer was given without --kmeans"),
    (P + " --labels {text}", "labels (a .km file) and label_dict"),
    (P + " --head-only-steps 5", "add reinit_label_head"),
    (P + " --val-labels {text}", "val_labels (a .km file for val_data) goes with labels"),
    (P + " --config {tmp}/missing.yaml", "not a readable YAML file"),
    (P + " --config {yaml_broken}", "not a readable YAML file"),
    (P + " --config {yaml_list}", "does not hold a mapping"),
    (P + " --config {yaml_bad_values}", "lr needs a number, got 'fast'"),
    ("pretrain --output-dir {out}", "--train-data is required"),
    (P + " --max-steps ten", "Invalid value for '--max-steps'"),
    # pretrain: what needs the bundles read
    (P + " --kmeans {km} --kmeans-layer 99", "clusters layer 99, outside the teacher"),
    (P + " --kmeans {junk} --kmeans-layer 1", "junk.bin"),
    (P + " --teacher {empty}", "empty"),
    ("pretrain --init-from {empty} --train-data {audio} --output-dir {out}", "empty"),
    (P + " --diversity-weight 0.1", "diversity_weight is a wav2vec 2.0 option"),
    # export
    ("export {junk} -o {out}", "junk.bin"),
    ("export {tmp}/missing.ckpt -o {out}", "no such checkpoint file"),
    ("export {ckpt} -o {out}", "tiny_hubert.pt"),
    ("export {bundle}/model.safetensors -o {out}", "model.safetensors"),
    # plot
    ("plot {empty}", "holds no metrics.csv"),
    ("plot {tmp}/nowhere", "nowhere"),
    # kmeans fit / check
    ("kmeans fit --teacher {tmp}/nowhere --layer 1 --audio {audio} -k 4 -o {out}", "no such bundle directory"),
    ("kmeans fit --teacher {bundle} --layer 9 --audio {audio} -k 4 -o {out}", "layer 9 is outside"),
    ("kmeans fit --teacher {bundle} --layer 1 --audio {junk_audio} -k 4 -o {out} --device cpu", "junk_audio"),
    ("kmeans fit --teacher {bundle} --layer 1 --audio {tmp}/none -k 4 -o {out} --device cpu", "none"),
    ("kmeans fit --teacher {bundle} --layer 1 --audio {audio} -k 1 -o {out}", "Invalid value for '-k'"),
    ("kmeans check --bundle {tmp}/nowhere --audio {audio}", "no such bundle directory"),
    ("kmeans check --bundle {bundle} --kmeans {km} --audio {audio}", "--kmeans-layer"),
    ("kmeans check --bundle {bundle} --kmeans {junk} --kmeans-layer 1 --audio {audio}", "junk.bin"),
    ("kmeans check --bundle {bundle} --audio {junk_audio} --seed 1", "junk_audio"),
    # labels dump
    ("labels dump --teacher {bundle} --kmeans {km} --audio {audio} -o {out}", "--layer"),
    ("labels dump --teacher {bundle} --kmeans {junk} --layer 1 --audio {audio} -o {out}", "junk.bin"),
    ("labels dump --teacher {bundle} --kmeans {km} --layer 5 --audio {audio} -o {out} --device cpu", "layer"),
    ("labels dump --teacher {bundle} --kmeans {km} --layer 1 --audio {junk_audio} -o {out} --device cpu",
     "junk_audio"),
    # demo
    ("demo --output-dir {text}", "notes.txt"),
    ("demo --bogus", "No such option"),
]


def _invoke(line: str, inputs: dict[str, Path], tmp: Path) -> tuple[list[str], Path]:
    out = tmp / "OUT"
    args = [part.format(**inputs, tmp=tmp, out=out) for part in line.split()]
    return args, out


def _leftovers(*dirs: Path) -> list[Path]:
    """Temporary files (bundles' `.NAME.*.partial`, k-means `.NAME.*.tmp`, checkpoints' `.last.ckpt.tmp`)."""
    return [p for d in dirs if d.is_dir() for p in d.rglob("*")
            if p.name.endswith((".partial", ".tmp")) or ".old-" in p.name]


def test_there_are_at_least_40_bad_invocations_over_every_command():
    commands = {line.split()[0] if line.split()[0] not in ("kmeans", "labels") else " ".join(line.split()[:2])
                for line, _ in CASES}
    assert len(CASES) >= 40
    assert commands == {"convert", "inspect", "verify", "catalogue", "pretrain", "export", "plot", "kmeans fit",
                        "kmeans check", "labels dump", "demo"}


@pytest.mark.parametrize("line,needle", CASES, ids=[f"{i:02d}-{c[0].split()[0]}" for i, c in enumerate(CASES)])
def test_bad_invocation_ends_in_a_message_not_a_traceback(inputs, tmp_path, line, needle, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args, out = _invoke(line, inputs, tmp_path)
    before = sorted(p.name for p in inputs["bundle"].parent.iterdir())
    result = CliRunner().invoke(cli, args, catch_exceptions=True)
    assert isinstance(result.exception, SystemExit), (result.output, result.exception)
    assert result.exit_code in (1, 2), result.output
    assert "Error:" in result.output and needle in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists(), f"{out} was left behind"
    assert not _leftovers(tmp_path, inputs["bundle"].parent)
    assert sorted(p.name for p in inputs["bundle"].parent.iterdir()) == before  # nothing written beside the inputs


@pytest.mark.parametrize("args,needle", [
    (["pretrain", "--train-data", "{audio}", "--output-dir", "{out}", "--init-from", "{bundle}", "--devices", "0",
      "--precision", "fp13", "--max-steps", "0"], "devices is 0"),
    (["convert", "{tmp}/missing.pt", "-o", "{out}"], "no such file"),
    (["kmeans", "fit", "--teacher", "{bundle}", "--layer", "1", "--audio", "{junk_audio}", "-k", "4", "-o", "{out}",
      "--device", "cpu"], "junk_audio"),
])
@pytest.mark.slow
def test_bad_invocations_through_a_real_process(inputs, tmp_path, args, needle):
    out = tmp_path / "OUT"
    argv = [a.format(**inputs, tmp=tmp_path, out=out) for a in args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "continue_pt.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Error:" in done.stderr and needle in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert not out.exists() and not _leftovers(tmp_path)
