"""data2vec 2.0's masks: ``clone_batch`` copies of each utterance, each with its own span mask, seeded as fairseq
seeds them (``MaskSeed(seed, num_updates, ids)``), so a run's masks are reproducible and equal fairseq's.

fairseq (``ModalitySpecificEncoder.contextualized_features`` + ``data_utils.compute_mask_indices``): copy c of the
utterance with dataset index ``id`` gets the index ``id + hash((seed, c - 1)) % 1e10`` (copy 0 keeps ``id``); row i
draws its spans from ``np.random.default_rng(hash((seed, num_updates, index_i)) % 1e6)``; then every row is cut (or,
with ``add_masks``, filled up) to the same number of masked frames, and ``mask_dropout`` unmasks a fraction -- both
with the generator of the *last* row, as fairseq's loop leaves it (``add_masks`` may then mask padded frames, as
fairseq's does). Spans are ``static`` (``mask_length`` frames),
may overlap, ``min_masks`` = 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def clone_ids(ids: Tensor, seed: int, clone_batch: int) -> Tensor:
    """The mask-seeding index of each copy, ``[batch * clone_batch]`` (copies of an utterance adjacent)."""
    if clone_batch <= 1:
        return ids
    offsets = torch.tensor([0] + [int(hash((seed, c)) % 1e10) for c in range(clone_batch - 1)]).long().view(1, -1)
    ids = ids.repeat_interleave(clone_batch, 0).view(-1, clone_batch) + offsets.to(ids)
    return ids.view(-1)


def seeded_span_mask(shape: tuple[int, int], padding_mask: Tensor | None, mask_prob: float, mask_length: int, *,
                     seed: int, update: int, ids: Tensor, min_masks: int = 1, mask_dropout: float = 0.0,
                     add_masks: bool = False) -> np.ndarray:
    """``[rows, frames]`` bool (True = masked), fairseq's ``compute_mask_indices`` with ``seed``/``epoch``/``indices``
    (static spans, overlapping, ``require_same_masks``)."""
    rows, frames = shape
    padding = padding_mask.long().sum(-1).tolist() if padding_mask is not None else [0] * rows
    chosen, rng = [], None
    for i in range(rows):
        rng = np.random.default_rng(int(hash((seed, update, int(ids[i]))) % 1e6))
        size = frames - int(padding[i])
        num_mask = max(min_masks, int(mask_prob * size / float(mask_length) + rng.random()))
        if num_mask * mask_length == 0:
            raise ValueError(f"no mask span drawn for a row of {size} frames (mask_prob={mask_prob})")
        min_len = mask_length
        if size - min_len <= num_mask:
            min_len = size - num_mask - 1
        starts = rng.choice(size - min_len, num_mask, replace=False)
        idc = np.asarray([start + offset for start in starts for offset in range(mask_length)])
        idc = np.unique(idc[idc < size])
        if len(idc) >= size:
            raise ValueError(f"the entire row of {size} frames would be masked; use longer utterances")
        chosen.append(idc)
    target = (max if add_masks else min)(len(idc) for idc in chosen)
    mask = np.full((rows, frames), False)
    for i, idc in enumerate(chosen):
        if len(idc) > target:
            idc = rng.choice(idc, target, replace=False)
        mask[i, idc] = True
        if len(idc) < target:
            mask[i, rng.choice(np.flatnonzero(~mask[i]), target - len(idc), replace=False)] = True
        if mask_dropout > 0:
            masked = np.flatnonzero(mask[i])
            mask[i, rng.choice(masked, np.rint(len(masked) * mask_dropout).astype(int), replace=False)] = False
    return mask


def clone_masks(frame_padding: Tensor | None, frames: int, ids: Tensor, *, clone_batch: int, mask_prob: float,
                mask_length: int, seed: int, update: int, mask_dropout: float = 0.0, add_masks: bool = False,
                inverse_mask: bool = False) -> Tensor:
    """The masks of the ``clone_batch`` copies of a batch, ``[batch * clone_batch, frames]`` bool (True = masked):
    ``frame_padding`` ``[batch, frames]`` (True = padding) or None, ``ids`` the utterances' dataset indices, ``update``
    the model's ``num_updates``."""
    if mask_length <= 1:
        raise ValueError("mask_length 1 (fairseq's MAE-style random masking) is not implemented; the audio models "
                         "use spans")
    batch = ids.shape[0]
    padding = frame_padding.repeat_interleave(clone_batch, 0) if frame_padding is not None else None
    prob = 1 - mask_prob if inverse_mask else mask_prob
    mask = seeded_span_mask((batch * clone_batch, frames), padding, prob, mask_length, seed=seed, update=update,
                            ids=clone_ids(ids, seed, clone_batch), mask_dropout=mask_dropout, add_masks=add_masks)
    mask = torch.from_numpy(mask)
    return ~mask if inverse_mask else mask
