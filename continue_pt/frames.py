"""The convolutional front end, as fairseq runs it: its features, with ``feature_grad_mult`` scaling their gradient
(0 freezes the extractor), fairseq's fp32 promotion, and the one count of the frames it makes of a waveform."""

from __future__ import annotations

from collections.abc import Sequence

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


def conv_output_frames(conv_layers: Sequence[Sequence[int]], num_samples: int) -> int:
    """Frames the feature extractor makes of ``num_samples`` samples (0 when shorter than its receptive field);
    ``conv_layers`` as ``(channels, kernel, stride)`` (a bundle's ``encoder_args["extractor_conv_layer_config"]``,
    or :func:`conv_layers_of` a model)."""
    frames = int(num_samples)
    for _, kernel, stride in conv_layers:
        frames = (frames - int(kernel)) // int(stride) + 1
    return max(frames, 0)


def conv_stride(conv_layers: Sequence[Sequence[int]]) -> int:
    """Samples per frame: the product of the strides."""
    stride = 1
    for _, _, layer_stride in conv_layers:
        stride *= int(layer_stride)
    return stride


def conv_layers_of(model: nn.Module) -> list[tuple[int, int, int]]:
    """``(channels, kernel, stride)`` of each convolution of a torchaudio ``Wav2Vec2Model``'s feature extractor."""
    return [(block.conv.out_channels, block.conv.kernel_size[0], block.conv.stride[0])
            for block in model.feature_extractor.conv_layers]
