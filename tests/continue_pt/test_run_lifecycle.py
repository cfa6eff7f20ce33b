"""The run's lifecycle: metrics across resumes, Ctrl-C / SIGTERM, short runs, resume notes and provenance,
quiet output (issue 14)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bundles import load_bundle
from bundles.kmeans import KMeansModel, save_kmeans
from continue_pt.cli import cli
from continue_pt.demo import write_demo_corpus
from continue_pt.interruption import RunInterrupted
from continue_pt.options import PretrainOptionsError
from continue_pt.pretrain import PretrainOptions, RunResult, run_pretraining
from continue_pt.progress import PhaseProgress
from continue_pt.options import auto_log_every
from tests.training_helpers import SignalAfterMicroBatch, StopAt, logged_rows

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    return write_demo_corpus(tmp_path_factory.mktemp("audio") / "a", num_files=6, seconds=2.0)


def _values(bundle_dir: Path, audio_dir: Path, out: Path, **overrides) -> dict:
    values = dict(train_data=str(audio_dir), output_dir=str(out), init_from=str(bundle_dir), max_steps=6,
                  accumulate=2, max_batch_seconds=4.0, min_seconds=1.0, num_workers=0, warmup_steps=2,
                  checkpoint_every=1000, progress_bar=False)
    values.update(overrides)
    return values


def _steps(metrics_csv: Path) -> list[int]:
    return [int(r["step"]) for r in logged_rows(metrics_csv)]


class _Notes(logging.Handler):
    """What the run says through Lightning's rank-zero logger (its own handler writes to the real stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


# ------------------------------------------------------------------------------------------------ item 1 + 4


@pytest.mark.slow
def test_resumes_keep_the_metrics_say_what_the_schedule_does_and_record_every_segment(bundle_dir, audio_dir,
                                                                                      tmp_path):
    other_audio = shutil.copytree(audio_dir, tmp_path / "more_audio")
    out = tmp_path / "run"
    # attempt 1: a 2-step run that ends (its schedule reaches lr 0) ...
    first = run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, out, max_steps=2, warmup_steps=1)))
    assert _steps(first.metrics_csv) == [0, 1]
    # ... attempt 2: extended to 4 steps, stopped after 3 ...
    notes = _Notes()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero.addHandler(notes)
    try:
        run_pretraining(PretrainOptions(**_values(bundle_dir, other_audio, out, init_from=None, max_steps=4,
                                                  resume=str(out / "checkpoints" / "last.ckpt"))),
                        callbacks=[StopAt(3)])
    finally:
        rank_zero.removeHandler(notes)
    said = "\n".join(notes.lines)
    assert "at optimizer step 2; training to step 4" in said
    assert "the checkpoint's schedule had it at 0; with --max-steps 4" in said  # lr 0 -> re-stretched, said so
    assert f"trained on {audio_dir}; from here on {other_audio}" in said
    # ... attempt 3: from the step-3 checkpoint to the end, back on the first data
    result = run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, out, init_from=None, max_steps=5,
                                                       resume=str(out / "checkpoints" / "last.ckpt"))))
    # one metrics.csv, every step of the three attempts, once (Lightning used to delete it at every start)
    assert _steps(result.metrics_csv) == [0, 1, 2, 3, 4]
    result = CliRunner().invoke(cli, ["plot", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["metrics"]["train/loss"]["points"] == 5
    # the provenance names every segment's data and steps
    training = load_bundle(out / "bundle").config.provenance["training"][-1]
    assert [(s["data"], s["from_step"], s["to_step"]) for s in training["segments"]] == [
        (str(audio_dir), 0, 2), (str(other_audio), 2, 3), (str(audio_dir), 3, 5)]
    assert training["steps"] == 5


def _metrics(path: Path, steps: range) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,step,train/loss\n" + "".join(f"0,{s},{10 - s}\n" for s in steps))


def test_the_log_keeps_the_steps_before_the_resumed_one_and_drops_the_ones_trained_again(tmp_path):
    from continue_pt.run_log import ResumableCSVLogger

    # the attempt logged steps 0..5 but its last checkpoint is at step 3: steps 3..5 are trained again
    _metrics(tmp_path / "run" / "metrics.csv", range(6))
    logger = ResumableCSVLogger(tmp_path / "run", resume_step=3)
    logger.log_metrics({"train/loss": 1.5, "train/lr": 0.1}, step=3)
    logger.save()
    assert [(r["step"], r["train/loss"], r.get("train/lr")) for r in logged_rows(tmp_path / "run" / "metrics.csv")] \
        == [("0", "10", ""), ("1", "9", ""), ("2", "8", ""), ("3", "1.5", "0.1")]
    # resumed into another output directory: the earlier steps come from the checkpoint's run
    other = ResumableCSVLogger(tmp_path / "branch", resume_step=2, earlier=tmp_path / "run" / "metrics.csv")
    other.log_metrics({"train/loss": 0.5}, step=2)
    other.save()
    assert [r["step"] for r in logged_rows(tmp_path / "branch" / "metrics.csv")] == ["0", "1", "2"]
    # a new run (not a resume) in the same directory starts its own metrics
    fresh = ResumableCSVLogger(tmp_path / "run")
    fresh.log_metrics({"train/loss": 7.0}, step=0)
    fresh.save()
    assert [r["train/loss"] for r in logged_rows(tmp_path / "run" / "metrics.csv")] == ["7.0"]


def test_resume_to_fewer_steps_than_done_is_refused(bundle_dir, audio_dir, tmp_path):
    out = tmp_path / "run"
    run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, out, max_steps=2, accumulate=1)))
    with pytest.raises(PretrainOptionsError, match="max_steps is 2 but the checkpoint is already at step 2"):
        PretrainOptions(**_values(bundle_dir, audio_dir, out, init_from=None, max_steps=2,
                                  resume=str(out / "checkpoints" / "last.ckpt"))).validate()


# ------------------------------------------------------------------------------------------------ item 2 + 6


def _start_cli_run(config: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "continue_pt.cli", "pretrain", "--config", str(config)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=config.parent)


def _wait_for_step(proc: subprocess.Popen, log: Path, step: int, max_steps: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{step}/{max_steps}" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no step {step} within {timeout} s:\n{log.read_text()[-3000:]}")


SIGNAL_RUN_STEPS = 6


@pytest.fixture(scope="module")
def uninterrupted(bundle_dir, audio_dir, tmp_path_factory) -> RunResult:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    return run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, out, max_steps=SIGNAL_RUN_STEPS,
                                                     log_every=1)))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_last_ckpt_at_a_step_boundary_and_the_resumed_run_equals_an_uninterrupted_one(
        bundle_dir, audio_dir, tmp_path, signum, uninterrupted):
    max_steps = SIGNAL_RUN_STEPS
    values = _values(bundle_dir, audio_dir, tmp_path / "run", max_steps=max_steps, progress_bar=True,
                     log_every=1)
    del values["num_workers"]  # the default: data-loader workers, which must not die on the signal first
    config = tmp_path / "run.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    log = tmp_path / "run.log"
    proc = _start_cli_run(config, log)
    _wait_for_step(proc, log, 2, max_steps)
    proc.send_signal(signum)
    code = proc.wait(timeout=180)
    output = log.read_text(errors="replace")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert code == 128 + signum, output[-3000:]
    assert f"{signal.Signals(signum).name} received: stopped after optimizer step" in output
    assert f"resume with: continue-pt pretrain --resume {last} --config {tmp_path / 'run' / 'resume.yaml'}" in output
    assert last.is_file() and not (tmp_path / "run" / "bundle").exists()
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= stopped_at < max_steps
    # the noise is gone and the bar counts optimizer steps out of --max-steps
    for noise in ("litlogger", "LeafSpec", "worker processes in total", "log files in this directory will be deleted",
                  "/-"):
        assert noise not in output, noise
    assert f"{stopped_at}/{max_steps}" in output
    # the printed command resumes it; the result equals a run that was never interrupted
    command = output.split("resume with: ")[1].splitlines()[0].split()
    assert command[:2] == ["continue-pt", "pretrain"]
    result = CliRunner().invoke(cli, command[1:])
    assert result.exit_code == 0, result.output
    full = uninterrupted
    a, b = load_bundle(full.bundle_dir).state_dict(), load_bundle(tmp_path / "run" / "bundle").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["train/loss"] for r in logged_rows(tmp_path / "run" / "metrics.csv")]
    assert losses == [r["train/loss"] for r in logged_rows(full.metrics_csv)]


def test_a_signal_mid_accumulation_waits_for_the_optimizer_step(bundle_dir, audio_dir, tmp_path, uninterrupted):
    out = tmp_path / "run"
    signalled = SignalAfterMicroBatch(signal.SIGTERM, 2)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    with pytest.raises(RunInterrupted) as info:
        run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, out, max_steps=SIGNAL_RUN_STEPS,
                                                  log_every=1)), callbacks=[signalled])
    assert signalled.sent and info.value.step == 3 and info.value.exit_code == 128 + signal.SIGTERM
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGINT) is before  # restored
    resumed = run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, out, init_from=None, log_every=1,
                                                        max_steps=SIGNAL_RUN_STEPS,
                                                        resume=str(out / "checkpoints" / "last.ckpt"))))
    a, b = load_bundle(uninterrupted.bundle_dir).state_dict(), load_bundle(resumed.bundle_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ item 3


def test_log_interval_default_logs_every_step_of_a_short_run():
    assert [auto_log_every(n) for n in (1, 30, 99, 100, 300, 2500, 10_000, 400_000)] == [1, 1, 1, 2, 6, 50, 50, 50]
    assert PretrainOptions(train_data="", output_dir="", max_steps=30).resolved_log_every() == 1
    assert PretrainOptions(train_data="", output_dir="", max_steps=30, log_every=7).resolved_log_every() == 7


def test_a_short_cli_run_logs_every_step_and_plots(bundle_dir, audio_dir, tmp_path):
    config = tmp_path / "run.yaml"
    values = _values(bundle_dir, audio_dir, tmp_path / "run", max_steps=3, accumulate=1)
    config.write_text("".join(f"{k}: {v}\n" for k, v in values.items()))
    result = CliRunner().invoke(cli, ["pretrain", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert _steps(tmp_path / "run" / "metrics.csv") == [0, 1, 2]
    assert "curves: none" not in result.output and (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_a_long_interval_still_logs_the_first_and_the_last_step(bundle_dir, audio_dir, tmp_path):
    result = run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, tmp_path / "run", max_steps=5,
                                                       accumulate=1, log_every=3)))
    assert _steps(result.metrics_csv) == [0, 2, 4]  # first, every 3rd (Lightning counts from 1), last


def test_plot_explains_a_run_that_logged_nothing(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 1 and "logged no step" in result.output and "--log-every 1" in result.output
    (tmp_path / "run" / "metrics.csv").write_text("epoch,step\n")
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "run")])
    assert result.exit_code == 1 and "holds no logged step yet" in result.output


# ------------------------------------------------------------------------------------------------ item 5


def test_kmeans_check_tests_the_bundles_own_kmeans_not_the_teachers(bundle_dir, audio_dir, tmp_path):
    km = tmp_path / "km7.safetensors"
    save_kmeans(KMeansModel(torch.randn(7, 64, generator=torch.Generator().manual_seed(0)), layer=1), km)
    run = run_pretraining(PretrainOptions(**_values(bundle_dir, audio_dir, tmp_path / "run", kmeans=str(km),
                                                    max_steps=1, accumulate=1, reinit_label_head=True)))
    assert load_bundle(run.bundle_dir).get_kmeans().num_clusters == 7  # teacher's: 20
    result = CliRunner().invoke(cli, ["kmeans", "check", "--bundle", str(run.bundle_dir), "--teacher", str(bundle_dir),
                                      "--audio", str(audio_dir), "--max-files", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_clusters"] == 7 and report["label_head_rows"] == 7 and not report.get("k_differs")


# ------------------------------------------------------------------------------------------------ item 6


def test_num_workers_default_follows_the_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    options = PretrainOptions(train_data="", output_dir="")
    assert options.num_workers is None and options.resolved_num_workers() == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert options.resolved_num_workers() == 4
    assert PretrainOptions(train_data="", output_dir="", devices=4).resolved_num_workers() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert PretrainOptions(train_data="", output_dir="", devices=4).resolved_num_workers() == 2
    assert PretrainOptions(train_data="", output_dir="", num_workers=0).resolved_num_workers() == 0


def test_only_rank_zero_prints_the_summary(monkeypatch, tmp_path, bundle_dir, audio_dir):
    import continue_pt.pretrain as pretrain

    def other_rank(options):
        return RunResult(tmp_path, tmp_path / "bundle", tmp_path / "checkpoints", tmp_path / "metrics.csv",
                         is_global_zero=False)

    monkeypatch.setattr(pretrain, "run_pretraining", other_rank)
    result = CliRunner().invoke(cli, ["pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir),
                                      "--output-dir", str(tmp_path / "o"), "--devices", "2"])
    assert result.exit_code == 0, result.output
    assert result.output == ""


def test_kmeans_fit_progress_is_plain_lines_off_a_terminal():
    lines: list[tuple[str, bool]] = []
    progress = PhaseProgress(lambda line, nl: lines.append((line, nl)), is_terminal=False)
    for i in range(101):
        progress("pass 1", i * 36.0, 3600.0)
    progress("pass 2", 0.0, 3600.0)
    progress.finish()
    assert all(nl and "\r" not in line for line, nl in lines)
    assert len(lines) == 12  # one per tenth of pass 1 (0 % .. 100 %) and the start of pass 2
    redrawn: list[tuple[str, bool]] = []
    terminal = PhaseProgress(lambda line, nl: redrawn.append((line, nl)), is_terminal=True)
    terminal("pass 1", 1800.0, 3600.0)
    terminal.finish()
    assert redrawn == [("\rpass 1: 0.50 of 1.00 h", False), ("", True)]


def test_kmeans_fit_cli_writes_no_carriage_returns_into_a_log(bundle_dir, audio_dir, tmp_path):
    result = CliRunner().invoke(cli, ["kmeans", "fit", "--teacher", str(bundle_dir), "--layer", "1", "--audio",
                                      str(audio_dir), "-k", "4", "-o", str(tmp_path / "km.safetensors")])
    assert result.exit_code == 0, result.output
    assert "\r" not in result.stderr and " of " in result.stderr
