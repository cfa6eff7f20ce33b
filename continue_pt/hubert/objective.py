"""HuBERT's masked-prediction objective as plain functions (no Lightning), equal to fairseq's ``HubertModel``
forward + ``HubertCriterion``: the forward and its logits here, the loss terms and their normalisation in
:mod:`continue_pt.hubert.loss`.

One optimizer step = micro-batches ``i`` (gradient accumulation, data-parallel ranks)::

    out_i   = hubert_forward(model, waveforms_i, lengths_i, labels_i, mask_i, ...)  # logits, penalty
    terms_i = hubert_loss_terms(out_i)                                               # CE sums, counts, accuracy
    totals  = StepTotals over every micro-batch of the step (all ranks)              # known before any backward
    loss_i  = normalized_loss(terms_i, totals, weights, mode)                        # backward this

and the gradients summed over ``i`` are the step's gradient (the caller undoes Lightning's ``1/N`` accumulation
scaling and DDP's averaging). The masks are drawn on the data side (:mod:`continue_pt.masking`), so ``totals``
can be counted from them (:meth:`~continue_pt.hubert.loss.StepTotals.of_masks`) before the first backward.

How this differs from the modules' own ``forward``:

* Labels: fairseq's ``forward_targets`` trims the conv features to the label length (at a label rate equal to
  the frame rate, the published setting) and ``forward_padding_mask`` then splits the *sample* padding mask
  into that many equal chunks: a frame is padding only when its whole chunk is. That can leave a frame more
  than torchaudio's conv-length formula, and it depends on the label length. :func:`hubert_frame_padding_mask`
  does the same, and so does :func:`hubert_forward`.
* Logits: fairseq's ``compute_nce`` scores each frame against ``[positive, every row]`` with the positive's
  own row set to ``-inf`` and takes class 0; that is cross-entropy over the plain row logits with the target
  row as class (``tests/continue_pt/test_hubert_objective.py`` proves it). fairseq's softmax includes
  the label rows of the dictionary's special symbols (``<s> <pad> </s> <unk>``); a bundle keeps them in
  ``bundle.fairseq_extras()["label_embeddings_non_cluster"]`` and ``extra_label_embeddings`` appends them as
  classes that are never targets. Cosines are computed as normalised matrix products in fp32 (memory
  ``[frames, classes]`` rather than fairseq's ``[classes, frames, dim]``), equal to fairseq's to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchaudio.models import HuBERTPretrainModel

from continue_pt.frames import at_least_fp32, conv_features
from continue_pt.device_batch import to_device

__all__ = [
    "HubertOutputs",
    "hubert_forward",
    "hubert_frame_padding_mask",
    "label_logits",
]


# ------------------------------------------------------------------------------------------------ frames


def hubert_frame_padding_mask(lengths: Tensor, num_samples: int, num_frames: int) -> Tensor:
    """fairseq's ``HubertModel.forward_padding_mask`` from sample lengths: ``[batch, num_frames]``, True = padding.

    fairseq cuts the (end-padded) sample mask of a batch of ``num_samples`` into ``num_frames`` chunks of
    ``num_samples // num_frames`` samples (dropping the remainder) and pads a frame only if its whole chunk is
    padding, i.e. frame ``t`` is padding iff ``t * (num_samples // num_frames) >= length``. ``num_frames`` is
    the frame count after the labels trimmed it (see :func:`hubert_forward`).
    """
    if num_frames <= 0 or num_samples < num_frames:
        raise ValueError(f"cannot split {num_samples} samples into {num_frames} frames")
    chunk = num_samples // num_frames
    starts = torch.arange(num_frames, device=lengths.device) * chunk
    return starts[None, :] >= lengths.reshape(-1, 1)


# ------------------------------------------------------------------------------------------------ forward


@dataclass
class HubertOutputs:
    """What the model predicts for one micro-batch.

    Attributes:
        logits_masked: ``[num_masked, K + E]`` cosine / ``logit_temp`` of each masked, unpadded frame (batch-major
            order) against every class: column ``c`` is cluster ``c``, the last ``E`` columns are the extra
            (never-target) rows. None with ``skip_masked``.
        targets_masked: ``[num_masked]`` cluster ids (None with ``skip_masked``).
        logits_unmasked, targets_unmasked: the same for unmasked, unpadded frames (None with ``skip_nomask``).
        feature_penalty: scalar, fp32 (float64 for a float64 model): mean of the squared conv features over
            ``[batch, frames, channels]`` (padded frames included), fairseq's ``features_pen``. Its gradient into
            the extractor is scaled by ``feature_grad_mult`` too.
        num_feature_frames: ``batch * frames``, the frames ``feature_penalty`` averages over.
    """

    logits_masked: Tensor | None
    targets_masked: Tensor | None
    logits_unmasked: Tensor | None
    targets_unmasked: Tensor | None
    feature_penalty: Tensor
    num_feature_frames: int


def label_logits(projected: Tensor, label_embeddings: Tensor, logit_temp: float) -> Tensor:
    """``cos(projected[s], label_embeddings[j]) / logit_temp`` as ``[S, classes]``, in fp32 or better (also under
    autocast), with ``torch.cosine_similarity``'s ``eps`` = 1e-8 on each norm."""
    with torch.autocast(device_type=projected.device.type, enabled=False):
        x = F.normalize(at_least_fp32(projected), dim=-1, eps=1e-8)
        e = F.normalize(at_least_fp32(label_embeddings).to(x.dtype), dim=-1, eps=1e-8)
        return (x @ e.t()) / logit_temp


def hubert_forward(
    model: HuBERTPretrainModel,
    waveforms: Tensor,
    lengths: Tensor | None,
    labels: Tensor,
    mask: Tensor,
    *,
    extra_label_embeddings: Tensor | None = None,
    logit_temp: float = 0.1,
    feature_grad_mult: float | None = None,
    channel_mask: Tensor | None = None,
    skip_masked: bool | None = None,
    skip_nomask: bool | None = None,
    unmasked_grad: bool = True,
    check_labels: bool = True,
) -> HubertOutputs:
    """Run torchaudio's HuBERT modules as fairseq's ``HubertModel.forward`` runs its own, with a given mask.

    Steps (fairseq's): conv features (gradient scaled by ``feature_grad_mult``; no gradient if it is 0) ->
    trimmed to the label length -> ``feature_penalty`` -> layer norm, projection, input dropout, padded frames
    zeroed -> masked (unpadded) frames replaced by the mask embedding -> masked channels zeroed -> transformer
    (padded frames masked in attention) -> ``final_proj`` of masked / unmasked unpadded frames -> cosine logits
    against ``label_embeddings`` (+ ``extra_label_embeddings``). The model's own mask generator is not used.

    Args:
        model: e.g. ``bundle.get_pretrain_model()`` (train mode for dropout and layer drop, as fairseq trains).
        waveforms: ``[batch, samples]``, already normalised if the model expects it
            (``bundle.normalize_waveform``), zeros after each length.
        lengths: valid samples per utterance ``[batch]``, or None when nothing is padded.
        labels: ``[batch, label_frames]`` cluster ids at the frame rate. Features are trimmed to
            ``min(conv frames, label_frames)`` frames (fairseq's ``forward_targets`` at label rate = frame rate;
            labels past the conv frames are ignored). Values at padded frames are never read.
        mask: ``[batch, frames]`` bool time mask for those frames (True = masked), e.g. from
            :func:`continue_pt.masking.time_mask`; padded frames are never treated as masked.
        extra_label_embeddings: ``[E, final_dim]`` rows appended to the softmax as classes that are never
            targets (fairseq's special-symbol rows, for exact fairseq parity); None for a ``K``-way softmax.
        logit_temp: fairseq's ``logit_temp`` (``bundle.config.objective["logit_temp"]``).
        feature_grad_mult: gradient scale of the conv feature extractor (fairseq's: 1.0 none, 0 freezes it).
            None: the model's ``feature_grad_mult`` (where None means 1.0). A bundle keeps fairseq's value,
            including 0, in ``bundle.config.objective["feature_grad_mult"]``.
        channel_mask: ``[batch, encoder_embed_dim]`` bool, channels zeroed in every frame
            (:func:`continue_pt.masking.channel_mask`); None for none (the published setting).
        skip_masked, skip_nomask: compute no masked / unmasked logits. Default: the model's logit generator's.
        unmasked_grad: False computes the unmasked logits without a graph (for their accuracy only: their loss
            weight is 0, fairseq's default), which saves the memory and backward of a ``[frames, classes]`` matrix.
        check_labels: check that every unpadded frame's label is a cluster id (a host sync on a GPU). False for
            labels known to be cluster ids (a k-means' of an unpadded batch).

    ``mask`` and ``channel_mask`` are best given on the CPU (as :mod:`continue_pt.masking` draws them): they are
    uploaded without blocking, and with no padding the masked frames are picked by indices found on the CPU
    instead of a boolean index on the GPU (which waits for it).

    Raises:
        ValueError: for inconsistent shapes, and for an unpadded frame whose label is not a cluster id
            (e.g. an ignore label).
    """
    wav2vec2 = model.wav2vec2
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be [batch, samples], got {tuple(waveforms.shape)}")
    batch, num_samples = waveforms.shape
    if labels.dim() != 2 or labels.shape[0] != batch:
        raise ValueError(f"labels must be [batch={batch}, frames], got {tuple(labels.shape)}")
    if lengths is not None and tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must be [batch={batch}], got {tuple(lengths.shape)}")
    if feature_grad_mult is None:
        feature_grad_mult = model.feature_grad_mult
    grad_mult = 1.0 if feature_grad_mult is None else float(feature_grad_mult)
    skip_masked = model.logit_generator.skip_masked if skip_masked is None else skip_masked
    skip_nomask = model.logit_generator.skip_nomask if skip_nomask is None else skip_nomask

    # fairseq's forward_features
    features, _ = conv_features(wav2vec2.feature_extractor, waveforms, None, grad_mult)

    # fairseq's forward_targets (label rate = frame rate)
    num_frames = min(features.shape[1], labels.shape[1])
    features = features[:, :num_frames]
    labels = labels[:, :num_frames]
    if tuple(mask.shape) != (batch, num_frames):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [batch={batch}, frames={num_frames}] "
                         f"(min of {features.shape[1]} conv frames and {labels.shape[1]} label frames)")
    feature_penalty = at_least_fp32(features).pow(2).mean()

    if lengths is None:
        valid = torch.ones(batch, num_frames, dtype=torch.bool, device=features.device)
        frame_lengths = None
    else:
        valid = ~hubert_frame_padding_mask(lengths.to(features.device), num_samples, num_frames)
        frame_lengths = valid.sum(dim=1)
    x, attention_mask = wav2vec2.encoder._preprocess(features, frame_lengths)

    num_clusters = model.logit_generator.label_embeddings.shape[0]
    outside = ((labels < 0) | (labels >= num_clusters)) & valid.to(labels.device)
    if check_labels and bool(outside.any()):  # one sync on a GPU
        b, t = (int(v) for v in outside.nonzero()[0])
        raise ValueError(f"label {int(labels[b, t])} at frame {t} of utterance {b} is not a cluster id "
                         f"(0..{num_clusters - 1}); every unpadded frame needs one. fairseq's frame padding "
                         f"(hubert_frame_padding_mask) can count one frame more than the conv-length formula")

    # frames picked by indices found on the CPU (no padding): no boolean indexing on the GPU
    host_mask = mask.bool() if mask.device.type == "cpu" and lengths is None else None
    mask = to_device(mask.bool(), x.device)
    masked = mask & valid
    unmasked = ~mask & valid
    x = torch.where(masked[..., None], model.mask_generator.mask_embedding.to(x.dtype), x)
    if channel_mask is not None:
        if tuple(channel_mask.shape) != (batch, x.shape[-1]):
            raise ValueError(f"channel_mask has shape {tuple(channel_mask.shape)}, expected {(batch, x.shape[-1])}")
        x = x.masked_fill(to_device(channel_mask.bool(), x.device)[:, None, :], 0.0)
    x = wav2vec2.encoder.transformer(x, attention_mask=attention_mask)

    logit_generator = model.logit_generator
    embeddings = logit_generator.label_embeddings
    if extra_label_embeddings is not None:
        if extra_label_embeddings.dim() != 2 or extra_label_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(f"extra_label_embeddings must be [E, {embeddings.shape[1]}], "
                             f"got {tuple(extra_label_embeddings.shape)}")
        embeddings = torch.cat([embeddings, extra_label_embeddings.to(embeddings.dtype)], dim=0)

    def predict(frames: Tensor, host_frames: Tensor | None) -> tuple[Tensor, Tensor]:
        if host_frames is not None:  # the same frames in the same (batch-major) order
            b, t = to_device(host_frames.nonzero().T.contiguous(), x.device)
            rows, targets = x[b, t], labels[b, t]
        else:
            rows, targets = x[frames], labels[frames]
        return label_logits(logit_generator.final_proj(rows), embeddings, logit_temp), targets

    logits_m, targets_m = (None, None) if skip_masked else predict(masked, host_mask)
    with torch.set_grad_enabled(unmasked_grad and torch.is_grad_enabled()):
        logits_u, targets_u = (None, None) if skip_nomask else predict(
            unmasked, ~host_mask if host_mask is not None else None)
    return HubertOutputs(logits_m, targets_m, logits_u, targets_u, feature_penalty, batch * num_frames)
