"""The one frozen teacher: a bundle's encoder cut after a layer, in eval mode, normalising its input when its bundle
says, giving that layer's features in fp32 (:class:`Teacher`); and HuBERT's targets made online from it, the nearest
k-means centroid of each frame (:class:`OnlineTargets`). ``kmeans fit``, ``labels dump``, ``kmeans check`` and
training all run this one, so their features and labels agree.

Online targets are computed per batch on the batch's device, nothing is written to disk. The teacher sees exactly
the frames the student sees (same waveform crop, same convolutional front end), so the labels are aligned at the
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
from continue_pt.device_batch import padded
from continue_pt.frames import conv_layers_of, conv_output_frames

IGNORE_LABEL = -100  # padded frames (torch's cross_entropy ignore_index)


def _in_fp32_without_needless_lengths(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The teacher's ``forward`` in fp32, even inside a bf16 autocast region (Lightning's bf16-mixed), and with
    ``lengths`` only when some utterance is padded.

    fp32: ``labels dump`` and ``kmeans fit`` work in fp32, and a bf16 teacher gives other clusters on a share of the
    frames (``bench/RESULTS.md``, section bench_teacher_precision), so online targets would disagree with the
    offline labels of the same audio. Lengths: with them torchaudio builds an additive ``[B, 1, T, T]`` attention
    mask, which rules out flash attention (training batches are cropped, never padded). ``lengths`` is best given
    on the CPU: checking it is then free.
    """

    @functools.wraps(forward)
    def wrapped(self: "Teacher", waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = lengths.to(waveforms.device, non_blocking=True) if padded(lengths, waveforms.shape[-1]) else None
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            return forward(self, waveforms, lengths)

    return wrapped


class Teacher(nn.Module):
    """Layer-``layer`` features ``[batch, frames, D]`` of raw waveforms from ``teacher`` (a torchaudio
    ``Wav2Vec2Model``), cut after that layer (1-based, fairseq numbering) and frozen.

    Args:
        teacher: the encoder; its layers after ``layer`` are dropped (they would cost memory for nothing).
        layer: the layer whose output is taken.
        normalize_waveform: whether the teacher expects normalised waveforms (its bundle says).
        input_normalized: the waveforms it is given are already normalised, each over its *whole* utterance before
            cropping (the training data of a student that normalises too, as fairseq's dataset does): they are then
            used as they are, so the teacher sees exactly the student's input and what fairseq's label dump sees,
            instead of each crop normalised again over itself.
    """

    def __init__(self, teacher: nn.Module, layer: int, normalize_waveform: bool, input_normalized: bool = False):
        super().__init__()
        num_layers = len(teacher.encoder.transformer.layers)
        if not 1 <= int(layer) <= num_layers:
            raise ValueError(f"layer {layer} is outside the teacher's 1..{num_layers} (1-based, fairseq numbering)")
        self.teacher = teacher.eval().requires_grad_(False)
        del self.teacher.encoder.transformer.layers[int(layer):]
        self.layer = int(layer)
        self.normalize_waveform = normalize_waveform
        self.input_normalized = input_normalized

    @classmethod
    def from_bundle(cls, bundle: Bundle, layer: int) -> "Teacher":
        """The bundle's encoder as teacher, normalising as the bundle says."""
        return cls(_encoder_of(bundle), layer, bundle.normalize_waveform)

    def frames(self, num_samples: int) -> int:
        """Feature frames of ``num_samples`` samples (0: too short for one)."""
        return conv_output_frames(conv_layers_of(self.teacher), num_samples)

    @property
    def width(self) -> int:
        """The dimension of the features."""
        return int(self.teacher.encoder.transformer.layers[0].attention.embed_dim)

    def train(self, mode: bool = True) -> "Teacher":
        super().train(mode)
        self.teacher.eval()  # the teacher never trains: no dropout, no layer drop
        return self

    @_in_fp32_without_needless_lengths
    @torch.inference_mode()
    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(features [batch, frames, D], valid frames per utterance or None)``."""
        if self.normalize_waveform and not self.input_normalized:
            waveforms = normalize_waveforms(waveforms, lengths)
        layers, frame_lengths = self.teacher.extract_features(waveforms, lengths, num_layers=self.layer)
        return layers[-1], frame_lengths

    def features(self, waveform: Tensor) -> Tensor:
        """``[frames, D]`` for one whole utterance ``[T]``."""
        return Teacher.forward(self, waveform[None])[0][0]


def _encoder_of(bundle: Bundle) -> nn.Module:
    model = bundle.get_model()
    return model.model if isinstance(model, NormalizingWav2Vec2Model) else model


class OnlineTargets(Teacher):
    """Labels ``[batch, frames]`` for raw waveforms: the nearest of ``kmeans``' centroids to each frame of the
    :class:`Teacher` ``teacher`` cut at ``kmeans.layer``; padded frames get :data:`IGNORE_LABEL`."""

    def __init__(self, teacher: nn.Module, kmeans: KMeansModel, normalize_waveform: bool,
                 input_normalized: bool = False):
        if kmeans.layer is None:
            raise ValueError("the k-means model does not say which layer it clusters")
        num_layers = len(teacher.encoder.transformer.layers)
        if not 1 <= kmeans.layer <= num_layers:
            raise ValueError(f"k-means layer {kmeans.layer} is outside the teacher's 1..{num_layers}")
        super().__init__(teacher, kmeans.layer, normalize_waveform, input_normalized)
        if kmeans.dim != self.width:
            raise ValueError(f"k-means centroids have {kmeans.dim} dimensions, the teacher's layers {self.width}")
        self.kmeans = kmeans

    @classmethod
    def from_bundle(cls, bundle: Bundle, kmeans: KMeansModel | None = None) -> "OnlineTargets":
        """The bundle's encoder as teacher, with ``kmeans`` or else the bundle's own k-means."""
        kmeans = kmeans if kmeans is not None else bundle.get_kmeans()
        return cls(_encoder_of(bundle), kmeans, bundle.normalize_waveform)

    @_in_fp32_without_needless_lengths
    @torch.inference_mode()
    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        features, frame_lengths = super().forward(waveforms, lengths)
        labels = self.kmeans(features)  # the k-means keeps a copy of its centroids on each device it sees
        if frame_lengths is not None:
            positions = torch.arange(labels.shape[1], device=labels.device)
            labels = labels.masked_fill(positions[None, :] >= frame_lengths[:, None], IGNORE_LABEL)
        return labels
