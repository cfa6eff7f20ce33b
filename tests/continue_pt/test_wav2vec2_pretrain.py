"""Continued wav2vec 2.0 pre-training (Wav2Vec2ContinuedPretraining via run_pretraining) on the tiny shipped
wav2vec 2.0 checkpoint (fairseq-written, 50k updates) and generated audio, on CPU."""

from __future__ import annotations

import csv
import dataclasses
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from bundles import load_bundle
from continue_pt.demo import demo_audio
from continue_pt.export import export_checkpoint
from continue_pt.masking import MaskingOptions, time_mask
from continue_pt.module_options import ModuleOptions
from continue_pt.wav2vec2.options import Wav2Vec2Options
from continue_pt.options import PretrainOptionsError
from continue_pt.pretrain import PretrainOptions, build_module, run_pretraining
from continue_pt.wav2vec2.module import CodebookCollapseWarning, Wav2Vec2ContinuedPretraining, codebook_usage
from continue_pt.wav2vec2.objective import sample_negative_indices
from tests.reference import require
from tests.training_helpers import FixedBatches, StopAt, assert_ddp_gradients_match, logged_rows, no_dropout

SECONDS = 2.0  # the length of the audio_dir files (tests/conftest.py: eight of 2 s)
START_UPDATES = 50_000  # optimizer_history num_updates of the shipped checkpoint


@pytest.fixture(scope="module")
def bundle_dir(w2v_bundle_dir) -> Path:
    return w2v_bundle_dir  # the demo wav2vec 2.0 (tests/conftest.py)


def _options(bundle_dir: Path, audio_dir: Path, out: Path, **overrides) -> PretrainOptions:
    values = dict(train_data=str(audio_dir), output_dir=str(out), init_from=str(bundle_dir), max_steps=6,
                  accumulate=2, max_batch_seconds=2 * SECONDS, min_seconds=1.0, num_workers=0, warmup_steps=2,
                  checkpoint_every=3, log_every=1, lr=5e-4, progress_bar=False)
    values.update(overrides)
    return PretrainOptions(**values)


@pytest.fixture(scope="module")
def full_run(bundle_dir, audio_dir, tmp_path_factory):
    return run_pretraining(_options(bundle_dir, audio_dir, tmp_path_factory.mktemp("run") / "full"))


def _temperature(updates: int) -> float:
    return max(2.0 * 0.999995 ** updates, 0.5)  # the tiny checkpoint's latent_temp = BASE's (2, 0.5, 0.999995)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_run_logs_the_contrastive_task_and_exports_a_loadable_bundle(full_run, bundle_dir):
    assert isinstance(build_module(_options(bundle_dir, Path("."), Path("."))), Wav2Vec2ContinuedPretraining)
    rows = logged_rows(full_run.metrics_csv)
    assert len(rows) == 6
    for column in ("train/loss", "train/infonce", "train/diversity", "train/feature_penalty", "train/accuracy",
                   "train/code_perplexity", "train/prob_perplexity", "train/codebook_usage",
                   "train/gumbel_temperature", "train/sample_size", "train/grad_norm", "train/lr"):
        assert math.isfinite(float(rows[0][column])), column
    for row in rows:  # loss = InfoNCE + 0.1 diversity + 10 feature penalty, all per masked frame
        parts = float(row["train/infonce"]) + 0.1 * float(row["train/diversity"]) + \
            10.0 * float(row["train/feature_penalty"])
        assert float(row["train/loss"]) == pytest.approx(parts, rel=1e-5)
        # the Gumbel temperature continues from the checkpoint's 50k updates (not from max_temp = 2)
        assert float(row["train/gumbel_temperature"]) == pytest.approx(
            _temperature(START_UPDATES + int(row["step"])), rel=1e-6)
        assert 0 < float(row["train/codebook_usage"]) <= 1
    from continue_pt.curves import PANELS, write_curves

    png, summary = write_curves(full_run.output_dir)
    assert png.stat().st_size > 0 and "train/code_perplexity" in summary.read_text()
    plotted = {c for _, match in PANELS for c in rows[0] if match(c)}
    assert {"train/code_perplexity", "train/prob_perplexity", "train/codebook_usage",
            "train/gumbel_temperature"} <= plotted

    exported = load_bundle(full_run.bundle_dir)
    assert exported.family == "wav2vec2" and exported.num_updates == START_UPDATES + 6
    record = exported.config.provenance["training"][-1]
    assert record["steps"] == 6 and "quantizer" in record["targets"]
    model = exported.get_pretrain_model()
    assert model.quantizer.temperature == pytest.approx(_temperature(START_UPDATES + 6))
    before, after = load_bundle(bundle_dir).state_dict(), exported.state_dict()
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_export_equals_the_live_student(full_run, tmp_path):
    ckpt = full_run.checkpoint_dir / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    module = Wav2Vec2ContinuedPretraining(checkpoint["hyper_parameters"]["options"])
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    out = export_checkpoint(ckpt, tmp_path / "exported")
    reloaded = load_bundle(out).get_pretrain_model()
    live = module.student.state_dict()
    assert set(reloaded.state_dict()) == set(live)
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, live[name]), name


def test_resume_is_exact_and_keeps_the_temperature_schedule(full_run, bundle_dir, audio_dir, tmp_path):
    first = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part"), callbacks=[StopAt(3)])
    assert len(logged_rows(first.metrics_csv)) == 3
    resumed = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part", init_from=None,
                                       resume=str(first.checkpoint_dir / "step-step=3.ckpt")))
    full_rows, resumed_rows = logged_rows(full_run.metrics_csv), logged_rows(resumed.metrics_csv)[-3:]
    for column in ("train/loss", "train/gumbel_temperature", "train/code_perplexity"):
        assert [r[column] for r in resumed_rows] == [r[column] for r in full_rows[3:]], column
    a, b = load_bundle(full_run.bundle_dir).state_dict(), load_bundle(resumed.bundle_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_bundle(resumed.bundle_dir).num_updates == START_UPDATES + 6


def test_validation_logs_loss_and_accuracy_in_eval_mode(bundle_dir, audio_dir, tmp_path):
    run = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "run", max_steps=2, accumulate=1,
                                   val_data=str(audio_dir), val_check_interval=2))
    with open(run.metrics_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    assert len(rows) == 1
    assert math.isfinite(float(rows[0]["val/loss"])) and 0 <= float(rows[0]["val/accuracy"]) <= 1


# ------------------------------------------------------------------------------------------------ refusals


def test_hubert_only_options_are_refused_together(bundle_dir, audio_dir, tmp_path):
    options = _options(bundle_dir, audio_dir, tmp_path / "o", reinit_label_head=True, unmasked_weight=1.0,
                       loss_norm="per-term", masking={"mask_channel_prob": 0.1})
    with pytest.raises(PretrainOptionsError) as info:
        options.validate()
    text = str(info.value)
    for expected in ("reinit_label_head is a HuBERT option", "unmasked_weight is a HuBERT option",
                     "loss_norm 'per-term'", "mask_channel_prob=0.1"):
        assert expected in text
    assert not (tmp_path / "o").exists()


def test_wav2vec2_options_on_a_hubert_bundle_are_refused(audio_dir, tmp_path):
    from continue_pt.demo import CHECKPOINT
    from converters.convert import convert_checkpoint

    hubert = convert_checkpoint(CHECKPOINT, tmp_path / "hubert")
    options = _options(hubert, audio_dir, tmp_path / "o", diversity_weight=0.2)
    with pytest.raises(PretrainOptionsError, match="wav2vec 2.0 option; HuBERT has no quantizer"):
        options.validate()


@pytest.mark.fairseq
def test_fine_tuned_ctc_bundle_is_refused_with_the_alternative(audio_dir, tmp_path):
    require("fairseq")
    from converters.convert import convert_checkpoint
    from tests.fairseq_reference import build_fairseq_model, save_checkpoint

    ref = build_fairseq_model("wav2vec_small_960h", num_layers=1)
    save_checkpoint(ref, tmp_path / "ctc.pt", "dict")
    ctc = convert_checkpoint(tmp_path / "ctc.pt", tmp_path / "ctc")
    with pytest.raises(PretrainOptionsError, match="fine-tuned \\(CTC\\).*no pre-training head.*quantizer"):
        _options(ctc, audio_dir, tmp_path / "o").validate()
    with pytest.raises(Exception, match="fine-tuned \\(CTC\\)"):
        Wav2Vec2ContinuedPretraining(ModuleOptions(bundle=str(ctc)))


# ------------------------------------------------------------------------------------------------ collapse guard


def test_codebook_usage_is_relative_to_what_the_batch_can_reach():
    assert codebook_usage(640.0, 2, 320, 10_000) == pytest.approx(1.0)
    assert codebook_usage(40.0, 2, 320, 20) == pytest.approx(1.0)  # 20 frames can use at most 20 codes a group
    assert codebook_usage(4.0, 2, 320, 10_000) == pytest.approx(4 / 640)


def test_collapse_warning_says_what_to_try_and_repeats_at_most_every_n_steps(bundle_dir, audio_dir, tmp_path):
    options = _options(bundle_dir, audio_dir, tmp_path / "run", max_steps=5, accumulate=1,
                       codebook_warn_threshold=1.0)  # the tiny codebook is never fully used: warns
    module_options = options.module_options()
    module_options.wav2vec2.codebook_warn_every = 2
    module = Wav2Vec2ContinuedPretraining(module_options)
    with torch.no_grad():  # a quantizer that picks code 0 in both groups almost always: collapse
        module.student.quantizer.weight_proj.bias[0] += 100.0
        module.student.quantizer.weight_proj.bias[16] += 100.0
    from continue_pt.data import AudioDataModule

    data = AudioDataModule(str(audio_dir), None, sample_rate=16000, normalize=False, max_batch_seconds=2 * SECONDS,
                           min_seconds=1.0, num_workers=0, seed=0)
    trainer = pl.Trainer(accelerator="cpu", max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=data)
    collapse = [w for w in caught if issubclass(w.category, CodebookCollapseWarning)]
    assert len(collapse) == 3  # steps 0, 2, 4
    text = str(collapse[0].message)
    assert "code perplexity" in text and "--lr" in text and "--diversity-weight" in text
    assert float(text.split("code perplexity ")[1].split()[0]) < 2.5  # about one code per group


# ------------------------------------------------------------------------------------------------ accumulation


class _FixedDraws(Wav2Vec2ContinuedPretraining):
    """Masks, negatives and Gumbel noise fixed per utterance (independent of how a step is cut into
    micro-batches); gradients recorded after the module's normalisation."""

    masks: torch.Tensor
    negatives: list[torch.Tensor]
    noise: list[torch.Tensor]

    def draw_mask(self, shape, frame_padding, rng):
        return self.masks[self._rows][:, :shape[1]].clone()

    def training_step(self, batch, batch_idx):
        self._rows = batch["indices"]
        return super().training_step(batch, batch_idx)

    def draw_negatives_and_noise(self, batch, mask, seeds):
        rows = batch["indices"].tolist()
        count = int(self.masks[0].sum())
        negatives = torch.cat([self.negatives[r] + i * count for i, r in enumerate(rows)])
        return negatives, torch.cat([self.noise[r] for r in rows])

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.recorded = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


def _fixed_draws(bundle_dir) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """4 one-second utterances with their masks (equal counts, fairseq's require_same_masks), negatives and
    Gumbel noise, each utterance's own."""
    bundle = load_bundle(bundle_dir)
    waves = torch.cat([demo_audio(1.0, seed=10 + i) for i in range(4)])
    frames, groups, num_vars = 49, 2, 16
    masking = MaskingOptions.from_options(bundle.config.objective)
    masks = torch.from_numpy(time_mask((4, frames), None, masking, rng=np.random.default_rng(3)))
    count = int(masks[0].sum())
    assert (masks.sum(1) == count).all()
    g = torch.Generator().manual_seed(0)
    negatives = [sample_negative_indices([count], 100, rng=g) for _ in range(4)]
    noise = [-torch.empty(count * groups, num_vars).exponential_(generator=g).log() for _ in range(4)]
    return waves, masks, negatives, noise


def _fixed_module(bundle_dir, draws) -> _FixedDraws:
    pl.seed_everything(0, verbose=False)
    module = _FixedDraws(ModuleOptions(bundle=str(bundle_dir), warmup_steps=0, wav2vec2=Wav2Vec2Options(diversity_weight=0.0)))
    _, module.masks, module.negatives, module.noise = draws
    module.objective = dataclasses.replace(module.objective, dropout_features=0.0)
    no_dropout(module)
    return module


def _fixed_batches(draws, splits) -> list[dict]:
    waves = draws[0]
    return [{"waveforms": waves[torch.tensor(r)], "lengths": torch.full((len(r),), waves.shape[1]),
             "indices": torch.tensor(r)} for r in splits]


def test_accumulated_micro_batches_give_the_one_batch_gradient(bundle_dir):
    """fairseq's normalisation (sum over micro-batches / the step's masked frames) makes two micro-batches of
    two utterances equal to one batch of four. The diversity loss is a statistic of each micro-batch (the
    perplexity of its averaged code distribution), so it is weighted 0 here, as in fairseq it would differ too."""
    draws = _fixed_draws(bundle_dir)

    def gradients(splits, accumulate):
        module = _fixed_module(bundle_dir, draws)
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, datamodule=FixedBatches(_fixed_batches(draws, splits)))
        return module.recorded

    split = gradients([[0, 1], [2, 3]], 2)
    whole = gradients([[0, 1, 2, 3]], 1)
    assert set(split) == set(whole)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
    assert whole["student.project_q.weight"].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ command line


def test_cli_overrides_reach_the_objective(bundle_dir, audio_dir, tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text("log_every: 1\nprogress_bar: false\n")
    result = CliRunner().invoke(cli, [
        "pretrain", "--config", str(config), "--init-from", str(bundle_dir), "--train-data", str(audio_dir),
        "--output-dir", str(out),
        "--max-steps", "2", "--warmup-steps", "1", "--max-batch-seconds", "4", "--num-workers", "0",
        "--diversity-weight", "0.5", "--num-negatives", "10", "--feature-penalty-weight", "2"])
    assert result.exit_code == 0, result.output
    rows = logged_rows(out / "metrics.csv")
    assert len(rows) == 2
    for row in rows:
        parts = float(row["train/infonce"]) + 0.5 * float(row["train/diversity"]) + \
            2.0 * float(row["train/feature_penalty"])
        assert float(row["train/loss"]) == pytest.approx(parts, rel=1e-5)
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["options"]["num_negatives"] == 10
    assert load_bundle(out / "bundle").num_updates == START_UPDATES + 2

    refused = CliRunner().invoke(cli, [
        "pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir), "--output-dir",
        str(tmp_path / "bad"), "--kmeans", "km.safetensors", "--labels", "x.km"])
    assert refused.exit_code == 1 and "Error:" in refused.output and "HuBERT option" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "bad").exists()


def test_cli_run_shorter_than_log_every_still_succeeds(bundle_dir, audio_dir, tmp_path):
    from click.testing import CliRunner

    from continue_pt.cli import cli

    out = tmp_path / "run"
    result = CliRunner().invoke(cli, [
        "pretrain", "--init-from", str(bundle_dir), "--train-data", str(audio_dir), "--output-dir", str(out),
        "--max-steps", "1", "--warmup-steps", "0", "--max-batch-seconds", "4", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    # the default log interval follows --max-steps and the first/last step is always logged: a 1-step run has a curve
    assert len(logged_rows(out / "metrics.csv")) == 1 and f"curves: {out / 'curves.png'}" in result.output
    assert load_bundle(out / "bundle").num_updates == START_UPDATES + 1


def test_bf16_autocast_forward_keeps_the_contrastive_part_in_fp32(bundle_dir):
    """What `--precision bf16-mixed` runs (CPU autocast here; the same code on CUDA): the logits, their
    softmax and the loss terms stay fp32, the loss lands within bf16 rounding of the fp32 one, gradients flow."""
    from continue_pt.wav2vec2.objective import normalized_wav2vec2_loss, wav2vec2_forward, wav2vec2_loss_terms

    bundle = load_bundle(bundle_dir)
    model = bundle.get_pretrain_model().eval()  # eval: hard codes, no dropout -- the two runs see the same draws
    wav = torch.cat([demo_audio(1.0, seed=40 + i) for i in range(2)])
    masking = MaskingOptions.from_options(bundle.config.objective)
    mask = torch.from_numpy(time_mask((2, 49), None, masking, rng=np.random.default_rng(0)))
    negatives = sample_negative_indices(mask.sum(1).tolist(), 100, rng=torch.Generator().manual_seed(0))
    losses = []
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = wav2vec2_forward(model, wav, None, mask, negative_indices=negatives, feature_grad_mult=0.1)
            terms = wav2vec2_loss_terms(out)
            loss = normalized_wav2vec2_loss(terms, terms.num_masked, (0.1, 10.0))
        assert out.logits.dtype == torch.float32 and loss.dtype == torch.float32
        loss.backward()
        assert torch.isfinite(model.project_q.weight.grad).all() and model.mask_embedding.grad is not None
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=0.02)


_DDP_SCRIPT = """
import sys
import lightning.pytorch as pl
import torch

# one thread: a fixed summation order, whatever the machine's load (a last-bit difference can flip a Gumbel
# argmax and move the loss by 1e-3)
torch.set_num_threads(1)

sys.path.insert(0, sys.argv[4])
from tests.training_helpers import FixedBatches
from tests.continue_pt.test_wav2vec2_pretrain import _fixed_batches, _fixed_draws, _fixed_module

bundle_dir, devices, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
draws = _fixed_draws(bundle_dir)
module = _fixed_module(bundle_dir, draws)
pl.seed_everything(0, verbose=False)
splits = [[0, 1], [2, 3]] if devices > 1 else [[0, 1, 2, 3]]
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False)
rank_batches = _fixed_batches(draws, splits)
data = FixedBatches(rank_batches[trainer.global_rank:trainer.global_rank + 1] if devices > 1 else rank_batches)
trainer.fit(module, datamodule=data)
if trainer.is_global_zero:
    torch.save({"grads": module.recorded, "loss": float(trainer.callback_metrics["train/loss"])}, out)
"""


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(bundle_dir, tmp_path):
    """Two ranks of two utterances each: the gradients after the module's normalisation (all-reduced sample
    size) equal one process with all four, as fairseq's trainer makes them."""
    assert_ddp_gradients_match(_DDP_SCRIPT, bundle_dir, tmp_path)
