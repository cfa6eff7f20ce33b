"""Span masks for masked prediction, drawn as fairseq draws them.

:func:`compute_mask_indices` reproduces ``fairseq.data.data_utils.compute_mask_indices`` (the version in
fairseq-fixed, with the arguments HuBERT and wav2vec 2.0 use): the same numpy calls in the same order, so given
the same random source it returns the same mask. The difference is the random source: fairseq creates a fresh
``np.random.default_rng(None)`` per utterance (OS entropy: its masks cannot be reproduced, and
``np.random.seed`` does not affect them), while here the caller passes one ``rng`` that every draw comes from.
With a shared, seeded generator (or ``np.random``'s global ``RandomState`` after ``np.random.seed``) both
functions draw the same numbers and return the same mask; the parity tests check it.

:func:`time_mask` and :func:`channel_mask` call it with the exact arguments of fairseq's ``apply_mask`` (the
same in ``HubertModel`` and ``Wav2Vec2Model``: ``min_masks=2`` for time spans; channel spans with fairseq's
defaults); both objectives use them, with :class:`MaskingOptions`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
import torch

MaskSelection = Literal["static", "uniform", "normal", "poisson"]
Rng = np.random.Generator | np.random.RandomState

TIME_MIN_MASKS = 2
"""``min_masks`` of the time masks (fairseq's ``apply_mask``, both families); channel masks use fairseq's default 0."""

__all__ = [
    "TIME_MIN_MASKS",
    "MaskingOptions",
    "compute_mask_indices",
    "channel_mask",
    "time_mask",
]


def _integers(rng: Rng, low: float, high: float, size: int | None = None) -> Any:
    """``randint`` of a ``RandomState`` (what fairseq calls), ``integers`` of a ``Generator`` (which has no
    ``randint``: fairseq's ``uniform`` selection and ``no_overlap`` fail with one)."""
    if isinstance(rng, np.random.Generator):
        return rng.integers(int(low), int(high), size=size)
    return rng.randint(low, high, size=size)


def _span_lengths(rng: Rng, selection: str, num_mask: int, mask_length: int, mask_other: float) -> list[int]:
    if selection == "static":
        return [mask_length] * num_mask
    if selection == "uniform":
        return [int(v) for v in _integers(rng, mask_other, mask_length * 2 + 1, size=num_mask)]
    if selection == "normal":
        return [max(1, int(round(v))) for v in rng.normal(mask_length, mask_other, size=num_mask)]
    if selection == "poisson":
        return [int(round(v)) for v in rng.poisson(mask_length, size=num_mask)]
    raise ValueError(f"unknown mask selection {selection!r}; expected static, uniform, normal or poisson")


def _non_overlapping_starts(rng: Rng, sz: int, lengths: list[int], min_space: int) -> np.ndarray:
    """fairseq's ``no_overlap`` algorithm: place the spans longest first, each inside a free part chosen with
    probability proportional to its size, splitting the part around it (``min_space`` frames kept free)."""
    indices: list[int] = []
    parts = [(0, sz)]
    keep_length = min(lengths)
    for length in sorted(lengths, reverse=True):
        sizes = np.array([e - s if e - s >= length + min_space else 0 for s, e in parts], dtype=int)
        if sizes.sum() == 0:
            break
        s, e = parts.pop(int(rng.choice(len(parts), p=sizes / np.sum(sizes))))
        start = int(_integers(rng, s, e - length))
        indices.extend(range(start, start + length))
        if start - s - min_space >= keep_length:
            parts.append((s, start - min_space + 1))
        if e - start - length - min_space > keep_length:
            parts.append((start + length + min_space, e))
    return np.asarray(indices, dtype=int)


def _overlapping_spans(rng: Rng, sz: int, lengths: list[int], num_mask: int) -> np.ndarray:
    """Span starts drawn without replacement from the positions where the shortest span still fits."""
    min_len = min(lengths)
    if sz - min_len <= num_mask:
        min_len = sz - num_mask - 1
    starts = rng.choice(sz - min_len, num_mask, replace=False)
    return np.asarray([start + offset for start, length in zip(starts, lengths) for offset in range(length)],
                      dtype=int)


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: torch.Tensor | np.ndarray | None,
    mask_prob: float,
    mask_length: int,
    mask_selection: MaskSelection = "static",
    mask_other: float = 0.0,
    min_masks: int = 0,
    no_overlap: bool = False,
    min_space: int = 0,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    *,
    rng: Rng,
) -> np.ndarray:
    """Random mask spans, ``[batch, length]`` bool (True = masked), as fairseq's ``compute_mask_indices``.

    The defaults are fairseq's (HuBERT passes ``min_masks=2`` and its ``mask_min_space``: use
    :func:`time_mask`). For each row, with ``sz`` unpadded positions: ``num_mask = max(min_masks,
    int(mask_prob * sz / mask_length + U[0,1)))`` spans of ``mask_selection`` lengths start at distinct
    random positions (or are placed without overlap); the masked set is cut to ``sz``. With
    ``require_same_masks`` every row then keeps a random subset as large as the smallest row's set, and
    ``mask_dropout`` unmasks that fraction of each row.

    Args:
        shape: ``(batch, length)``.
        padding_mask: True at padded positions (``[batch, length]``), or None. Only each row's count of
            padded positions is used: padding is assumed to be at the end, as fairseq assumes.
        mask_prob, mask_length, mask_selection, mask_other, min_masks, no_overlap, min_space,
            require_same_masks, mask_dropout: fairseq's arguments of the same names.
        rng: every random draw comes from it, in fairseq's order. A ``Generator`` (recommended) or a
            ``RandomState`` (``np.random.mtrand._rand`` is ``np.random``'s global state).

    Raises:
        ValueError: where fairseq raises (a row would be masked entirely; no span drawn with ``static``
            selection), for an unknown ``mask_selection``, and for a wrong ``padding_mask`` shape.
    """
    bsz, all_sz = (int(v) for v in shape)
    if padding_mask is not None:
        if isinstance(padding_mask, torch.Tensor):
            padding = padding_mask.detach().cpu().numpy()
        else:
            padding = np.asarray(padding_mask)
        if padding.shape != (bsz, all_sz):
            raise ValueError(f"padding_mask has shape {tuple(padding.shape)}, expected {(bsz, all_sz)}")
        sizes = [all_sz - int(padding[i].astype(np.int64).sum()) for i in range(bsz)]
    else:
        sizes = [all_sz] * bsz

    mask = np.full((bsz, all_sz), False)
    chosen: list[np.ndarray] = []
    for sz in sizes:
        num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
        lengths = _span_lengths(rng, mask_selection, num_mask, mask_length, mask_other)
        if sum(lengths) == 0:
            if mask_selection == "static":
                raise ValueError(f"no mask span drawn for a row of {sz} positions (mask_prob={mask_prob}, "
                                 f"mask_length={mask_length}, min_masks={min_masks}); fairseq fails here too")
            lengths = [min(mask_length, sz - 1)]
        if no_overlap:
            idc = _non_overlapping_starts(rng, sz, lengths, min_space)
        else:
            idc = _overlapping_spans(rng, sz, lengths, num_mask)
        idc = np.unique(idc[idc < sz])
        if len(idc) >= sz:
            raise ValueError(f"the entire row of {sz} positions would be masked (mask_prob={mask_prob}, "
                             f"mask_length={mask_length}, min_masks={min_masks}); use longer utterances")
        chosen.append(idc)

    target_len = min(len(idc) for idc in chosen) if require_same_masks and chosen else None
    for i, idc in enumerate(chosen):
        if target_len is not None and len(idc) > target_len:
            idc = rng.choice(idc, target_len, replace=False)
        mask[i, idc] = True
        if mask_dropout > 0:
            masked = np.flatnonzero(mask[i])
            num_holes = int(np.rint(len(masked) * mask_dropout))
            mask[i, rng.choice(masked, num_holes, replace=False)] = False
    return mask


@dataclass(frozen=True)
class MaskingOptions:
    """The masking options of both objectives, named as in fairseq's ``HubertConfig`` / ``Wav2Vec2Config`` and a
    bundle's ``pretrain_args`` (HuBERT) or ``objective`` (wav2vec 2.0).

    The defaults are fairseq's ``HubertConfig`` defaults; the published HuBERT recipes use ``mask_prob=0.8``.
    Take the checkpoint's values with ``MaskingOptions.from_options(bundle.config.pretrain_args)``.
    """

    mask_prob: float = 0.65
    mask_length: int = 10
    mask_selection: MaskSelection = "static"
    mask_other: float = 0.0
    no_mask_overlap: bool = False
    mask_min_space: int = 1
    mask_channel_prob: float = 0.0
    mask_channel_length: int = 10
    mask_channel_selection: MaskSelection = "static"
    mask_channel_other: float = 0.0
    no_mask_channel_overlap: bool = False
    mask_channel_min_space: int = 1

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "MaskingOptions":
        """The masking options found in ``options`` (other keys, e.g. ``num_classes``, are ignored)."""
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})


def time_mask(
    shape: tuple[int, int],
    frame_padding_mask: torch.Tensor | np.ndarray | None,
    masking: MaskingOptions,
    *,
    rng: Rng,
) -> np.ndarray:
    """The time mask ``[batch, frames]`` fairseq's ``HubertModel.apply_mask`` draws (all False when
    ``mask_prob`` is 0). ``frame_padding_mask`` is fairseq's frame padding (see
    :func:`continue_pt.hubert.objective.hubert_frame_padding_mask`)."""
    if masking.mask_prob <= 0:
        return np.full(tuple(shape), False)
    return compute_mask_indices(
        shape, frame_padding_mask, masking.mask_prob, masking.mask_length, masking.mask_selection,
        masking.mask_other, min_masks=TIME_MIN_MASKS, no_overlap=masking.no_mask_overlap,
        min_space=masking.mask_min_space, rng=rng,
    )


def channel_mask(batch: int, channels: int, masking: MaskingOptions, *, rng: Rng) -> np.ndarray | None:
    """The channel mask ``[batch, encoder_embed_dim]`` fairseq's ``HubertModel.apply_mask`` draws after the
    time mask (None when ``mask_channel_prob`` is 0, the published HuBERT setting). Masked channels are set to
    0 in every frame."""
    if masking.mask_channel_prob <= 0:
        return None
    return compute_mask_indices(
        (batch, channels), None, masking.mask_channel_prob, masking.mask_channel_length,
        masking.mask_channel_selection, masking.mask_channel_other, no_overlap=masking.no_mask_channel_overlap,
        min_space=masking.mask_channel_min_space, rng=rng,
    )
