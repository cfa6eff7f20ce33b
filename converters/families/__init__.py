"""Family records: each binds detection, config translation and a key map for one model family.

The family is chosen from the checkpoint's content (its configuration's model name, then its tensors),
never from the file name.
"""

from __future__ import annotations

from types import ModuleType

from ..fairseq_checkpoint import FairseqCheckpoint
from . import data2vec2, hubert, wav2vec2

# data2vec2 before wav2vec2: a data2vec 2.0 CTC model is a ``wav2vec_ctc`` too (its w2v_args name data2vec_multi).
FAMILIES: tuple[ModuleType, ...] = (hubert, data2vec2, wav2vec2)


def detect_family(ckpt: FairseqCheckpoint) -> tuple[ModuleType, str] | None:
    """(family module, kind) or None when no family recognises the checkpoint."""
    for family in FAMILIES:
        kind = family.detect(ckpt)
        if kind is not None:
            return family, kind
    return None
