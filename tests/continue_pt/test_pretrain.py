"""Continued pre-training with Lightning on the tiny demo bundle and generated audio (CPU)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from bundles import load_bundle
from bundles.kmeans import KMeansModel, save_kmeans
from continue_pt.demo import KMEANS_LAYER, demo_audio
from continue_pt.export import export_checkpoint
from continue_pt.hubert.module import HubertContinuedPretraining
from continue_pt.module_options import ModuleOptions
from continue_pt.hubert.options import HubertOptions
from continue_pt.masking import time_mask
from continue_pt.options import PretrainOptionsError
from continue_pt.pretrain import PretrainOptions, run_pretraining
from tests.training_helpers import StopAt, assert_ddp_gradients_match, logged_rows, no_dropout

SECONDS = 2.0


def _options(bundle_dir: Path, audio_dir: Path, out: Path, **overrides) -> PretrainOptions:
    values = dict(train_data=str(audio_dir), output_dir=str(out), init_from=str(bundle_dir), max_steps=6,
                  accumulate=2, max_batch_seconds=2 * SECONDS, min_seconds=1.0, num_workers=0, warmup_steps=2,
                  checkpoint_every=3, log_every=1)
    values.update(overrides)
    return PretrainOptions(**values)


@pytest.fixture(scope="module")
def short_run(bundle_dir, audio_dir, tmp_path_factory):
    return run_pretraining(_options(bundle_dir, audio_dir, tmp_path_factory.mktemp("run") / "out"))


# ------------------------------------------------------------------------------------------------ end to end


def test_short_run_exports_a_loadable_bundle(short_run, bundle_dir):
    bundle = load_bundle(short_run.bundle_dir)
    assert bundle.num_updates == 1000 + 6
    training = bundle.config.provenance["training"][-1]
    assert training["steps"] == 6 and training["loss_normalization"] == "fairseq"
    assert bundle.has_kmeans and bundle.get_kmeans().layer == KMEANS_LAYER
    bundle.get_model()
    bundle.get_pretrain_model()
    rows = logged_rows(short_run.metrics_csv)
    assert len(rows) == 6
    for column in ("train/loss", "train/accuracy_masked", "train/ce_masked", "train/feature_penalty", "train/lr",
                   "train/grad_norm", "train/audio_seconds_per_second"):
        assert column in rows[0]
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    # the trained weights differ from the starting ones
    before = load_bundle(bundle_dir).state_dict()
    after = bundle.state_dict()
    assert set(before) == set(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoints_load_with_weights_only(short_run):
    for ckpt in sorted(short_run.checkpoint_dir.glob("*.ckpt")):
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert "continue_pt" in checkpoint
        assert not any(k.startswith("targets.") for k in checkpoint["state_dict"])


def test_export_equals_the_live_student(short_run, tmp_path):
    ckpt = short_run.checkpoint_dir / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    module = HubertContinuedPretraining(checkpoint["hyper_parameters"]["options"])
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    out = export_checkpoint(ckpt, tmp_path / "exported")
    exported = load_bundle(out).get_model()
    live = module.student.wav2vec2.eval()
    wav = demo_audio(1.5, seed=99)
    with torch.no_grad():
        a, _ = live.extract_features(wav)
        b, _ = exported.extract_features(wav)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    rows = module.extra_label_embeddings.detach()
    assert torch.equal(load_bundle(out).fairseq_extras()["label_embeddings_non_cluster"], rows)


def test_export_refuses_other_files(tmp_path, short_run):
    from bundles.errors import BundleError

    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(BundleError, match="other.ckpt.*not a continue-pt training checkpoint"):
        export_checkpoint(other, tmp_path / "x")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BundleError, match="junk.ckpt"):
        export_checkpoint(junk, tmp_path / "y")


# ------------------------------------------------------------------------------------------------ exact resume


@pytest.mark.slow
@pytest.mark.parametrize("loss_norm", ["fairseq", "per-term"])  # per-term: the step plans survive a resume too
def test_resume_is_exact(bundle_dir, audio_dir, tmp_path, loss_norm):
    full = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "full", loss_norm=loss_norm))
    first = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part", loss_norm=loss_norm),
                            callbacks=[StopAt(3)])
    assert len(logged_rows(first.metrics_csv)) == 3
    resumed = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "part", init_from=None, loss_norm=loss_norm,
                                       resume=str(first.checkpoint_dir / "step-step=3.ckpt")))
    losses_full = [float(r["train/loss"]) for r in logged_rows(full.metrics_csv)]
    losses_resumed = [float(r["train/loss"]) for r in logged_rows(resumed.metrics_csv)]
    assert len(losses_full) == 6
    assert losses_resumed[-3:] == losses_full[3:]
    a, b = load_bundle(full.bundle_dir), load_bundle(resumed.bundle_dir)
    assert b.num_updates == 1006
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------ option errors


def test_init_from_and_resume_together_is_refused(bundle_dir, audio_dir, tmp_path):
    options = _options(bundle_dir, audio_dir, tmp_path / "o", resume=str(tmp_path / "missing.ckpt"),
                       val_data=str(tmp_path / "no_val"))
    with pytest.raises(PretrainOptionsError) as info:
        run_pretraining(options)
    text = str(info.value)
    assert "give exactly one of init_from" in text
    assert "no_val does not exist" in text  # every problem at once
    assert not (tmp_path / "o").exists()


def test_kmeans_of_another_size_needs_reinit_label_head(bundle_dir, audio_dir, tmp_path):
    km = tmp_path / "km7.safetensors"
    save_kmeans(KMeansModel(torch.randn(7, 64), layer=1), km)
    with pytest.raises(PretrainOptionsError, match="7 clusters but the label head .* has 20.*--reinit-label-head"):
        _options(bundle_dir, audio_dir, tmp_path / "o", kmeans=str(km)).validate()
    # with --reinit-label-head it trains and exports a 7-class head
    result = run_pretraining(_options(bundle_dir, audio_dir, tmp_path / "o", kmeans=str(km), max_steps=2,
                                      reinit_label_head=True, head_only_steps=1))
    bundle = load_bundle(result.bundle_dir)
    assert bundle.config.pretrain_args["num_classes"] == 7
    assert bundle.config.label_dictionary["num_clusters"] == 7
    assert bundle.get_pretrain_model().logit_generator.label_embeddings.shape[0] == 7
    assert bundle.get_kmeans().num_clusters == 7


def test_per_term_with_accumulation_needs_micro_batch_plans(bundle_dir, audio_dir, tmp_path):
    _options(bundle_dir, audio_dir, tmp_path / "o", loss_norm="per-term", accumulate=2).validate()  # allowed
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir), warmup_steps=0, hubert=HubertOptions(loss_norm="per-term")))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    batch = {"waveforms": demo_audio(1.0, seed=1), "lengths": torch.tensor([16000]), "labels": None,
             "indices": torch.tensor([0])}
    with pytest.raises(ValueError, match="micro_batch_plans"):
        trainer.fit(module, train_dataloaders=DataLoader([batch, batch], batch_size=None))


def test_per_term_run_with_accumulation_plans_every_step(bundle_dir, audio_dir, tmp_path, recwarn):
    # batches of 1 utterance (max_batch_seconds = one utterance), accumulate 3: the epoch ends in a shorter group
    options = _options(bundle_dir, audio_dir, tmp_path / "pt", loss_norm="per-term", accumulate=3,
                       max_batch_seconds=SECONDS, max_steps=3)
    result = run_pretraining(options)
    rows = logged_rows(result.metrics_csv)
    assert len(rows) == 3
    assert all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert not [w for w in recwarn if "per-term normalisation is approximate" in str(w.message)]


# ------------------------------------------------------------------------------------------------ accumulation


class _Recorder(HubertContinuedPretraining):
    """Masks per utterance from a fixed table (independent of micro-batching); gradients recorded after the
    module's normalisation."""

    mask_table: torch.Tensor

    def draw_masks(self, batch, shape, frame_padding, rng):
        return self.mask_table[batch["indices"]][:, :shape[1]].clone(), None

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.recorded = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


class _ListData(pl.LightningDataModule):
    """Fixed batches (per rank), with the micro-batch plans the module needs for per-term with accumulation."""

    def __init__(self, per_rank: list[list[dict]]):
        super().__init__()
        self.per_rank = per_rank

    def _batches(self) -> list[dict]:
        return self.per_rank[self.trainer.global_rank if len(self.per_rank) > 1 else 0]

    def train_dataloader(self):
        return DataLoader(self._batches(), batch_size=None)

    def micro_batch_plans(self, first: int, stop: int) -> list[dict]:
        return [{"indices": b["indices"], "batch_size": len(b["indices"]), "num_samples": b["waveforms"].shape[1],
                 "label_frames": None} for b in self._batches()[first:stop]]


def _step_gradients(bundle_dir: Path, batches: list[dict], accumulate: int, mode: str, mask_table):
    pl.seed_everything(0, verbose=False)
    module = _Recorder(ModuleOptions(bundle=str(bundle_dir), warmup_steps=0,
                                     hubert=HubertOptions(loss_norm=mode, unmasked_weight=0.5)))
    module.mask_table = mask_table
    no_dropout(module)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, accumulate_grad_batches=accumulate,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=_ListData([batches]))
    return module.recorded


@pytest.mark.parametrize("mode, splits, accumulate", [
    ("fairseq", [[0, 1], [2, 3]], 2),
    ("torchaudio", [[0, 1], [2, 3]], 2),
    ("per-term", [[0, 1], [2, 3]], 2),
    ("per-term", [[0], [1, 2, 3]], 2),  # unequal micro-batches, unequal mask counts: per-term is still exact
    ("per-term", [[0, 1], [2], [3]], 4),  # the epoch ends after 3 of 4 micro-batches: Lightning steps with 3
])
def test_accumulated_gradients_equal_one_big_batch(bundle_dir, mode, splits, accumulate):
    waves = torch.cat([demo_audio(1.0, seed=10 + i) for i in range(4)])
    lengths = torch.full((4,), waves.shape[1])
    frames = 49
    rng = np.random.default_rng(3)
    if mode == "per-term":  # one draw per utterance: mask counts differ from row to row
        mask_table = torch.cat([torch.from_numpy(time_mask((1, frames), None, _masking(bundle_dir), rng=rng))
                                for _ in range(4)])
        assert len({int(r.sum()) for r in mask_table}) > 1
    else:  # one mask draw for all 4 utterances: same count per row, so each micro-batch's S_i / F_i is the same
        mask_table = torch.from_numpy(time_mask((4, frames), None, _masking(bundle_dir), rng=rng))

    def batch(rows):
        rows = torch.tensor(rows)
        return {"waveforms": waves[rows], "lengths": lengths[rows], "labels": None, "indices": rows}

    accumulated = _step_gradients(bundle_dir, [batch(rows) for rows in splits], accumulate, mode, mask_table)
    whole = _step_gradients(bundle_dir, [batch([0, 1, 2, 3])], 1, mode, mask_table)
    assert set(accumulated) == set(whole)
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().sum() > 0 for g in whole.values())


def _masking(bundle_dir):
    from continue_pt.masking import MaskingOptions

    return MaskingOptions.from_options(load_bundle(bundle_dir).config.pretrain_args)


# ------------------------------------------------------------------------------------------------ DDP on CPU

_DDP_SCRIPT = '''
import sys
import lightning.pytorch as pl
import torch

# one thread: a fixed summation order, whatever the machine's load (a last-bit difference can move a
# nearest-centroid target)
torch.set_num_threads(1)

sys.path.insert(0, sys.argv[4])
from tests.continue_pt.test_pretrain import _ListData, _Recorder, _ddp_batches
from tests.training_helpers import no_dropout
from continue_pt.module_options import ModuleOptions
from continue_pt.hubert.options import HubertOptions

bundle_dir, devices, out, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[5]
pl.seed_everything(0, verbose=False)
module = _Recorder(ModuleOptions(bundle=bundle_dir, warmup_steps=0, hubert=HubertOptions(loss_norm=mode, unmasked_weight=0.5)))
table, per_rank, whole = _ddp_batches(bundle_dir, mode)
module.mask_table = table
no_dropout(module)
data = _ListData(per_rank if devices > 1 else [[whole]])
accumulate = len(per_rank[0]) if devices > 1 else 1
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                     accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     limit_val_batches=0, use_distributed_sampler=False)
trainer.fit(module, datamodule=data)
if trainer.is_global_zero:
    torch.save({"grads": module.recorded, "loss": float(trainer.callback_metrics["train/loss"])}, out)
'''


def _ddp_batches(bundle_dir, mode="fairseq"):
    waves = torch.cat([demo_audio(1.0, seed=10 + i) for i in range(4)])
    lengths = torch.full((4,), waves.shape[1])
    rng = np.random.default_rng(3)
    if mode == "per-term":  # masks of different counts, and each rank accumulates two unequal micro-batches
        table = torch.cat([torch.from_numpy(time_mask((1, 49), None, _masking(bundle_dir), rng=rng))
                           for _ in range(4)])
        splits = [[[0], [1]], [[2, 3], [3]]]  # rank 1's micro-batches: 2 and 1 utterances; the whole batch repeats 3
    else:
        table = torch.from_numpy(time_mask((4, 49), None, _masking(bundle_dir), rng=rng))
        splits = [[[0, 1]], [[2, 3]]]

    def batch(rows):
        rows = torch.tensor(rows)
        return {"waveforms": waves[rows], "lengths": lengths[rows], "labels": None, "indices": rows}

    whole = batch([row for rank in splits for rows in rank for row in rows])
    return table, [[batch(rows) for rows in rank] for rank in splits], whole


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fairseq", "per-term"])
def test_two_process_ddp_equals_one_process(bundle_dir, tmp_path, mode):
    assert_ddp_gradients_match(_DDP_SCRIPT, bundle_dir, tmp_path, mode)


def test_continuing_a_continued_bundle_warns_about_its_teacher(short_run, bundle_dir, audio_dir, tmp_path):
    """The exported bundle records the teacher whose features made its targets; starting another run (or a
    k-means check) from it without that teacher would label with its own, moved, features: warned, with the fix."""
    from click.testing import CliRunner

    from continue_pt.cli import cli
    from continue_pt.export import training_teacher

    continued = load_bundle(short_run.bundle_dir)
    assert training_teacher(continued.config) == str(Path(bundle_dir).resolve())
    assert training_teacher(load_bundle(bundle_dir).config) is None
    with pytest.warns(UserWarning, match="Pass teacher .*to keep the same targets"):
        _options(short_run.bundle_dir, audio_dir, tmp_path / "again").validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with the teacher given: no warning
        _options(short_run.bundle_dir, audio_dir, tmp_path / "again", teacher=str(bundle_dir)).validate()
    result = CliRunner().invoke(cli, ["kmeans", "check", "--bundle", str(short_run.bundle_dir), "--audio",
                                      str(audio_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert f"pass --teacher {Path(bundle_dir).resolve()}" in result.stderr
    report = json.loads(result.stdout)
    assert report["shuffles"] == 1000 and "shuffled" not in report
