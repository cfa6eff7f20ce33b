"""Reading one training crop from a long file: the whole file decoded and resampled, then cut (before), against only
the crop window decoded and resampled (``continue_pt.audio.read_audio_window``, what the data loader does now).

    .venv/bin/python bench/bench_crop_read.py [--minutes 10] [--crops 10] [--no-publish]

For each case of ``CASES`` writes a file to a temporary directory, draws ``--crops`` random crops of fairseq's
250,000 samples (15.6 s at 16 kHz), checks both ways give the same samples bit for bit and writes the median time per
crop of each to the section ``bench_crop_read`` of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import _common as C  # noqa: E402  (bench/ is on sys.path when run as a script)
from continue_pt.audio import read_audio, read_audio_window, resampled_length

MODEL_RATE = 16000
CROP = 250_000


CASES = [(44100, 1, "wav"), (44100, 2, "flac"), (16000, 1, "flac")]
"""Domain audio as users hold it: 44.1 kHz WAV, 44.1 kHz stereo FLAC, and 16 kHz FLAC (no resampling)."""
SECTION = "bench_crop_read"


def measure(minutes: float, rate: int, channels: int, fmt: str, crops: int) -> tuple[float, float]:
    """Median seconds per crop: whole file read then cut, and only the window read; asserts equal samples."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"long.{fmt}"
        frames = int(minutes * 60 * rate)
        sf.write(path, (0.1 * rng.standard_normal((frames, channels))).astype(np.float32), rate)
        length = resampled_length(frames, rate, MODEL_RATE)
        whole_times, window_times = [], []
        for start in rng.integers(0, length - CROP, crops).tolist():
            t0 = time.perf_counter()
            whole = read_audio(path, MODEL_RATE)[start:start + CROP]
            t1 = time.perf_counter()
            window = read_audio_window(path, MODEL_RATE, start, CROP)
            t2 = time.perf_counter()
            assert torch.equal(whole, window), "the window differs from the crop of the whole file"
            whole_times.append(t1 - t0)
            window_times.append(t2 - t1)
    return statistics.median(whole_times), statistics.median(window_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--crops", type=int, default=10)
    parser.add_argument("--no-publish", dest="publish", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one data-loader worker's view
    command = shlex.join([".venv/bin/python", "bench/bench_crop_read.py", *sys.argv[1:]])
    info = C.machine_info()
    rows = []
    for rate, channels, fmt in CASES:
        before, after = measure(args.minutes, rate, channels, fmt, args.crops)
        rows.append([f"{rate / 1000:g} kHz {'stereo' if channels == 2 else 'mono'} .{fmt}", f"{before * 1000:.0f}",
                     f"{after * 1000:.1f}", f"{before / after:.0f}x"])
        print(rows[-1], flush=True)
    body = [f"## {SECTION}: one training crop from a {args.minutes:g}-minute file, whole file vs the crop window", "",
            *C.machine_lines(info, command),
            f"- One thread (`torch.set_num_threads(1)`, a data-loader worker's view; the Software line shows the "
            f"default); crop = {CROP:,} samples at {MODEL_RATE} Hz (fairseq's "
            f"max_sample_size), {args.crops} random crops per file, median per crop. Both ways give the same "
            "samples bit for bit (asserted).", "",
            C.table(["file", "whole file, then cut (ms)", "window only (ms)", "speed-up"], rows), "",
            "- The data loader reads only the window (`continue_pt.audio.read_audio_window`; MP3 is decoded from "
            "the start, since mpg123 is not sample-exact after a seek)."]
    C.publish_or_print(SECTION, body, args.publish)


if __name__ == "__main__":
    main()
