"""Reading audio files for training: mono float32 at the model's sample rate.

Anything libsndfile reads (wav, flac, ogg/vorbis, opus, mp3 (libsndfile >= 1.1), aiff, ...) is supported
through ``soundfile``; torchaudio ≥ 2.9 has no
audio I/O. Channels are averaged (as fairseq's datasets do) and other sample rates are resampled with
``torchaudio.functional.resample`` (fairseq refuses them instead).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

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


def read_audio(path: str | Path, sample_rate: int, data: bytes | None = None) -> Tensor:
    """The file's samples as a 1-D float32 tensor at ``sample_rate`` (channels averaged, resampled if needed).

    ``data``: the file's bytes, already read (an utterance of a tar shard): decoded from memory, ``path`` only
    names it in errors."""
    path = Path(path)
    if data is None and not path.is_file():
        raise AudioError(path, "no such file" if not path.exists() else "not a regular file")
    try:
        samples, file_rate = soundfile.read(_opened(path, data), dtype="float32", always_2d=True)
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


UNSEEKABLE_FORMATS = frozenset({"MP3"})
"""Formats whose decoder is not sample-exact after a seek (mpg123 may lack the bit reservoir of the frame sought
to): :func:`read_audio_window` decodes them from the start."""


def read_audio_window(path: str | Path, sample_rate: int, start: int, length: int,
                      data: bytes | None = None) -> Tensor:
    """``read_audio(path, sample_rate)[start:start + length]``, decoding only that window (+ a margin).

    A training crop of at most 15.6 s then costs the same whether the file lasts 20 s or an hour. Without
    resampling the window is read with a seek. With resampling, the window is widened to whole resampling periods
    (``orig / gcd`` input frames, so the output grid lines up) plus the sinc kernel's reach on both sides,
    resampled, and cut: every output sample is computed from the same input samples with the same kernel as when
    the whole file is resampled (equal bit for bit in the tests). Formats in :data:`UNSEEKABLE_FORMATS` are decoded
    from the start. Raises :class:`AudioError` when the file cannot be read or is shorter than the window.
    ``data``: the file's bytes, already read (see :func:`read_audio`).
    """
    path = Path(path)
    start, length = int(start), int(length)
    try:
        with soundfile.SoundFile(_opened(path, data)) as sound:
            file_rate, frames = int(sound.samplerate), int(sound.frames)
            first, last, out_offset = _input_window(start, length, file_rate, int(sample_rate), frames)
            if sound.format in UNSEEKABLE_FORMATS:
                samples = sound.read(last, dtype="float32", always_2d=True)[first:]
            else:
                sound.seek(first)
                samples = sound.read(last - first, dtype="float32", always_2d=True)
    except Exception as error:  # corrupt or truncated data, unknown format, I/O errors
        raise AudioError(path, f"cannot be read as audio ({_one_line(error)})",
                         "Supported are the formats libsndfile reads (wav, flac, ogg, opus, mp3, ...)") from error
    waveform = torch.from_numpy(samples).mean(dim=1)
    if file_rate != sample_rate:
        waveform = torchaudio.functional.resample(waveform, file_rate, int(sample_rate))
    waveform = waveform[start - out_offset:start - out_offset + length]
    if len(waveform) != length:
        raise AudioError(path, f"holds {resampled_length(frames, file_rate, sample_rate)} samples at "
                               f"{sample_rate} Hz, fewer than the window {start}..{start + length} it was scanned for",
                         "It changed since the corpus was scanned: restart the run to rescan it")
    if not bool(torch.isfinite(waveform).all()):
        raise AudioError(path, "holds NaN or infinite samples")
    return waveform.contiguous()


def _opened(path: Path, data: bytes | None) -> Any:
    """What soundfile opens: the path, or the bytes given for it (named by ``path`` in soundfile's errors)."""
    return str(path) if data is None else io.BytesIO(data)


def _input_window(start: int, length: int, file_rate: int, rate: int, frames: int) -> tuple[int, int, int]:
    """``(first, last, out_offset)``: the input frames ``first..last`` to decode for output samples
    ``start..start + length`` at ``rate``, and the output index of the first decoded frame."""
    if file_rate == rate:
        return start, min(start + length, frames), start
    gcd = math.gcd(file_rate, rate)
    orig, new = file_rate // gcd, rate // gcd
    # torchaudio's _get_sinc_resample_kernel: each period of `orig` inputs reads `width` frames either side of it
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    block = max(0, start // new - (width + 1) // orig - 1)
    last = min(frames, (-(-(start + length) // new) + 1) * orig + width + 1)
    return block * orig, last, block * new


class SampleRateWarning(UserWarning):
    """Audio at another sample rate than the model's was resampled for it."""


def load_audio(path: str | Path, model: Any) -> Tensor:
    """The file at ``path`` as the model expects its input: ``[1, samples]`` float32, mono, at the model's rate.

    ``model`` is a bundle (``bundles.load_bundle(...)``: its ``sample_rate``) or a sample rate in Hz. Any format
    libsndfile reads works (torchaudio >= 2.9 has no audio I/O without TorchCodec). A file at another rate is
    resampled and a :class:`SampleRateWarning` says so: HuBERT and wav2vec 2.0 only work at the rate they were
    trained at (16 kHz), and 44.1/48 kHz audio fed to them unresampled gives wrong features without any error.
    The waveform is not normalised: a bundle's ``get_model()`` does that itself when its checkpoint expects it.
    """
    rate = int(getattr(model, "sample_rate", model))
    _, file_rate, _ = audio_info(path)
    if file_rate != rate:
        warnings.warn(f"{path} is at {file_rate} Hz; resampled to the model's {rate} Hz", SampleRateWarning,
                      stacklevel=2)
    return read_audio(path, rate)[None]


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__
