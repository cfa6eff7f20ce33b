"""HuBERT targets made online: a frozen teacher runs to its k-means layer and the nearest centroid labels each frame.

Nothing is written to disk: labels are computed per batch on the batch's device. The teacher sees exactly the
frames the student sees (same waveform crop, same convolutional front end), so the labels are aligned at the
feature rate (50 Hz for 16 kHz audio) including the last frame, as fairseq's dumped labels are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bundles.kmeans import KMeansModel
from bundles.loading import Bundle
from bundles.waveform import NormalizingWav2Vec2Model, normalize_waveforms

IGNORE_LABEL = -100  # padded frames (torch's cross_entropy ignore_index)


def padded(lengths: Tensor | None, num_samples: int) -> bool:
    """Whether any utterance of a ``[batch, num_samples]`` batch is shorter than ``num_samples`` (a host sync
    when ``lengths`` is on a GPU; free on the CPU, where the data loader makes it)."""
    return lengths is not None and bool((lengths < num_samples).any())


def _in_fp32_without_needless_lengths(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``OnlineTargets.forward`` in fp32, even inside a bf16 autocast region (Lightning's bf16-mixed), and with
    ``lengths`` only when some utterance is padded.

    fp32: ``labels dump`` and ``kmeans fit`` work in fp32, and a bf16 teacher gives other clusters on a share of the
    frames (``bench/RESULTS.md``, section bench_teacher_precision), so online targets would disagree with the
    offline labels of the same audio. Lengths: with them torchaudio builds an additive ``[B, 1, T, T]`` attention
    mask, which rules out flash attention (training batches are cropped, never padded). ``lengths`` is best given
    on the CPU: checking it is then free.
    """

    @functools.wraps(forward)
    def wrapped(self: "OnlineTargets", waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = lengths.to(waveforms.device, non_blocking=True) if padded(lengths, waveforms.shape[-1]) else None
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            return forward(self, waveforms, lengths)

    return wrapped


class OnlineTargets(nn.Module):
    """Labels ``[batch, frames]`` for raw waveforms from ``teacher`` (a torchaudio ``Wav2Vec2Model``) and ``kmeans``.

    Args:
        teacher: the encoder whose layer ``kmeans.layer`` (1-based) output is clustered; frozen here.
        kmeans: centroids fitted on that layer's output.
        normalize_waveform: whether the teacher expects normalised waveforms (its bundle says).
        input_normalized: the waveforms it is given are already normalised, each over its *whole* utterance before
            cropping (the training data of a student that normalises too, as fairseq's dataset does): they are then
            used as they are, so the teacher sees exactly the student's input and what fairseq's label dump sees,
            instead of each crop normalised again over itself.
    """

    def __init__(self, teacher: nn.Module, kmeans: KMeansModel, normalize_waveform: bool,
                 input_normalized: bool = False):
        super().__init__()
        if kmeans.layer is None:
            raise ValueError("the k-means model does not say which layer it clusters")
        num_layers = len(teacher.encoder.transformer.layers)
        if not 1 <= kmeans.layer <= num_layers:
            raise ValueError(f"k-means layer {kmeans.layer} is outside the teacher's 1..{num_layers}")
        width = teacher.encoder.transformer.layers[0].attention.embed_dim
        if kmeans.dim != width:
            raise ValueError(f"k-means centroids have {kmeans.dim} dimensions, the teacher's layers {width}")
        self.teacher = teacher.eval().requires_grad_(False)
        # Only the layers up to the k-means layer ever run; keeping the rest would cost memory for nothing.
        del self.teacher.encoder.transformer.layers[kmeans.layer:]
        self.kmeans = kmeans
        self.normalize_waveform = normalize_waveform
        self.input_normalized = input_normalized

    @classmethod
    def from_bundle(cls, bundle: Bundle, kmeans: KMeansModel | None = None) -> "OnlineTargets":
        """The bundle's encoder as teacher, with ``kmeans`` or else the bundle's own k-means."""
        model = bundle.get_model()
        teacher = model.model if isinstance(model, NormalizingWav2Vec2Model) else model
        return cls(teacher, kmeans if kmeans is not None else bundle.get_kmeans(), bundle.normalize_waveform)

    def train(self, mode: bool = True) -> "OnlineTargets":
        super().train(mode)
        self.teacher.eval()  # the teacher never trains: no dropout, no layer drop
        return self

    @_in_fp32_without_needless_lengths
    @torch.inference_mode()
    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.normalize_waveform and not self.input_normalized:
            waveforms = normalize_waveforms(waveforms, lengths)
        layers, frame_lengths = self.teacher.extract_features(waveforms, lengths, num_layers=self.kmeans.layer)
        labels = self.kmeans(layers[-1])  # the k-means keeps a copy of its centroids on each device it sees
        if frame_lengths is not None:
            positions = torch.arange(labels.shape[1], device=labels.device)
            labels = labels.masked_fill(positions[None, :] >= frame_lengths[:, None], IGNORE_LABEL)
        return labels
