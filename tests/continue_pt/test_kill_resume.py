"""Resume after ``kill -9`` equals an uninterrupted run (through the CLI, in real processes).

A cluster can kill a job without warning. Whatever moment the kill lands, the newest ``last.ckpt`` on disk must be
whole (checkpoints are written to a temporary file and renamed) and ``--resume`` from it must end with the same
bundle as a run that was never interrupted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch

from bundles import load_bundle
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER, demo_audio

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    from converters.convert import convert_checkpoint

    root = tmp_path_factory.mktemp("kill9")
    bundle = root / "bundle"
    convert_checkpoint(CHECKPOINT, bundle, kmeans=KMEANS, kmeans_layer=KMEANS_LAYER)
    audio = root / "audio"
    audio.mkdir()
    for i in range(8):
        sf.write(audio / f"utt{i}.wav", demo_audio(2.0, seed=i)[0].numpy(), 16000)
    config = root / "run.yaml"
    config.write_text("max_steps: 8\naccumulate: 2\nmax_batch_seconds: 4.0\nmin_seconds: 1.0\nnum_workers: 0\n"
                      "warmup_steps: 2\ncheckpoint_every: 1\nlog_every: 1\nprogress_bar: false\n")
    return bundle, audio, config


def _command(config: Path, audio: Path, out: Path, start: list[str]) -> list[str]:
    return [sys.executable, "-m", "continue_pt.cli", "pretrain", "--config", str(config), "--train-data", str(audio),
            "--output-dir", str(out), *start]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_resume_after_kill_9_equals_an_uninterrupted_run(setup, tmp_path):
    bundle, audio, config = setup
    full = subprocess.run(_command(config, audio, tmp_path / "full", ["--init-from", str(bundle)]), env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    victim = subprocess.Popen(_command(config, audio, out, ["--init-from", str(bundle)]), env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = out / "checkpoints"
    deadline = time.monotonic() + 240
    # kill while training is under way: after the third step's checkpoint, before the run ends
    while not (checkpoints / "step-step=3.ckpt").exists():
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    assert not (out / "bundle").exists()
    last = checkpoints / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in checkpoints.iterdir())
    step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 1 <= step < MAX_STEPS

    resumed = subprocess.run(_command(config, audio, out, ["--resume", str(last)]), env=_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_bundle(tmp_path / "full" / "bundle"), load_bundle(out / "bundle")
    assert a.num_updates == b.num_updates
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"resumed from step {step}: {len(different)} tensors differ, e.g. {different[:3]}"
