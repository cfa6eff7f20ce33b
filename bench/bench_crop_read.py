"""Reading one training crop from a long file: the whole file decoded and resampled, then cut (before), against only
the crop window decoded and resampled (``continue_pt.audio.read_audio_window``, what the data loader does now).

    python bench/bench_crop_read.py [--minutes 10] [--rate 44100] [--channels 1] [--format wav] [--crops 20]

Writes the file to a temporary directory, draws ``--crops`` random crops of fairseq's 250,000 samples (15.6 s at
16 kHz), checks both ways give the same samples bit for bit and prints the median time per crop of each.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from continue_pt.audio import read_audio, read_audio_window, resampled_length

MODEL_RATE = 16000
CROP = 250_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=44100)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--format", default="wav", help="file extension: wav, flac, ogg, mp3")
    parser.add_argument("--crops", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one data-loader worker's view
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"long.{args.format}"
        frames = int(args.minutes * 60 * args.rate)
        sf.write(path, (0.1 * rng.standard_normal((frames, args.channels))).astype(np.float32), args.rate)
        length = resampled_length(frames, args.rate, MODEL_RATE)
        starts = rng.integers(0, length - CROP, args.crops)
        whole_times, window_times = [], []
        for start in starts.tolist():
            t0 = time.perf_counter()
            whole = read_audio(path, MODEL_RATE)[start:start + CROP]
            t1 = time.perf_counter()
            window = read_audio_window(path, MODEL_RATE, start, CROP)
            t2 = time.perf_counter()
            assert torch.equal(whole, window), "the window differs from the crop of the whole file"
            whole_times.append(t1 - t0)
            window_times.append(t2 - t1)
    before, after = statistics.median(whole_times), statistics.median(window_times)
    print(f"{args.minutes:g} min {args.rate} Hz {args.channels} ch .{args.format}, crop {CROP} samples at "
          f"{MODEL_RATE} Hz, {args.crops} crops (equal bit for bit): whole file {before * 1000:.0f} ms, window "
          f"{after * 1000:.1f} ms per crop: {before / after:.0f}x faster")


if __name__ == "__main__":
    main()
