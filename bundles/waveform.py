"""Waveform normalisation as fairseq does it, and the model wrapper that applies it.

fairseq's audio datasets normalise each utterance over its own samples (``F.layer_norm(wav, wav.shape)``)
before padding. torchaudio's pipeline wrapper normalises over the whole batch tensor, which is the same for
one utterance but not for a padded batch; here each utterance is normalised over its valid samples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def normalize_waveforms(waveforms: Tensor, lengths: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Zero mean, unit variance per utterance over its first ``lengths[b]`` samples; padding stays zero."""
    if lengths is None:
        return F.layer_norm(waveforms, waveforms.shape[-1:], eps=eps)
    positions = torch.arange(waveforms.shape[-1], device=waveforms.device)
    valid = (positions[None, :] < lengths[:, None]).to(waveforms.dtype)
    count = lengths.to(waveforms.dtype).clamp(min=1)[:, None]
    mean = (waveforms * valid).sum(-1, keepdim=True) / count
    var = (((waveforms - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    return (waveforms - mean) / torch.sqrt(var + eps) * valid


class NormalizingWav2Vec2Model(nn.Module):
    """A torchaudio ``Wav2Vec2Model`` that normalises its input waveforms first (like torchaudio's pipelines)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        return self.model(normalize_waveforms(waveforms, lengths), lengths)

    def extract_features(self, waveforms: Tensor, lengths: Tensor | None = None,
                         num_layers: int | None = None) -> tuple[list[Tensor], Tensor | None]:
        return self.model.extract_features(normalize_waveforms(waveforms, lengths), lengths, num_layers)
