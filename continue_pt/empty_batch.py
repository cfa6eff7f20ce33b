"""Micro-batches whose files all failed to load (``continue_pt.batching.empty_batch``: no utterance).

Under DDP every rank must take part in every collective of a step: the gradient all-reduce of each backward, the
all-reduce of the step's statistics (and, for per-term normalisation, of its planned mask counts). A rank that
skipped its empty micro-batch would leave the others waiting forever. So an empty micro-batch still "trains": it
returns :func:`zero_loss` (a zero gradient for every trainable parameter, so DDP's reducer sees them all) and zero
statistics, and adds nothing to the step: the step's gradient is the one of the micro-batches that loaded, divided
by their sample size. A step in which every micro-batch of every rank was empty makes no update
(:func:`skip_update`): AdamW would otherwise still move the weights (decoupled weight decay, momentum).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)


def is_empty(batch: dict | None) -> bool:
    """Whether a training batch holds no utterance (``None`` too, for callers that pass one)."""
    return batch is None or batch["waveforms"].shape[0] == 0


def zero_loss(module: nn.Module) -> Tensor:
    """A scalar 0 whose backward gives every trainable parameter of ``module`` a zero gradient."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return torch.zeros(())
    return torch.stack([p.sum() for p in params]).sum() * 0.0


def skip_update(module: nn.Module, step: int) -> None:
    """No update this step: every gradient is dropped (AdamW skips parameters without one)."""
    for p in module.parameters():
        p.grad = None
    logger.warning("step %d: every file of the step failed to load on every device; the step makes no update", step)
