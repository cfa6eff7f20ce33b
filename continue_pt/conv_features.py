"""What both pre-training objectives do first, as fairseq does it: the convolutional features, with
``feature_grad_mult`` scaling their gradient (0 freezes the extractor), and fairseq's fp32 promotion."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchaudio.models.wav2vec2.components import GradMultiply


def at_least_fp32(t: Tensor) -> Tensor:
    """fairseq's ``.float()`` for half/bfloat16, without lowering float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def conv_features(feature_extractor: nn.Module, waveforms: Tensor, lengths: Tensor | None,
                  grad_mult: float) -> tuple[Tensor, Tensor | None]:
    """``feature_extractor(waveforms, lengths)`` with fairseq's ``GradMultiply``; no graph at all when 0."""
    if grad_mult > 0:
        features, frame_lengths = feature_extractor(waveforms, lengths)
        if grad_mult != 1.0:
            features = GradMultiply.apply(features, grad_mult)
        return features, frame_lengths
    with torch.no_grad():
        return feature_extractor(waveforms, lengths)
