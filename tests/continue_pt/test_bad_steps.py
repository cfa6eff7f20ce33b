"""A bad step never ends a run: a step with a non-finite loss or gradient is skipped (no weight or optimiser-state
update), counted and logged; too many in a row stop the run with a resumable ``last.ckpt`` (CPU, tiny demo bundle)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import soundfile as sf
import torch

from bundles import load_bundle
from continue_pt.demo import demo_audio
from continue_pt.module_base import SkippedStepWarning
from continue_pt.options import PretrainOptionsError
from continue_pt.pretrain import PretrainOptions, run_pretraining
from continue_pt.step_guard import BadStepGuard, TrainingStopped, divide_, fused_grad_norm, stop_message
from tests.training_helpers import StopAt, logged_rows

SECONDS = 2.0


def _options(bundle_dir: Path, audio_dir: Path, out: Path, **overrides) -> PretrainOptions:
    values = dict(train_data=str(audio_dir), output_dir=str(out), init_from=str(bundle_dir), max_steps=6,
                  accumulate=2, max_batch_seconds=2 * SECONDS, min_seconds=1.0, num_workers=0, warmup_steps=2,
                  checkpoint_every=3, log_every=1, progress_bar=False)
    values.update(overrides)
    return PretrainOptions(**values)


class PoisonSteps(pl.Callback):
    """Puts NaN into the audio of one micro-batch (the first of the step, ``micro``) of each step in ``steps``: the
    step's other micro-batches stay finite, the accumulated gradient does not."""

    def __init__(self, steps, micro: int = 0):
        self.steps, self.micro = set(steps), micro

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step in self.steps and batch_idx % trainer.accumulate_grad_batches == self.micro:
            batch["waveforms"][0, :400] = float("nan")


class Snapshots(pl.Callback):
    """The student's weights after each optimizer step (keyed by the global step after it)."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.after[trainer.global_step] = self._weights(pl_module)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.after[trainer.global_step] = self._weights(pl_module)

    @staticmethod
    def _weights(module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in module.student.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _adam_steps(checkpoint: Path) -> set[int]:
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["optimizer_states"][0]["state"]
    return {int(s["step"]) for s in state.values()}


def test_a_non_finite_micro_batch_skips_its_step_and_training_goes_on(bundle_dir, audio_dir, tmp_path):
    snaps = Snapshots()
    with pytest.warns(SkippedStepWarning, match="step 1: non-finite loss; optimizer step skipped"):
        run = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "run", max_steps=4),
                              callbacks=[PoisonSteps({1}, micro=1), snaps])
    rows = logged_rows(run.metrics_csv)
    assert [int(float(r["step"])) for r in rows] == list(range(4))
    skipped = [int(float(r["train/skipped_steps"])) for r in rows]
    assert skipped == [0, 1, 1, 1]
    assert math.isnan(float(rows[1]["train/loss"]))
    assert all(math.isfinite(float(r["train/loss"])) for i, r in enumerate(rows) if i != 1)
    # step 1 (global_step 1 -> 2) changed no weight; every other step did
    assert _same(snaps.after[1], snaps.after[2])
    for before in (0, 2, 3):
        assert not _same(snaps.after[before], snaps.after[before + 1]), before
    # nor the optimiser state: AdamW counted 3 updates for every parameter (4 steps, one skipped)
    assert _adam_steps(run.checkpoint_dir / "last.ckpt") == {3}
    # the skipped step counts towards max_steps; the exported bundle is finite
    assert load_bundle(run.bundle_dir).num_updates == load_bundle(bundle_dir).num_updates + 4
    assert all(torch.isfinite(t).all() for t in load_bundle(run.bundle_dir).state_dict().values())


def test_a_resume_across_a_skipped_step_is_exact(bundle_dir, audio_dir, tmp_path):
    short = dict(max_steps=4, checkpoint_every=2)
    full = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "full", **short), callbacks=[PoisonSteps({1})])
    part = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part", **short),
                           callbacks=[PoisonSteps({1}), StopAt(2)])
    resumed = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part", init_from=None, **short,
                                       resume=str(part.checkpoint_dir / "step-step=2.ckpt")),
                              callbacks=[PoisonSteps({1})])
    full_rows, resumed_rows = logged_rows(full.metrics_csv), logged_rows(resumed.metrics_csv)
    assert math.isnan(float(full_rows[1]["train/loss"]))
    assert [r["train/loss"] for r in resumed_rows[-2:]] == [r["train/loss"] for r in full_rows[2:]]
    assert [r["train/skipped_steps"] for r in resumed_rows[-2:]] == ["1.0"] * 2  # the count survives the resume
    a, b = load_bundle(full.bundle_dir).state_dict(), load_bundle(resumed.bundle_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_consecutive_bad_steps_stop_the_run_with_a_resumable_last_checkpoint(bundle_dir, audio_dir, tmp_path):
    snaps = Snapshots()
    out = tmp_path / "run"
    with pytest.warns(SkippedStepWarning), pytest.raises(TrainingStopped) as stopped:
        run_pretraining(_options(bundle_dir, audio_dir, out, max_bad_steps=2),
                        callbacks=[PoisonSteps(range(2, 6)), snaps])
    message = str(stopped.value)
    last = out / "checkpoints" / "last.ckpt"
    assert str(last) in message
    assert "training stopped at step 3: 2 consecutive steps were skipped" in message
    assert "the weights are those after step 1" in message
    assert "bf16" not in message  # 32-bit run: no fp16 advice
    assert f"continue-pt pretrain --resume {last} --config {out / 'resume.yaml'}" in message  # the exact command
    assert (out / "resume.yaml").is_file()
    assert not (out / "bundle").exists()
    # last.ckpt is the state after step 3 (global_step 4) holding the weights of step 1, the last good one
    checkpoint = torch.load(last, weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 4
    assert _adam_steps(last) == {2}
    assert max(snaps.after) == 4 and _same(snaps.after[2], snaps.after[4])
    student = {k[len("student."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
    assert _same(snaps.after[2], student)
    # ... and it resumes: the run finishes and exports a bundle
    resumed = run_pretraining(_options(bundle_dir, audio_dir, out, init_from=None, resume=str(last), max_steps=6))
    rows = logged_rows(resumed.metrics_csv)[-2:]  # steps 4 and 5
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert [r["train/skipped_steps"] for r in rows] == ["2.0", "2.0"]
    assert load_bundle(resumed.bundle_dir).num_updates == load_bundle(bundle_dir).num_updates + 6


def test_max_bad_steps_below_one_is_refused(bundle_dir, audio_dir, tmp_path):
    with pytest.raises(PretrainOptionsError, match="max_bad_steps must be >= 1, got 0"):
        _options(bundle_dir, audio_dir, tmp_path / "run", max_bad_steps=0).validate()


# ------------------------------------------------------------------------------------------------ the pieces


def test_guard_counts_and_stops():
    guard = BadStepGuard(max_bad_steps=3)
    assert not guard.judge(0, True, True, None).skip
    assert guard.judge(1, False, False, None).skip
    assert guard.judge(2, True, False, None).reason == "non-finite gradient"
    assert not guard.judge(3, True, True, None).skip  # a good step resets the run of bad ones
    verdicts = [guard.judge(s, False, True, None) for s in (4, 5, 6)]
    assert [v.stop for v in verdicts] == [False, False, True]
    assert (guard.skipped_steps, guard.consecutive_bad, guard.last_good_step) == (5, 3, 3)
    restored = BadStepGuard()
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()


def test_fp16_overflows_count_only_once_the_loss_scale_is_exhausted():
    guard = BadStepGuard(max_bad_steps=1)
    for step, scale in enumerate([65536.0, 32768.0, 2.0 ** -10]):  # the GradScaler finding its scale
        verdict = guard.judge(step, True, False, scale)
        assert verdict.skip and not verdict.bad and not verdict.stop
    assert guard.skipped_steps == 3 and guard.consecutive_bad == 0
    verdict = guard.judge(3, True, False, 2.0 ** -14)  # below fairseq's min_loss_scale: the loss is exploding
    assert verdict.stop and "fp16 gradient overflow" in verdict.reason
    assert "bf16-mixed" in stop_message(3, guard, verdict.reason, "16-mixed")
    assert "bf16" not in stop_message(3, guard, verdict.reason, "32-true")


def test_fused_norm_and_division_equal_the_per_tensor_ones():
    torch.manual_seed(0)
    grads = [torch.randn(7, 5), torch.randn(11), torch.randn(3, 2, 2)]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    torch.testing.assert_close(fused_grad_norm(grads), expected)
    divided = [g / 3.0 for g in grads]
    divide_(grads, 3.0)
    assert all(torch.equal(a, b) for a, b in zip(grads, divided))
    assert fused_grad_norm([]) is None
    grads[1][4] = float("inf")
    assert not torch.isfinite(fused_grad_norm(grads))


# ------------------------------------------------------------------------------------------------ DDP on CPU

_DDP_SCRIPT = '''
import sys
import lightning.pytorch as pl
import torch

sys.path.insert(0, sys.argv[3])
from tests.continue_pt.test_pretrain import _ListData, _ddp_batches
from tests.training_helpers import no_dropout
from continue_pt.hubert.module import HubertContinuedPretraining
from continue_pt.module_options import ModuleOptions


class Poison(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 0 and trainer.global_rank == 0:  # rank 0 only: rank 1's loss stays finite
            batch["waveforms"][0, :400] = float("nan")


bundle_dir, out = sys.argv[1], sys.argv[2]
pl.seed_everything(0, verbose=False)
module = HubertContinuedPretraining(ModuleOptions(bundle=bundle_dir, warmup_steps=0))
no_dropout(module)
_, per_rank, _ = _ddp_batches(bundle_dir)
data = _ListData([[dict(b, waveforms=b["waveforms"].clone()) for b in rank * 2] for rank in per_rank])  # 2 steps
start = {n: p.detach().clone() for n, p in module.student.named_parameters()}
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False, callbacks=[Poison()])
trainer.fit(module, datamodule=data)
steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
torch.save({"weights": {n: p.detach().clone() for n, p in module.student.named_parameters()}, "start": start,
            "skipped": module.bad_steps.skipped_steps, "adam_steps": sorted(steps)}, f"{out}.{trainer.global_rank}")
'''


@pytest.mark.slow
def test_two_process_ddp_skips_the_same_step_on_every_rank(bundle_dir, tmp_path):
    script = tmp_path / "ddp_bad_step.py"
    script.write_text(_DDP_SCRIPT)
    root = str(Path(__file__).resolve().parents[2])
    out = tmp_path / "result"
    proc = subprocess.run([sys.executable, str(script), str(bundle_dir), str(out), root], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(f"{out}.{rank}", weights_only=True) for rank in (0, 1)]
    for result in ranks:
        assert result["skipped"] == 1
        assert result["adam_steps"] == [1]  # one update: the second step; the first was skipped
        assert not _same(result["start"], result["weights"])
    assert _same(ranks[0]["weights"], ranks[1]["weights"])


def test_the_cli_flag_reaches_the_options(bundle_dir, audio_dir, tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    result = CliRunner().invoke(cli, ["pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir),
                                      "--output-dir", str(tmp_path / "run"), "--max-bad-steps", "0"])
    assert result.exit_code == 1
    assert "Error:" in result.output and "max_bad_steps must be >= 1, got 0" in result.output
    assert not (tmp_path / "run").exists()


def test_wav2vec2_skips_a_non_finite_step_too(tmp_path, w2v_bundle_dir):
    bundle = w2v_bundle_dir
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(8):
        sf.write(audio / f"utt{i}.wav", demo_audio(SECONDS, seed=i)[0].numpy(), 16000)
    snaps = Snapshots()
    with pytest.warns(SkippedStepWarning, match="step 2: non-finite"):
        run = run_pretraining(_options(bundle, audio, tmp_path / "run", max_steps=4, lr=5e-4),
                              callbacks=[PoisonSteps({2}), snaps])
    rows = logged_rows(run.metrics_csv)
    assert [int(float(r["train/skipped_steps"])) for r in rows] == [0, 0, 1, 1]
    assert _same(snaps.after[2], snaps.after[3]) and not _same(snaps.after[3], snaps.after[4])
    assert _adam_steps(run.checkpoint_dir / "last.ckpt") == {3}
    assert all(torch.isfinite(t).all() for t in load_bundle(run.bundle_dir).state_dict().values())


def test_adamw_is_fused_only_with_every_parameter_on_cuda_and_no_grad_scaler():
    from types import SimpleNamespace

    from continue_pt.module_base import ContinuedPretrainingBase

    def fused(devices, scaler=None):
        params = [SimpleNamespace(is_cuda=d == "cuda") for d in devices]
        module = SimpleNamespace(_trainer=SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler)))
        return ContinuedPretrainingBase._fused_adamw(module, params)

    assert fused(["cuda", "cuda"]) == {"fused": True}  # bf16-mixed / 32-bit on GPU
    assert fused(["cuda", "cuda"], scaler=object()) == {}  # 16-mixed: Lightning unscales and clips itself
    assert fused(["cuda", "cpu"]) == {} and fused(["cpu"]) == {}  # CPU: torch's default, results unchanged


def test_fp16_grad_scaler_overflows_are_skipped_and_counted_without_stopping_the_run(bundle_dir):
    from lightning.pytorch.plugins.precision import MixedPrecision

    from continue_pt.hubert.module import HubertContinuedPretraining
    from continue_pt.module_options import ModuleOptions
    from tests.continue_pt.test_pretrain import _ddp_batches, _ListData

    _, _, whole = _ddp_batches(bundle_dir)
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir), warmup_steps=0))
    module.bad_steps.max_bad_steps = 1  # an overflow while the scaler looks for its scale must not count
    # fp16 autocast on CPU through Lightning's own GradScaler path, starting at a scale far too high
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, backoff_factor=2.0 ** -10)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, gradient_clip_val=10.0,
                         plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    with pytest.warns(SkippedStepWarning, match="fp16 gradient overflow at loss scale"):
        trainer.fit(module, datamodule=_ListData([[whole] * 5]))
    skipped = module.bad_steps.skipped_steps
    assert 1 <= skipped < 5 and module.stop_reason is None and trainer.global_step == 5
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {5 - skipped}
    assert scaler.get_scale() < 2.0 ** 40
    assert all(torch.isfinite(p).all() for p in module.student.parameters())
