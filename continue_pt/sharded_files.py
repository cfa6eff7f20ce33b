"""What a sharded checkpoint (``pretrain --strategy fsdp``) looks like on disk, without importing torch or Lightning
(the command line asks before it knows whether it needs either)."""

from __future__ import annotations

from pathlib import Path

SHARDED_META_FILE = "meta.pt"
"""What Lightning's ``FSDPStrategy`` writes beside the shards of a sharded checkpoint: everything but the model and
optimizer tensors (loops, callbacks, hyper-parameters, the continue-pt section), a plain ``torch.save`` file."""
SHARDED_INDEX_FILE = ".metadata"
"""``torch.distributed.checkpoint``'s index of the shards."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A directory written by ``continue_pt.sharding.LayerShardedFSDP``: shards, their index and ``meta.pt``."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META_FILE).is_file() and (path / SHARDED_INDEX_FILE).is_file()
