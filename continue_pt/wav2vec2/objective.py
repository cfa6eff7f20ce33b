"""wav2vec 2.0's contrastive objective as plain functions (no Lightning), equal to fairseq's ``Wav2Vec2Model``
forward + ``Wav2vecCriterion`` (``infonce=True``) + the trainer's division by the step's sample size.

One optimizer step = micro-batches ``i`` (gradient accumulation, data-parallel ranks)::

    out_i   = wav2vec2_forward(model, waveforms_i, lengths_i, mask_i, ...)   # logits, perplexities, penalty
    terms_i = wav2vec2_loss_terms(out_i)                                     # InfoNCE sum, diversity, counts
    total   = sum of terms_i.num_masked over the step (= the masks' counts, known before any backward)
    loss_i  = normalized_wav2vec2_loss(terms_i, total)                       # backward this

How it runs torchaudio's modules (fairseq's order, so a train-mode run with the same torch RNG state draws the
same dropout masks and negatives): conv features -> ``GradMultiply`` -> ``features_pen`` -> feature layer norm
(the normed features are kept, dropped out with ``dropout_features``, for the quantizer) -> projection ->
``dropout_input`` -> masked frames replaced by the mask embedding -> transformer -> ``final_proj`` of the masked
frames; quantizer on the kept features of the masked frames -> ``project_q`` -> targets; negatives drawn from the
targets of the other masked frames of the same utterance -> cosine / ``logit_temp``.

Differences from fairseq, none of which changes a number fairseq computes:

* fairseq needs the same number of masked frames in every utterance (``require_same_masks``; it ``view``\\ s the
  masked frames as ``[B, M, C]``). With equal counts the negatives are drawn with fairseq's exact index
  arithmetic (same RNG calls, same quirks, see :func:`sample_negative_indices`). Unequal counts are accepted
  too; then each utterance draws from its own masked frames with ``torch.rand`` (fairseq would fail).
* Cosines are computed as one normalised ``[S, S]`` matrix product over the ``S`` masked frames and then
  gathered (fairseq materialises ``[1 + N, B, M, D]``); equal to fairseq's to rounding. "A negative equals its
  positive" is decided, as fairseq decides it, by exact equality of the projected quantized vectors.
* Logit rows are in batch-major order (frame ``(b, t)`` of ``mask`` in ``mask.nonzero()`` order); fairseq's
  ``get_logits`` orders them time-major. Sums and counts are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from bundles.wav2vec2_pretrain import Wav2Vec2PretrainModel
from continue_pt.frames import at_least_fp32, conv_features
from continue_pt.device_batch import to_device

__all__ = [
    "Wav2Vec2LossTerms",
    "Wav2Vec2LossWeights",
    "Wav2Vec2Outputs",
    "contrastive_logits",
    "normalized_wav2vec2_loss",
    "sample_negative_indices",
    "sample_size",
    "unnormalized_loss",
    "wav2vec2_forward",
    "wav2vec2_loss_terms",
]

_EQUALITY_CHUNK = 1 << 24  # elements compared at once when looking for negatives equal to their positive


@dataclass
class Wav2Vec2Outputs:
    """What the model predicts for one micro-batch.

    Attributes:
        logits: ``[num_masked, 1 + N]`` cosine / ``logit_temp`` of each masked frame's context vector against its
            quantized target (column 0) and its ``N`` negatives (fairseq's order); ``-inf`` where a negative is
            exactly equal to the positive. fp32 (float64 for a float64 model).
        negative_indices: ``[num_masked, N]`` the negatives as indices into the masked frames (batch-major).
        features_penalty: fairseq's ``features_pen``: mean of the squared conv features over
            ``[batch, channels, frames]`` (padded frames included).
        prob_perplexity: perplexity of the averaged soft code distribution over the masked frames, summed over
            groups (the diversity loss uses it).
        code_perplexity: perplexity of the hard code choices (summed over groups; for logging).
        temperature: the Gumbel temperature used.
        num_vars: codewords in all groups (``latent_vars * latent_groups``, fairseq's ``num_vars``).
        num_masked: masked (unpadded) frames, the rows of ``logits``: fairseq's ``sample_size``.
        targets: ``[num_masked, groups]`` the chosen code of each masked frame (detached).
    """

    logits: Tensor
    negative_indices: Tensor
    features_penalty: Tensor
    prob_perplexity: Tensor
    code_perplexity: Tensor
    temperature: float
    num_vars: int
    num_masked: int
    targets: Tensor


# ------------------------------------------------------------------------------------------------ negatives


def sample_negative_indices(
    counts: Sequence[int],
    num_negatives: int = 100,
    cross_sample_negatives: int = 0,
    *,
    rng: torch.Generator | None = None,
) -> Tensor:
    """Negatives for the masked frames of a batch, as indices into those frames (batch-major, utterance ``b``'s
    ``counts[b]`` frames after the earlier utterances'): ``[sum(counts), num_negatives + cross_sample_negatives]``.

    With equal counts ``M`` this is fairseq's ``Wav2Vec2Model.sample_negatives`` (``padding_count=None``) index
    for index, drawing the same ``torch.randint`` calls on the CPU (from ``rng``, or torch's global generator as
    fairseq does): own negatives uniform over the ``M - 1`` other masked frames of the utterance (drawn from
    ``[0, M - 1)`` and shifted up by one at and above the frame itself); then cross-sample negatives drawn from
    ``[0, B*M - 1)`` over the whole batch and shifted where they are ``>=`` the frame's *in-utterance* position.
    fairseq's quirks are kept: that shift compares a batch-wide index with an in-utterance position (for
    ``b > 0`` the frame itself can be drawn), and with both kinds the ``[own | cross]`` concatenation is re-viewed
    as ``[B, M, N + C]``, which mixes frames' negatives (the published models use no cross-sample negatives).

    With unequal counts (fairseq cannot run them) each frame draws own negatives uniformly from the other masked
    frames of its utterance and cross-sample negatives uniformly from the other masked frames of the batch.
    """
    counts = [int(c) for c in counts]
    n, c = int(num_negatives), int(cross_sample_negatives)
    total = sum(counts)
    if n < 0 or c < 0:
        raise ValueError("numbers of negatives must be >= 0")
    if n + c == 0 or total == 0:
        return torch.zeros(total, n + c, dtype=torch.long)
    bsz = len(counts)
    if len(set(counts)) == 1:
        num = counts[0]
        high, cross_high = num, num * bsz
        if n > 0 and high <= 1:
            raise ValueError(f"{num} masked frame(s) per utterance: negatives need at least 2")
        with torch.no_grad():
            if n > 0:
                tszs = torch.arange(num).unsqueeze(-1).expand(-1, n).flatten()
                neg = torch.randint(low=0, high=high - 1, size=(bsz, n * num), generator=rng)
                neg[neg >= tszs] += 1
            if c > 0:
                if cross_high <= 1:
                    raise ValueError("cross-sample negatives need at least 2 masked frames in the batch")
                tszs = torch.arange(num).unsqueeze(-1).expand(-1, c).flatten()
                cross = torch.randint(low=0, high=cross_high - 1, size=(bsz, c * num), generator=rng)
                cross[cross >= tszs] += 1
            if n > 0:
                neg = neg + torch.arange(bsz).unsqueeze(1) * high
                if c > 0:
                    neg = torch.cat([neg, cross], dim=1)
            else:
                neg = cross
        return neg.reshape(bsz, num, n + c).reshape(total, n + c)

    # unequal counts: per-utterance uniform draws (not fairseq's arithmetic, which needs equal counts)
    pieces = []
    with torch.no_grad():
        sizes = torch.tensor(counts)
        offsets = torch.cumsum(sizes, 0) - sizes
        owner = torch.repeat_interleave(torch.arange(bsz), sizes)
        position = torch.arange(total) - offsets[owner]
        if n > 0:
            if bool((sizes == 1).any()):
                raise ValueError("an utterance has 1 masked frame: negatives need at least 2 per utterance")
            span = (sizes[owner] - 1).unsqueeze(1).double()
            draw = (torch.rand(total, n, generator=rng, dtype=torch.float64) * span).long()
            draw = torch.minimum(draw, span.long() - 1)
            draw[draw >= position.unsqueeze(1)] += 1
            pieces.append(draw + offsets[owner].unsqueeze(1))
        if c > 0:
            if total <= 1:
                raise ValueError("cross-sample negatives need at least 2 masked frames in the batch")
            draw = torch.randint(0, total - 1, (total, c), generator=rng)
            draw[draw >= torch.arange(total).unsqueeze(1)] += 1
            pieces.append(draw)
    return torch.cat(pieces, dim=1)


def contrastive_logits(context: Tensor, quantized: Tensor, negative_indices: Tensor, logit_temp: float) -> Tensor:
    """fairseq's ``compute_preds`` for masked frames: ``[S, 1 + N]`` with ``cos(context[s], quantized[s])`` first,
    then ``cos(context[s], quantized[negative_indices[s, j]])``, all divided by ``logit_temp``; ``-inf`` where
    ``quantized[negative_indices[s, j]]`` equals ``quantized[s]`` exactly. Computed in fp32 or better (also under
    autocast) with ``torch.cosine_similarity``'s ``eps`` = 1e-8 on each norm."""
    num, num_neg = negative_indices.shape
    idx = negative_indices.to(quantized.device)
    with torch.autocast(device_type=context.device.type, enabled=False):
        x = F.normalize(at_least_fp32(context), dim=-1, eps=1e-8)
        y = F.normalize(at_least_fp32(quantized).to(x.dtype), dim=-1, eps=1e-8)
        positive = (x * y).sum(-1, keepdim=True)
        if num_neg:
            sim = x @ y.t()  # [S, S]: every context against every target of the batch
            negative = sim.gather(1, idx)
        else:
            negative = x.new_zeros(num, 0)
        logits = torch.cat([positive, negative], dim=1) / logit_temp
    if num_neg and num:
        with torch.no_grad():  # exact equality, as fairseq's (y == negatives).all(-1)
            q = quantized.detach()
            rows = max(1, _EQUALITY_CHUNK // max(1, num_neg * q.shape[1]))
            same = torch.cat([(q[s:s + rows, None, :] == q[idx[s:s + rows]]).all(-1) for s in range(0, num, rows)])
        # unconditionally (asking whether any is equal would wait for the GPU); the same numbers
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same, float("-inf"))], dim=1)
    return logits


# ------------------------------------------------------------------------------------------------ forward


def wav2vec2_forward(
    model: Wav2Vec2PretrainModel,
    waveforms: Tensor,
    lengths: Tensor | None,
    mask: Tensor,
    *,
    negative_indices: Tensor | None = None,
    gumbel_noise: Tensor | None = None,
    num_negatives: int = 100,
    cross_sample_negatives: int = 0,
    logit_temp: float = 0.1,
    feature_grad_mult: float | None = None,
    dropout_features: float = 0.0,
    rng: torch.Generator | None = None,
) -> Wav2Vec2Outputs:
    """Run the modules of a :class:`Wav2Vec2PretrainModel` as fairseq's ``Wav2Vec2Model.forward`` runs its own
    (``quantize_targets=True``, ``negatives_from_everywhere=False``, no codebook negatives, ``target_glu=False``,
    no channel masking), with a given time mask.

    Args:
        model: e.g. ``bundle.get_pretrain_model()`` (train mode: dropout, layer drop and Gumbel sampling, as
            fairseq trains; the quantizer's temperature is ``model.quantizer.temperature``).
        waveforms: ``[batch, samples]``, already normalised if the model expects it, zeros after each length.
        lengths: valid samples per utterance ``[batch]``, or None when nothing is padded.
        mask: ``[batch, frames]`` bool, True = masked (e.g. :func:`continue_pt.masking.compute_mask_indices` with
            ``min_masks=2`` and the bundle's masking options). Padded frames are never treated as masked. fairseq
            needs the same count in every utterance; see :func:`sample_negative_indices` for unequal counts.
        negative_indices: ``[num_masked, N]`` negatives as indices into the masked frames (batch-major); None:
            drawn by :func:`sample_negative_indices` (after the quantizer, where fairseq draws them).
        gumbel_noise: train mode only: ``[num_masked * groups, latent_vars]`` Gumbel sample for the quantizer
            (masked frames batch-major, then group); None draws one (fairseq's ``F.gumbel_softmax``).
        num_negatives, cross_sample_negatives, logit_temp: fairseq's options (``bundle.config.objective``).
        feature_grad_mult: gradient scale of the conv feature extractor (1.0: none, 0: frozen, fairseq's).
            None: ``model.feature_grad_mult`` if the model has one, else 1.0. A bundle keeps fairseq's value
            in ``bundle.config.objective["feature_grad_mult"]`` (0.1 for the published BASE and LARGE).
        dropout_features: fairseq's ``dropout_features`` on the quantizer's input (train mode only;
            ``bundle.config.objective["dropout_features"]``, 0.1 published). ``dropout_input`` is the
            encoder's ``feature_projection.dropout``.
        rng: CPU generator for the negatives (None: torch's global one, as fairseq).
    """
    wav2vec2 = model.wav2vec2
    if waveforms.dim() != 2:
        raise ValueError(f"waveforms must be [batch, samples], got {tuple(waveforms.shape)}")
    batch = waveforms.shape[0]
    if lengths is not None and tuple(lengths.shape) != (batch,):
        raise ValueError(f"lengths must be [batch={batch}], got {tuple(lengths.shape)}")
    if feature_grad_mult is None:
        feature_grad_mult = getattr(model, "feature_grad_mult", None)
    grad_mult = 1.0 if feature_grad_mult is None else float(feature_grad_mult)

    # fairseq's feature_extractor (+ GradMultiply) and features_pen
    features, frame_lengths = conv_features(wav2vec2.feature_extractor, waveforms, lengths, grad_mult)
    features_penalty = at_least_fp32(features).pow(2).mean()
    num_frames = features.shape[1]
    if tuple(mask.shape) != (batch, num_frames):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected [batch={batch}, frames={num_frames}]")

    # layer_norm -> unmasked_features; post_extract_proj -> dropout_input; dropout_features (fairseq's order)
    projection = wav2vec2.encoder.feature_projection
    normed = projection.layer_norm(features)
    x = projection.dropout(projection.projection(normed))
    unmasked_features = F.dropout(normed, p=float(dropout_features), training=model.training)

    if frame_lengths is not None:
        valid = torch.arange(num_frames, device=x.device)[None, :] < frame_lengths.to(x.device)[:, None]
    else:
        valid = torch.ones(batch, num_frames, dtype=torch.bool, device=x.device)
    # counted and indexed on the CPU when the mask comes from there and nothing is padded: no host sync
    host_mask = mask.bool() if mask.device.type == "cpu" and frame_lengths is None else None
    masked = to_device(mask.bool(), x.device) & valid
    x = torch.where(masked[..., None], model.mask_embedding.to(x.dtype), x)
    attention_mask = None
    if frame_lengths is not None:  # torchaudio's Encoder._preprocess: zero padded frames, mask them in attention
        x = x.masked_fill(~valid[..., None], 0.0)
        attention_mask = -10000.0 * (~valid)[:, None, None, :].to(dtype=features.dtype)
        attention_mask = attention_mask.expand(batch, 1, num_frames, num_frames)
    x = wav2vec2.encoder.transformer(x, attention_mask=attention_mask)

    counts = (host_mask if host_mask is not None else masked).sum(dim=1).tolist()
    num_masked = int(sum(counts))
    if host_mask is not None:  # the same frames in the same (batch-major) order as masked's boolean index
        b, t = to_device(host_mask.nonzero().T.contiguous(), x.device)
        unmasked_rows, context_rows = unmasked_features[b, t], x[b, t]
    else:
        unmasked_rows, context_rows = unmasked_features[masked], x[masked]
    q = model.quantizer(unmasked_rows.unsqueeze(0), gumbel_noise=gumbel_noise)
    quantized = model.project_q(q.x.squeeze(0))
    if negative_indices is None:
        negative_indices = sample_negative_indices(counts, num_negatives, cross_sample_negatives, rng=rng)
    elif negative_indices.dim() != 2 or negative_indices.shape[0] != num_masked:
        raise ValueError(f"negative_indices must be [num_masked={num_masked}, N], "
                         f"got {tuple(negative_indices.shape)}")
    elif negative_indices.numel() and (int(negative_indices.min()) < 0 or int(negative_indices.max()) >= num_masked):
        raise ValueError(f"negative_indices must index the {num_masked} masked frames")
    context = model.final_proj(context_rows)
    logits = contrastive_logits(context, quantized, negative_indices.long(), logit_temp)
    quantizer = model.quantizer
    return Wav2Vec2Outputs(logits=logits, negative_indices=negative_indices, features_penalty=features_penalty,
                           prob_perplexity=q.prob_perplexity, code_perplexity=q.code_perplexity,
                           temperature=q.temperature, num_vars=quantizer.num_vars * quantizer.groups,
                           num_masked=num_masked, targets=q.targets.squeeze(0))


# ------------------------------------------------------------------------------------------------ loss


@dataclass
class Wav2Vec2LossTerms:
    """The additive pieces of one micro-batch's loss (fairseq's ``Wav2vecCriterion``, ``infonce=True``).

    Attributes:
        infonce_sum: cross-entropy with class 0 (the positive) summed over the masked frames (fp32 scalar).
        diversity: ``(num_vars - prob_perplexity) / num_vars`` (fairseq's first extra loss).
        feature_penalty: ``features_pen`` (fairseq's second extra loss).
        num_masked: fairseq's ``sample_size``.
        correct: frames whose positive has the highest logit (first wins ties) and not also the lowest
            (fairseq's exclusion of all-equal rows); detached long scalar.
        count: rows scored (fairseq's ``count``).
    """

    infonce_sum: Tensor
    diversity: Tensor
    feature_penalty: Tensor
    num_masked: int
    correct: Tensor
    count: int


def wav2vec2_loss_terms(out: Wav2Vec2Outputs) -> Wav2Vec2LossTerms:
    """InfoNCE sum, diversity, feature penalty and accuracy counts of one micro-batch."""
    logits = at_least_fp32(out.logits)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    infonce = F.cross_entropy(logits, target, reduction="sum")
    diversity = (out.num_vars - at_least_fp32(out.prob_perplexity)) / out.num_vars
    with torch.no_grad():
        if logits.numel() == 0:
            correct = torch.zeros((), dtype=torch.long, device=logits.device)
        else:
            top, bottom = logits.argmax(-1) == 0, logits.argmin(-1) == 0
            correct = top.long().sum() - (top & bottom).long().sum()
    return Wav2Vec2LossTerms(infonce, diversity, out.features_penalty, out.num_masked, correct, logits.shape[0])


@dataclass(frozen=True)
class Wav2Vec2LossWeights:
    """fairseq's ``criterion.loss_weights``: ``[diversity, feature_penalty]`` (BASE 0.1, 10; LARGE 0.1, 0)."""

    diversity: float = 0.1
    feature_penalty: float = 10.0


def sample_size(terms: Wav2Vec2LossTerms) -> int:
    """fairseq's ``sample_size`` of one micro-batch (``Wav2vecCriterion``, ``infonce=True``): its masked frames."""
    return terms.num_masked


def _as_weights(weights: Wav2Vec2LossWeights | Sequence[float]) -> Wav2Vec2LossWeights:
    if isinstance(weights, Wav2Vec2LossWeights):
        return weights
    return Wav2Vec2LossWeights(*(float(w) for w in weights))


def unnormalized_loss(terms: Wav2Vec2LossTerms,
                      weights: Wav2Vec2LossWeights | Sequence[float] = Wav2Vec2LossWeights()) -> Tensor:
    """fairseq's ``Wav2vecCriterion`` loss of one micro-batch before the trainer's division:
    ``infonce_sum + Σ_k w_k * extra_k * sample_size_i`` (a term with weight 0 is left out, as fairseq leaves it)."""
    weights = _as_weights(weights)
    loss = terms.infonce_sum
    size_i = sample_size(terms)
    for value, weight in ((terms.diversity, weights.diversity), (terms.feature_penalty, weights.feature_penalty)):
        if weight != 0:
            loss = loss + weight * at_least_fp32(value) * size_i
    return loss


def normalized_wav2vec2_loss(
    terms: Wav2Vec2LossTerms,
    total_sample_size: int,
    weights: Wav2Vec2LossWeights | Sequence[float] = Wav2Vec2LossWeights(),
) -> Tensor:
    """This micro-batch's share of the step's loss: :func:`unnormalized_loss` divided by ``total_sample_size``,
    the masked frames of every micro-batch of the step on every rank (fairseq's trainer divides the summed
    gradients by it). Summed over the step's micro-batches, the gradients are fairseq's step gradient. Note that
    diversity and penalty are per-micro-batch statistics weighted by the micro-batch's sample size (as in
    fairseq), so splitting a batch changes them; the InfoNCE part does not change. The training module runs
    :func:`unnormalized_loss` per micro-batch and divides the summed gradients by the step's summed
    :func:`sample_size`."""
    return unnormalized_loss(terms, weights) / max(int(total_sample_size), 1)
