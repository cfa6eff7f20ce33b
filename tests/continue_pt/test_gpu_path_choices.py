"""Issue 15, items 6 and 7: the precision and determinism ``pretrain`` picks on CPU and on (monkeypatched) GPUs."""

from __future__ import annotations

import logging

import pytest
import torch

from continue_pt.pretrain import PretrainOptions
from continue_pt.trainer_choice import default_deterministic, default_precision, native_bf16


def _gpu(monkeypatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def _options(**kw) -> PretrainOptions:
    return PretrainOptions(train_data="a", output_dir="b", **kw)


@pytest.mark.parametrize("capability, name", [((7, 0), "Tesla V100"), ((7, 5), "Tesla T4")])
def test_gpus_that_only_emulate_bf16_train_in_fp32_and_say_so(monkeypatch, caplog, capability, name):
    _gpu(monkeypatch, capability, name)
    with caplog.at_level(logging.WARNING, logger="continue_pt.trainer_choice"):
        assert _options().resolved_precision() == "32-true"
    assert name in caplog.text and "32-true" in caplog.text and "16-mixed" in caplog.text
    assert not native_bf16()


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0)])
def test_ampere_and_later_train_in_bf16(monkeypatch, capability):
    _gpu(monkeypatch, capability, "A100")
    assert _options().resolved_precision() == "bf16-mixed"
    assert _options(accelerator="cpu").resolved_precision() == "32-true"  # an explicit CPU run stays fp32


def test_an_explicit_precision_is_kept(monkeypatch):
    _gpu(monkeypatch, (7, 0), "Tesla V100")
    assert _options(precision="bf16-mixed").resolved_precision() == "bf16-mixed"


def test_cpu_keeps_deterministic_warn_and_cuda_turns_it_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _options().resolved_deterministic() == "warn" == default_deterministic("auto")
    assert default_precision("auto") == "32-true"
    _gpu(monkeypatch, (9, 0), "H100")
    assert _options().resolved_deterministic() is False
    assert _options(accelerator="cpu").resolved_deterministic() == "warn"
    assert _options(deterministic=True).resolved_deterministic() is True
