"""What trains is what was proven equal to fairseq: each module's training step backwards the loss pieces of its
objective that the fairseq parity tests check (``sample_size`` and ``unnormalized_loss`` in
test_hubert_objective.py and test_wav2vec2_objective.py; ``normalized_loss`` for per-term), and the step's gradient
is divided by the summed ``sample_size``, nothing computed on the side."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from continue_pt.demo import demo_audio
from continue_pt.hubert import module as hubert_module
from continue_pt.hubert import loss as hubert_loss
from continue_pt.hubert.options import HubertOptions
from continue_pt.module_options import ModuleOptions
from continue_pt.wav2vec2 import module as wav2vec2_module
from continue_pt.wav2vec2 import objective as wav2vec2_objective

ACCUMULATE = 3


def _one_step(module, batch: dict, accumulate: int = ACCUMULATE) -> torch.Tensor:
    """Run the first micro-batch of a step that accumulates ``accumulate`` of them, on one device."""
    module._trainer = SimpleNamespace(accumulate_grad_batches=accumulate, world_size=1, global_rank=0,
                                      global_step=0, num_training_batches=1,
                                      strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    module.train()
    try:
        return module.training_step(batch, 0)
    finally:
        module._trainer = None


def _batch(num: int = 2) -> dict:
    waves = torch.cat([demo_audio(1.0, seed=30 + i) for i in range(num)])
    return {"waveforms": waves, "lengths": torch.full((num,), waves.shape[1]), "labels": None,
            "indices": torch.arange(num), "starts": torch.zeros(num, dtype=torch.long)}


def _spy(monkeypatch, where, name: str, function) -> list:
    calls = []

    def spy(*args, **kwargs):
        result = function(*args, **kwargs)
        calls.append((args, result))
        return result

    monkeypatch.setattr(where, name, spy)
    return calls


@pytest.mark.parametrize("mode", ["fairseq", "torchaudio"])
def test_hubert_step_backwards_the_objectives_unnormalized_loss(bundle_dir, monkeypatch, mode):
    calls = _spy(monkeypatch, hubert_module, "unnormalized_loss", hubert_loss.unnormalized_loss)
    module = hubert_module.HubertContinuedPretraining(
        ModuleOptions(bundle=str(bundle_dir), hubert=HubertOptions(loss_norm=mode, unmasked_weight=0.5)))
    returned = _one_step(module, _batch())

    assert len(calls) == 1
    (terms, weights, called_mode), loss = calls[0]
    assert called_mode == mode and weights == module.weights
    assert torch.equal(returned, loss * ACCUMULATE)  # Lightning divides by ACCUMULATE again
    # what on_before_optimizer_step divides the step's gradient by: the objective's sample size
    size = hubert_loss.sample_size(terms, weights, mode)
    assert module._step_stats[1].item() == size > 0
    assert size == terms.num_masked + (terms.num_unmasked if mode == "fairseq" else 0)


def test_hubert_per_term_step_backwards_the_objectives_normalized_loss(bundle_dir, monkeypatch):
    calls = _spy(monkeypatch, hubert_module, "normalized_loss", hubert_loss.normalized_loss)
    module = hubert_module.HubertContinuedPretraining(
        ModuleOptions(bundle=str(bundle_dir), hubert=HubertOptions(loss_norm="per-term")))
    returned = _one_step(module, _batch(), accumulate=1)  # more would need the data module's step plans

    assert len(calls) == 1
    (terms, totals, weights, mode), loss = calls[0]
    assert mode == "per-term" and weights == module.weights and totals.num_masked == terms.num_masked > 0
    assert torch.equal(returned, loss)


def test_wav2vec2_step_backwards_the_objectives_unnormalized_loss(w2v_bundle_dir, monkeypatch):
    calls = _spy(monkeypatch, wav2vec2_module, "unnormalized_loss", wav2vec2_objective.unnormalized_loss)
    module = wav2vec2_module.Wav2Vec2ContinuedPretraining(ModuleOptions(bundle=str(w2v_bundle_dir)))
    returned = _one_step(module, _batch())

    assert len(calls) == 1
    (terms, weights), loss = calls[0]
    assert weights == module.objective.weights
    assert torch.equal(returned, loss * ACCUMULATE)
    assert module._step_stats[1].item() == wav2vec2_objective.sample_size(terms) == terms.num_masked > 0
