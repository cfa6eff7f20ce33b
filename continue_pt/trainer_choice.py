"""What ``run_pretraining`` chooses for Lightning's ``Trainer`` when the user leaves it open: the distributed
strategy, the precision and the determinism flag. Plain functions of the options, the model and the hardware, so
each choice is testable without a GPU (the CUDA queries are looked up at call time and can be monkeypatched).

* Strategy: Lightning's ``"auto"`` is DDP with ``find_unused_parameters=False`` on more than one device. torchaudio's
  layer drop skips whole transformer layers per rank and a frozen feature extractor (``feature_grad_mult`` 0 or
  ``freeze_feature_extractor_steps``) runs without a graph, so some parameters get no gradient: DDP's reducer then
  waits for them and every rank hangs. When that can happen we pick ``ddp_find_unused_parameters_true`` (DDP walks
  the autograd graph after each forward to mark the unused ones; its cost is in ``bench/RESULTS.md``).
* Precision: ``bf16-mixed`` only on a GPU that computes in bf16 (compute capability >= 8.0: A100, H100, RTX 30xx
  and later). V100 and T4 only emulate bf16 (slower than fp32); there we train in ``32-true`` and say so. fp16
  (``16-mixed``) stays an explicit choice: it is known to go NaN on these models.
* Determinism: ``"warn"`` on CPU (a resumed CPU run equals an uninterrupted one, tested); off on CUDA, where the
  deterministic kernels are slower and GPU runs are not bit-exact anyway (atomics in cuDNN/cuBLAS reductions).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

FIND_UNUSED = "ddp_find_unused_parameters_true"
"""Lightning's registered name of ``DDPStrategy(find_unused_parameters=True)``."""


def on_cuda(accelerator: str) -> bool:
    """Whether ``accelerator`` (Lightning's name) means a CUDA GPU here."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def device_count(accelerator: str, devices: int | str | list[int]) -> int:
    """How many processes Lightning will start for ``devices`` (its syntax: 2, "2", "0,1", [0, 1], -1, "auto")."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            devices = int(text)
        else:  # "auto": every GPU, else one CPU process
            return max(torch.cuda.device_count(), 1) if on_cuda(accelerator) else 1
    if devices == -1:
        return max(torch.cuda.device_count(), 1) if on_cuda(accelerator) else 1
    return int(devices)


def unused_parameter_reasons(module: nn.Module, freeze_feature_extractor_steps: int = 0) -> list[str]:
    """Why some trainable parameters of a continued pre-training module can get no gradient in a step."""
    reasons = []
    student = getattr(module, "student", None)
    transformer = getattr(getattr(getattr(student, "wav2vec2", None), "encoder", None), "transformer", None)
    layer_drop = float(getattr(transformer, "layer_drop", 0.0) or 0.0)
    if layer_drop > 0:
        reasons.append(f"layer drop {layer_drop:g} skips whole transformer layers")
    objective = getattr(module, "objective", None)  # wav2vec 2.0 keeps it there, HuBERT on the module
    fgm = getattr(objective, "feature_grad_mult", getattr(module, "feature_grad_mult", 1.0))
    if fgm is not None and float(fgm) == 0.0:
        reasons.append("feature_grad_mult 0 freezes the feature extractor")
    own = getattr(module, "unused_parameter_reasons", None)  # a family module that says it itself (data2vec 2.0)
    if callable(own):
        reasons += own()
    if freeze_feature_extractor_steps > 0:
        reasons.append(f"the feature extractor is frozen for the first {freeze_feature_extractor_steps} steps")
    return reasons


def choose_strategy(strategy: Any, accelerator: str, devices: Any, module: nn.Module,
                    freeze_feature_extractor_steps: int = 0, num_nodes: int = 1) -> Any:
    """``strategy`` unless it is ``"auto"`` or ``"ddp"`` and DDP would hang on parameters without gradient (see the
    module docstring): then :data:`FIND_UNUSED`. DDP runs on more than one device in all: ``devices`` on each of
    ``num_nodes`` nodes (Lightning's "auto" is DDP whenever ``num_nodes`` > 1). An explicit ``"ddp"`` is overridden
    too, with a warning: it would hang every rank at the first skipped layer, which no user means to ask for."""
    if strategy not in ("auto", "ddp") or device_count(accelerator, devices) * num_nodes < 2:
        return strategy
    reasons = unused_parameter_reasons(module, freeze_feature_extractor_steps)
    if not reasons:
        return strategy
    if strategy == "ddp":
        logger.warning("--strategy ddp would hang (%s leaves parameters without gradient in some steps): training "
                       "with %s instead", "; ".join(reasons), FIND_UNUSED)
    else:
        logger.info("DDP with find_unused_parameters=True: %s", "; ".join(reasons))
    return FIND_UNUSED


def default_precision(accelerator: str) -> str:
    """``bf16-mixed`` on a GPU with native bf16, ``32-true`` elsewhere (see the module docstring)."""
    if not on_cuda(accelerator):
        return "32-true"
    if native_bf16():
        return "bf16-mixed"
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "this GPU"
    logger.warning("%s has no native bf16 (compute capability < 8.0): training in 32-true; pass --precision "
                   "16-mixed for speed at the risk of NaN losses", name)
    return "32-true"


def native_bf16() -> bool:
    """Whether the current CUDA device computes in bf16 (compute capability >= 8.0), not just emulates it."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8


def default_deterministic(accelerator: str) -> bool | str:
    """``"warn"`` on CPU (exact resume), False on CUDA (see the module docstring)."""
    return False if on_cuda(accelerator) else "warn"
