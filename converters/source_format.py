"""Which reader a torch file needs, from what it holds (never from its name): a torchaudio state dict, an s3prl
converted checkpoint, or a fairseq checkpoint."""

from __future__ import annotations

from pathlib import Path

from .fairseq_checkpoint import FAIRSEQ_GLOBALS
from .s3prl_import import is_s3prl_checkpoint
from .torch_file import UNREADABLE_ERRORS, TorchFile
from .torchaudio_import import is_torchaudio_state_dict

FORMATS = ("fairseq", "s3prl", "torchaudio")


def source_format(path: str | Path) -> str:
    """``"torchaudio"``, ``"s3prl"`` or ``"fairseq"``. The file is parsed with the allow-list reader (nothing in it
    runs, no tensor is read); one that cannot be parsed is left to the fairseq reader, whose errors say why."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return "fairseq"
    try:
        with TorchFile(path, FAIRSEQ_GLOBALS) as file:
            if is_s3prl_checkpoint(file.obj):
                return "s3prl"
            if is_torchaudio_state_dict(file.obj):
                return "torchaudio"
    except UNREADABLE_ERRORS:  # UnsafePickleError included (an UnpicklingError): the fairseq reader says why
        pass
    return "fairseq"
