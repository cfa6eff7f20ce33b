"""Reading audio files for training: mono float32 at the model's sample rate.

Anything libsndfile reads (wav, flac, ogg/vorbis, opus, mp3 (libsndfile >= 1.1), aiff, ...) is supported
through ``soundfile``; torchaudio ≥ 2.9 has no
audio I/O. Channels are averaged (as fairseq's datasets do) and other sample rates are resampled with
``torchaudio.functional.resample`` (fairseq refuses them instead).
"""

from __future__ import annotations

import math
from pathlib import Path

import soundfile
import torch
import torchaudio
from torch import Tensor

from bundles.errors import FileProblem


class AudioError(FileProblem):
    """An audio file could not be read, or holds no usable samples."""


def resampled_length(frames: int, orig_rate: int, new_rate: int) -> int:
    """The number of samples ``torchaudio.functional.resample`` returns for ``frames`` samples.

    Mirrors torchaudio's own arithmetic (rates reduced by their gcd, then ``ceil`` in float32) so that a length
    computed from a file's header equals the length of the waveform :func:`read_audio` returns.
    """
    if orig_rate == new_rate:
        return int(frames)
    gcd = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // gcd, int(new_rate) // gcd
    return int(torch.ceil(torch.as_tensor(new * frames / orig)).long())


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """``(frames, sample_rate, channels)`` from the file's header, without decoding the samples."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        info = soundfile.info(str(path))
    except Exception as error:  # soundfile raises LibsndfileError, RuntimeError, TypeError, OSError, ...
        raise AudioError(path, f"cannot be read as audio ({_one_line(error)})",
                         "Supported are the formats libsndfile reads (wav, flac, ogg, opus, mp3, ...)") from error
    return int(info.frames), int(info.samplerate), int(info.channels)


def read_audio(path: str | Path, sample_rate: int) -> Tensor:
    """The file's samples as a 1-D float32 tensor at ``sample_rate`` (channels averaged, resampled if needed)."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        samples, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:  # corrupt or truncated data, unknown format, I/O errors
        raise AudioError(path, f"cannot be read as audio ({_one_line(error)})",
                         "Supported are the formats libsndfile reads (wav, flac, ogg, opus, mp3, ...)") from error
    if samples.shape[0] == 0:
        raise AudioError(path, "holds no samples (0 frames)")
    waveform = torch.from_numpy(samples).mean(dim=1)  # [frames, channels] -> [frames]
    if not bool(torch.isfinite(waveform).all()):
        raise AudioError(path, "holds NaN or infinite samples")
    if file_rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, int(file_rate), int(sample_rate))
    return waveform.contiguous()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
