"""Issue 15, item 8: no graph for the unmasked logits when their weight is 0; a micro-batch whose files all failed
to load (``empty_batch()``; Lightning skips a ``None`` batch on that rank only) adds nothing to the step, takes part
in DDP's collectives, and a step of nothing makes no update."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from continue_pt.batching import empty_batch
from continue_pt.demo import demo_audio
from continue_pt.hubert.module import HubertContinuedPretraining
from continue_pt.module_options import ModuleOptions
from continue_pt.hubert.options import HubertOptions
from continue_pt.masking import time_mask
from continue_pt.wav2vec2.module import Wav2Vec2ContinuedPretraining
from tests.continue_pt.test_pretrain import _ListData, _masking, _Recorder
from tests.training_helpers import no_dropout

ROOT = Path(__file__).resolve().parents[2]


def _batches(bundle_dir):
    waves = torch.cat([demo_audio(1.0, seed=10 + i) for i in range(4)])
    table = torch.from_numpy(time_mask((4, 49), None, _masking(bundle_dir), rng=np.random.default_rng(3)))

    def batch(rows):
        rows = torch.tensor(rows)
        return {"waveforms": waves[rows], "lengths": torch.full((len(rows),), waves.shape[1]), "labels": None,
                "indices": rows}

    return table, batch


def _fit(bundle_dir, batches, accumulate, mode="fairseq", max_steps=1, unmasked_weight=0.5):
    pl.seed_everything(0, verbose=False)
    module = _Recorder(ModuleOptions(bundle=str(bundle_dir), warmup_steps=0,
                                     hubert=HubertOptions(loss_norm=mode, unmasked_weight=unmasked_weight)))
    module.mask_table = _batches(bundle_dir)[0]
    no_dropout(module)
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=_ListData([batches]))
    return module, start, trainer


def test_unmasked_logits_have_no_graph_when_their_weight_is_zero(bundle_dir):
    table, batch = _batches(bundle_dir)
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir)))  # the checkpoint's weight: 0
    module.train()
    assert module.weights.unmasked == 0
    terms, _ = module._forward_terms(batch([0, 1]), np.random.default_rng(0), module.feature_grad_mult)
    assert terms.unmasked_ce_sum is not None and not terms.unmasked_ce_sum.requires_grad  # still logged
    assert terms.masked_ce_sum.requires_grad
    weighted = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir), hubert=HubertOptions(unmasked_weight=0.5)))
    weighted.train()
    terms, _ = weighted._forward_terms(batch([0, 1]), np.random.default_rng(0), weighted.feature_grad_mult)
    assert terms.unmasked_ce_sum.requires_grad


@pytest.mark.parametrize("mode", ["fairseq", "per-term"])
def test_an_empty_micro_batch_adds_nothing_to_the_step(bundle_dir, mode):
    _, batch = _batches(bundle_dir)
    with_empty, _, _ = _fit(bundle_dir, [batch([0, 1]), empty_batch()], accumulate=2, mode=mode)
    alone, _, _ = _fit(bundle_dir, [batch([0, 1])], accumulate=1, mode=mode)
    assert set(with_empty.recorded) == set(alone.recorded)
    for name, grad in alone.recorded.items():
        torch.testing.assert_close(with_empty.recorded[name], grad, rtol=1e-6, atol=1e-8, msg=name)


def test_a_step_of_only_empty_micro_batches_makes_no_update(bundle_dir, caplog):
    module, start, trainer = _fit(bundle_dir, [empty_batch()], accumulate=1, max_steps=1)
    assert trainer.global_step == 1
    assert "every file of the step failed to load" in caplog.text
    # AdamW with zero gradients would still decay every weight (decoupled weight decay); nothing moved
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), start[name]), name


def test_wav2vec2_empty_micro_batch_adds_nothing(w2v_bundle_dir):
    from tests.continue_pt.test_wav2vec2_pretrain import _fixed_batches, _fixed_draws, _fixed_module
    from tests.training_helpers import FixedBatches

    w2v = w2v_bundle_dir
    draws = _fixed_draws(w2v)

    def gradients(batches, accumulate):
        module = _fixed_module(w2v, draws)
        original = module.training_step

        def step(batch, batch_idx):  # the fixture's draws read batch["indices"]; an empty batch has none
            if batch["waveforms"].shape[0] == 0:
                return Wav2Vec2ContinuedPretraining.training_step(module, batch, batch_idx)
            return original(batch, batch_idx)

        module.training_step = step
        trainer = pl.Trainer(accelerator="cpu", max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, datamodule=FixedBatches(batches))
        return module.recorded

    whole = gradients(_fixed_batches(draws, [[0, 1, 2, 3]]), 1)
    with_empty = gradients([*_fixed_batches(draws, [[0, 1, 2, 3]]), empty_batch()], 2)
    for name, grad in whole.items():
        torch.testing.assert_close(with_empty[name], grad, rtol=1e-6, atol=1e-8, msg=name)


_DDP_SCRIPT = '''
import sys
import lightning.pytorch as pl
import torch

torch.set_num_threads(1)  # a fixed summation order whatever the load (targets are nearest centroids)
sys.path.insert(0, sys.argv[1])
from tests.continue_pt.test_gpu_path_steps import _batches
from continue_pt.batching import empty_batch
from tests.continue_pt.test_pretrain import _ListData, _Recorder
from tests.training_helpers import no_dropout
from continue_pt.module_options import ModuleOptions
from continue_pt.hubert.options import HubertOptions

bundle_dir, devices, out = sys.argv[2], int(sys.argv[3]), sys.argv[4]
pl.seed_everything(0, verbose=False)
module = _Recorder(ModuleOptions(bundle=bundle_dir, warmup_steps=0, hubert=HubertOptions(unmasked_weight=0.5)))
module.mask_table, batch = _batches(bundle_dir)
no_dropout(module)
per_rank = [[batch([0, 1])], [empty_batch()]] if devices > 1 else [[batch([0, 1])]]
trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=1,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0, use_distributed_sampler=False)
trainer.fit(module, datamodule=_ListData(per_rank))
torch.save(module.recorded, f"{out}.rank{trainer.global_rank}")
'''


@pytest.mark.slow
def test_ddp_rank_with_an_empty_batch_neither_hangs_nor_changes_the_gradient(bundle_dir, tmp_path):
    script = tmp_path / "ddp_empty.py"
    script.write_text(_DDP_SCRIPT)
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"grads{devices}"
        proc = subprocess.run([sys.executable, str(script), str(ROOT), str(bundle_dir), str(devices), str(out)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=150)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[devices] = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(devices)]
    one = results[1][0]
    for rank_grads in results[2]:  # both ranks hold rank 0's batch's gradient (the empty rank added zeros)
        assert set(rank_grads) == set(one)
        for name, grad in one.items():
            torch.testing.assert_close(rank_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_training_collater_gives_an_empty_batch_not_none():
    from continue_pt.batching import BatchCollater

    batch = BatchCollater(250000, 50.0, 16000, seed=0)([None, None])
    assert batch is not None and batch["waveforms"].shape == (0, 0) and batch["indices"].numel() == 0
