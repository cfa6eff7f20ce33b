"""data2vec 2.0's targets and regression loss, as fairseq's ``Data2VecMultiModel`` computes them.

Pipeline of one batch (fairseq ``Data2VecMultiModel.forward``, audio, ``clone_batch`` = C):

1. the EMA teacher runs on the unmasked batch and returns each main block's layer result (FFN output);
2. :func:`make_targets`: the top ``average_top_k_layers`` of them, each instance-normalised over time (the published
   configs' ``instance_norm_target_layer``), averaged;
3. the student runs on C masked copies of each utterance; the decoder predicts every frame;
4. :func:`regression_loss`: the targets repeated C times, the masked frames of prediction and target compared with
   L2 (``loss_beta`` = 0) or smooth L1, scaled by ``loss_scale`` or 1/sqrt(dim), summed. fairseq's trainer divides
   the gradients by ``sample_size``, the number of masked frames (:class:`RegressionLoss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def make_targets(layer_results: Sequence[Tensor], top_k: int, *, instance_norm_target_layer: bool = False,
                 layer_norm_target_layer: bool = False, batch_norm_target_layer: bool = False,
                 instance_norm_targets: bool = False, layer_norm_targets: bool = False) -> Tensor:
    """The regression targets ``[batch, frames, dim]`` (float32) from the teacher's per-block layer results.

    As fairseq: the statistics of the instance / batch norms run over every frame of the padded batch, padding
    included (the teacher's padded frames are what the encoder computes there)."""
    layers = list(layer_results)[-top_k:]
    if instance_norm_target_layer or batch_norm_target_layer:
        layers = [t.transpose(1, 2) for t in layers]  # BTC -> BCT
        if batch_norm_target_layer:
            layers = [F.batch_norm(t.float(), running_mean=None, running_var=None, training=True) for t in layers]
        if instance_norm_target_layer:
            layers = [F.instance_norm(t.float()) for t in layers]
        layers = [t.transpose(1, 2) for t in layers]
    if layer_norm_target_layer:
        layers = [F.layer_norm(t.float(), t.shape[-1:]) for t in layers]
    y = layers[0].float()  # a fresh tensor whenever a norm ran; fairseq adds into it in place
    y = y.clone() if y is layers[0] else y
    for t in layers[1:]:
        y.add_(t.float())
    y = y.div_(len(layers))
    if layer_norm_targets:
        y = F.layer_norm(y, y.shape[-1:])
    if instance_norm_targets:
        y = F.instance_norm(y.transpose(1, 2)).transpose(1, 2)
    return y


def elementwise_loss(prediction: Tensor, target: Tensor, loss_beta: float = 0.0,
                     loss_scale: float | None = None) -> Tensor:
    """fairseq's ``d2v_loss``: per-element L2 (``loss_beta`` 0) or smooth L1 (``beta=loss_beta``), times
    ``loss_scale`` (None: 1/sqrt(dim)); ``[n, dim]``, unreduced, float32."""
    x = prediction.reshape(-1, prediction.size(-1)).float()
    y = target.reshape(-1, x.size(-1))
    loss = F.mse_loss(x, y, reduction="none") if loss_beta == 0 else \
        F.smooth_l1_loss(x, y, reduction="none", beta=loss_beta)
    scale = loss_scale if loss_scale is not None else 1 / math.sqrt(x.size(-1))
    return loss * scale


@dataclass
class RegressionLoss:
    loss: Tensor
    """The summed loss of the masked frames (fairseq's criterion's ``loss``; its gradient is divided by
    ``sample_size`` before the optimizer step)."""
    sample_size: Tensor
    """The number of masked frames over the C copies."""
    prediction: Tensor | None = None
    """The masked frames' predictions ``[sample_size, dim]``, detached (fairseq's ``pred_var`` is their spread)."""
    target: Tensor | None = None
    """Their targets ``[sample_size, dim]`` (fairseq's ``target_var``)."""


def regression_loss(prediction: Tensor, targets: Tensor, mask: Tensor, *, clone_batch: int = 1,
                    loss_beta: float = 0.0, loss_scale: float | None = None, weight: float = 1.0) -> RegressionLoss:
    """The loss of one batch: ``prediction`` ``[batch * C, frames, dim]`` (the decoder's output for the C masked
    copies, copy-major within each utterance as ``repeat_interleave`` orders them), ``targets`` ``[batch, frames,
    dim]`` (:func:`make_targets`), ``mask`` ``[batch * C, frames]`` (True = masked). ``weight`` is fairseq's
    ``d2v_loss`` coefficient."""
    if clone_batch > 1:
        targets = targets.repeat_interleave(clone_batch, 0)
    masked = mask.bool()
    predicted, wanted = prediction[masked], targets[masked]
    per_element = elementwise_loss(predicted, wanted, loss_beta, loss_scale) * weight
    return RegressionLoss(per_element.float().sum(), masked.sum().long(), predicted.detach().float(),
                          wanted.detach().float())


def kept_positions(mask: Tensor) -> Tensor:
    """``[rows, kept]``: the unmasked positions of each row, ascending (every row has the same number, as fairseq's
    ``require_same_masks`` makes them)."""
    kept = mask.shape[1] - int(mask[0].sum())
    return torch.argsort(mask.to(torch.uint8), dim=1, stable=True)[:, :kept]


def decoder_input(kept: Tensor, keep: Tensor, frames: int, *, noise_std: float, dropout: float,
                  training: bool) -> Tensor:
    """fairseq's ``decoder_input``: the encoder's kept frames (after ``input_dropout``) back at their positions, and
    at every masked position a vector drawn from N(0, ``noise_std``). ``[rows, frames, dim]``."""
    kept = F.dropout(kept, dropout, training=training)
    full = kept.new_empty(kept.shape[0], frames, kept.shape[-1]).normal_(0, noise_std)
    return full.scatter(1, keep[..., None].expand(-1, -1, kept.shape[-1]), kept)


@dataclass(frozen=True)
class Data2Vec2Objective:
    """The options of the loss, named as in the bundle's ``objective`` (fairseq's config)."""

    average_top_k_layers: int = 8
    clone_batch: int = 1
    instance_norm_target_layer: bool = False
    layer_norm_target_layer: bool = False
    batch_norm_target_layer: bool = False
    instance_norm_targets: bool = False
    layer_norm_targets: bool = False
    loss_beta: float = 0.0
    loss_scale: float | None = None
    d2v_loss: float = 1.0
    mask_noise_std: float = 0.01
    decoder_input_dropout: float = 0.1

    @classmethod
    def from_bundle(cls, objective: dict, decoder_args: dict) -> "Data2Vec2Objective":
        """From a bundle's ``objective`` and ``pretrain_args["decoder"]`` (fairseq's defaults where they are silent)."""
        names = set(cls.__dataclass_fields__) - {"decoder_input_dropout"}
        values = {k: objective[k] for k in names if k in objective and (objective[k] is not None or k == "loss_scale")}
        return cls(**values, decoder_input_dropout=float(decoder_args.get("input_dropout", 0.1)))


def data2vec2_loss(model: nn.Module, waveforms: Tensor, lengths: Tensor | None, mask: Tensor,
                   options: Data2Vec2Objective) -> RegressionLoss:
    """One batch's loss through a :class:`~bundles.data2vec2.model.Data2Vec2PretrainModel` (``student``, ``decoder``,
    ``teacher``), equal to fairseq's ``Data2VecMultiModel.forward`` with the same ``mask`` (``[batch * clone_batch,
    frames]``, see :func:`continue_pt.data2vec2.masking.clone_masks`). Waveforms are normalised already; the
    teacher runs without gradients and in eval mode (no dropout, no layer drop), as fairseq runs it."""
    from bundles.data2vec2.model import padding_mask_of

    student, teacher = model.student, model.teacher
    features, frame_lengths = student.local_features(waveforms, lengths)
    frames = features.shape[1]
    padding = padding_mask_of(frame_lengths, frames)
    teacher.eval()  # fairseq: tm.eval() before every teacher forward
    with torch.no_grad():
        _, results = teacher(features.detach(), padding)
        targets = make_targets(results, options.average_top_k_layers,
                               instance_norm_target_layer=options.instance_norm_target_layer,
                               layer_norm_target_layer=options.layer_norm_target_layer,
                               batch_norm_target_layer=options.batch_norm_target_layer,
                               instance_norm_targets=options.instance_norm_targets,
                               layer_norm_targets=options.layer_norm_targets)
    copies = options.clone_batch
    x = features.repeat_interleave(copies, 0) if copies > 1 else features
    copy_padding = padding.repeat_interleave(copies, 0) if padding is not None and copies > 1 else padding
    keep = kept_positions(mask)
    outputs, _ = student.encoder.forward_kept(x, keep, copy_padding)
    kept = student.encoder.final(outputs[-1])
    prediction = model.decoder(decoder_input(kept, keep, frames, noise_std=options.mask_noise_std,
                                             dropout=options.decoder_input_dropout, training=model.training))
    return regression_loss(prediction, targets, mask, clone_batch=copies, loss_beta=options.loss_beta,
                           loss_scale=options.loss_scale, weight=options.d2v_loss)
