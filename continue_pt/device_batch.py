"""Moving a training batch to the device without host syncs.

Lightning's default ``transfer_batch_to_device`` moves every tensor of the batch; then every ``bool()``, ``int()``,
``.tolist()`` on the lengths (is anything padded? how many frames? how many samples?) waits for the GPU. Here only
what the model computes with goes to the device (``waveforms``, ``labels``), from pinned memory with
``non_blocking=True``; ``lengths``, ``indices`` and ``starts`` stay on the CPU, where reading them is free. Masks
are drawn with numpy on the CPU, counted there and uploaded the same way (:func:`to_device`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from continue_pt.frames import conv_output_frames

HOST_KEYS = frozenset({"lengths", "indices", "starts"})
"""Batch entries that stay on the CPU: bookkeeping, read by the host."""


def to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``; a CPU tensor goes to a GPU from pinned memory without blocking the host."""
    device = torch.device(device)
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(device, non_blocking=True)
    return tensor.to(device)


def batch_to_device(batch: Any, device: torch.device | str) -> Any:
    """A batch dict with its model inputs on ``device`` and its :data:`HOST_KEYS` left on the CPU."""
    if not isinstance(batch, dict):
        from lightning.fabric.utilities.apply_func import move_data_to_device

        return move_data_to_device(batch, device)
    return {key: value if key in HOST_KEYS or not isinstance(value, Tensor) else to_device(value, device)
            for key, value in batch.items()}


def padded(lengths: Tensor | None, num_samples: int) -> bool:
    """Whether any utterance of a ``[batch, num_samples]`` batch is shorter than ``num_samples`` (a host sync
    when ``lengths`` is on a GPU; free on the CPU, where the data loader makes it)."""
    return lengths is not None and bool((lengths < num_samples).any())


def frames_and_padding(conv_layers: Sequence[Sequence[int]], waveforms: Tensor, lengths: Tensor | None
                       ) -> tuple[int, Tensor | None, Tensor | None]:
    """A ``[batch, samples]`` batch's conv frames, its frame padding mask ``[batch, frames]`` (True = padding;
    made on the CPU from the CPU ``lengths``) and the lengths on the waveforms' device; both None when nothing is
    padded."""
    frames = conv_output_frames(conv_layers, waveforms.shape[1])
    if not padded(lengths, waveforms.shape[1]):
        return frames, None, None
    frame_lengths = torch.tensor([conv_output_frames(conv_layers, int(n)) for n in lengths.tolist()])
    return frames, torch.arange(frames)[None, :] >= frame_lengths[:, None], to_device(lengths, waveforms.device)
