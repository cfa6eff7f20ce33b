"""Issue 15, item 4: a training step reads nothing back from the device.

No GPU here, so the device is simulated: every tensor the module would move to the device (what its
``transfer_batch_to_device`` sends to another device) becomes an :class:`_OnDevice` tensor, a CPU tensor whose every
derived tensor is one too and whose values read by the host (``item``, ``tolist``, ``bool``, ``int``, ``float``,
boolean indexing, ``nonzero``: each waits for a GPU) are recorded. What stays on the CPU is read for free.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from continue_pt.demo import demo_audio
from continue_pt.hubert.module import HubertContinuedPretraining
from continue_pt.module_options import ModuleOptions
from continue_pt.hubert.options import HubertOptions
from continue_pt.wav2vec2.module import Wav2Vec2ContinuedPretraining

_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"}


class _OnDevice(torch.Tensor):
    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _READS:
            cls.reads.append(name)
        elif name == "__getitem__" and _has_bool_tensor(args[1:]):
            cls.reads.append("boolean index")
        return super().__torch_function__(func, types, args, kwargs or {})


def _has_bool_tensor(items) -> bool:
    for item in items:
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            return True
        if isinstance(item, (tuple, list)) and _has_bool_tensor(item):
            return True
    return False


def _simulated(module, batch: dict) -> dict:
    """The batch as the step sees it on a GPU: what the module moves to the device is _OnDevice."""
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    return {k: v.as_subclass(_OnDevice) if isinstance(v, torch.Tensor) and moved[k].device.type == "meta" else v
            for k, v in batch.items()}


def _step_reads(module, batch: dict) -> list[str]:
    module._trainer = SimpleNamespace(accumulate_grad_batches=1, world_size=1, global_rank=0, global_step=0,
                                      num_training_batches=1, strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    module.train()
    _OnDevice.reads = []
    try:
        module.training_step(_simulated(module, batch), 0)
    finally:
        module._trainer = None
    return list(_OnDevice.reads)


def _batch(num: int = 2) -> dict:
    waves = torch.cat([demo_audio(1.0, seed=10 + i) for i in range(num)])
    return {"waveforms": waves, "lengths": torch.full((num,), waves.shape[1]), "labels": None,
            "indices": torch.arange(num), "starts": torch.zeros(num, dtype=torch.long)}


def test_the_simulation_sees_reads():
    x = torch.arange(4.0).as_subclass(_OnDevice)
    _OnDevice.reads = []
    bool((x * 2 > 3).any()), (x + 1).tolist(), x[x > 1]
    assert _OnDevice.reads == ["__bool__", "tolist", "boolean index"]


def test_lengths_indices_and_starts_stay_on_the_cpu(bundle_dir):
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir)))
    moved = module.transfer_batch_to_device(_batch(), torch.device("meta"), 0)
    assert moved["waveforms"].device.type == "meta"
    assert all(moved[k].device.type == "cpu" for k in ("lengths", "indices", "starts"))


@pytest.mark.parametrize("loss_norm", ["fairseq", "per-term"])
def test_a_hubert_step_with_online_targets_reads_nothing_back(bundle_dir, loss_norm):
    module = HubertContinuedPretraining(ModuleOptions(bundle=str(bundle_dir), hubert=HubertOptions(loss_norm=loss_norm)))
    assert _step_reads(module, _batch()) == []


def test_a_wav2vec2_step_reads_nothing_back(w2v_bundle_dir):
    module = Wav2Vec2ContinuedPretraining(ModuleOptions(bundle=str(w2v_bundle_dir)))
    assert _step_reads(module, _batch()) == []
