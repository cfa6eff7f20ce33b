"""Data loading from a directory of short files vs the same audio in tar shards: decoded audio-seconds per second
per loader worker, and the loader workers one H100 needs at the throughput target (3,000 audio-s/s, HuBERT BASE).

    .venv/bin/python bench/bench_loader.py [--files 10000] [--cell-seconds 20] [--rounds 2] [--smoke] [--no-publish]

Generates ``--files`` utterances of 2-6 s (seeded, speech-like: stretches of synthetic voices, harmonics of a
wandering pitch with syllable-rate amplitude modulation, plus noise; 16-bit PCM) once per rate (16 and 48 kHz) and format (wav, flac) into a temporary
directory, writes each directory as shards (``continue_pt.shard_write.write_shards``, 1 GB, bytes as they are), then
reads both the way a training data-loader worker does (``AudioDataset[i]``: decode, mix down, resample 48 -> 16 kHz)
in one process with one torch thread, in a shuffled order, for ``--cell-seconds`` per layout and round (the layouts
alternate, so load on a shared machine hits both alike). ``--smoke``: 16 files, a fraction of a second per cell,
nothing published (the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

import _common as C  # noqa: E402  (bench/ is on sys.path when run as a script)
from _range_server import served
from continue_pt.batching import AudioDataset
from continue_pt.corpus import scan_audio
from continue_pt.shard_read import scan_shards
from continue_pt.shard_write import write_shards

SECTION = "bench_loader"
MODEL_RATE = 16000
TARGET = 3000.0
"""Audio-seconds per second one H100 trains HuBERT BASE at (issue 12's BASE target)."""
CELLS = [(16000, "wav"), (16000, "flac"), (48000, "wav"), (48000, "flac")]
PER_DIRECTORY = 1000


BANK_SECONDS = 8.0
BANK_VOICES = 16


def voice(seed: int, rate: int) -> np.ndarray:
    """8 s of speech-like audio: harmonics of a pitch wandering around 80-250 Hz and a syllable-rate (4 Hz)
    envelope. FLAC compresses it about as much as it compresses speech (not as little as noise)."""
    rng = np.random.default_rng(10_000 + seed)
    n = int(BANK_SECONDS * rate)
    t = np.arange(n) / rate
    f0 = rng.uniform(80, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    harmonics = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t + rng.uniform(0, 2 * np.pi))) ** 2
    return 0.15 * envelope * harmonics


_BANK: dict[int, list[np.ndarray]] = {}


def utterance(seed: int, rate: int) -> np.ndarray:
    """2-6 s of 16-bit audio: a random stretch of one of :data:`BANK_VOICES` voices at a random gain, plus its own
    noise (so no two files are alike; the voices are synthesised once per process, which keeps generating 10,000
    files cheap)."""
    if rate not in _BANK:
        _BANK[rate] = [voice(v, rate) for v in range(BANK_VOICES)]
    rng = np.random.default_rng(seed)
    n = int(rng.uniform(2.0, 6.0) * rate)
    source = _BANK[rate][int(rng.integers(BANK_VOICES))]
    start = int(rng.integers(0, len(source) - n))
    wave = rng.uniform(0.5, 1.0) * source[start:start + n] + 0.01 * rng.standard_normal(n)
    return (np.clip(wave, -1, 1) * 32767).astype(np.int16)


def _write_chunk(args: tuple[Path, int, str, list[int]]) -> None:
    root, rate, fmt, seeds = args
    for seed in seeds:
        path = root / f"d{seed // PER_DIRECTORY:03d}" / f"utt{seed:06d}.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, utterance(seed, rate), rate, subtype="PCM_16")


def generate(root: Path, files: int, rate: int, fmt: str, jobs: int) -> None:
    seeds = list(range(files))
    chunks = [(root, rate, fmt, seeds[i::jobs * 4]) for i in range(jobs * 4)]
    with ProcessPoolExecutor(jobs) as pool:
        list(pool.map(_write_chunk, chunks))


def read_rate(dataset: AudioDataset, order: list[int], budget_s: float) -> tuple[float, float, int]:
    """Read ``dataset[i]`` for ``i`` in ``order`` until done or ``budget_s`` passed: (audio seconds, wall seconds,
    utterances)."""
    samples, count = 0, 0
    start = time.perf_counter()
    for i in order:
        item = dataset[i]
        assert item is not None, f"utterance {i} failed to read"
        samples += len(item["waveform"])
        count += 1
        if time.perf_counter() - start >= budget_s:
            break
    return samples / MODEL_RATE, time.perf_counter() - start, count


def bench_cell(work: Path, files: int, rate: int, fmt: str, cell_seconds: float, rounds: int,
               jobs: int) -> dict:
    directory, shards = work / f"dir_{fmt}_{rate}", work / f"shards_{fmt}_{rate}"
    t0 = time.perf_counter()
    generate(directory, files, rate, fmt, jobs)
    t1 = time.perf_counter()
    write_shards(directory, shards, 10 ** 9, "original")
    t2 = time.perf_counter()
    scanned = scan_audio(directory, MODEL_RATE, min_seconds=0)
    t3 = time.perf_counter()
    indexed = scan_shards(shards, MODEL_RATE, min_seconds=0)
    t4 = time.perf_counter()
    assert [i.name for i in scanned.items] == [i.name for i in indexed.items]
    with served(work) as url:
        remote = scan_shards(url + shards.name + "/", MODEL_RATE, min_seconds=0)
        datasets = {"directory": AudioDataset(scanned.items, MODEL_RATE, normalize=False),
                    "shards": AudioDataset(indexed.items, MODEL_RATE, normalize=False),
                    "http": AudioDataset(remote.items, MODEL_RATE, normalize=False)}
        totals = {name: [0.0, 0.0, 0] for name in datasets}
        for round_ in range(rounds):
            order = np.random.default_rng(round_).permutation(len(scanned.items)).tolist()  # training reads shuffled
            names = list(datasets) if round_ % 2 == 0 else list(reversed(datasets))
            for name in names:
                audio, wall, count = read_rate(datasets[name], order, cell_seconds)
                totals[name] = [totals[name][0] + audio, totals[name][1] + wall, totals[name][2] + count]
    result = {"rate": rate, "format": fmt, "files": files, "generate_s": t1 - t0, "shards_write_s": t2 - t1,
              "scan_s": t3 - t2, "index_s": t4 - t3,
              "hours": sum(i.num_samples for i in scanned.items) / MODEL_RATE / 3600,
              "bytes": sum(p.stat().st_size for p in directory.rglob(f"*.{fmt}"))}
    for name, (audio, wall, count) in totals.items():
        result[name] = {"audio_s": audio, "wall_s": wall, "utterances": count, "rate": audio / wall}
    return result


def section(results: list[dict], command: str, info: dict, args: argparse.Namespace) -> list[str]:
    rows = []
    for r in results:
        d, s, h = (r[layout]["rate"] for layout in ("directory", "shards", "http"))
        rows.append([f"{r['rate'] / 1000:g} kHz .{r['format']}", f"{r['bytes'] / 1e9:.2f}", f"{d:,.0f}", f"{s:,.0f}",
                     f"{h:,.0f}", f"{s / d:.2f}x / {h / d:.2f}x",
                     f"{math.ceil(TARGET / d)} / {math.ceil(TARGET / s)} / {math.ceil(TARGET / h)}",
                     f"{r['scan_s']:.1f} / {r['index_s']:.2f}"])
    hours = results[0]["hours"]
    return [
        f"## {SECTION}: decoded audio-s/s per loader worker, {args.files:,} short files vs the same in shards", "",
        *C.machine_lines(info, command),
        f"- Corpus per row: {args.files:,} generated utterances of 2-6 s ({hours:.1f} h), 16-bit PCM, speech-like "
        "(stretches of synthetic voices: harmonics, 4 Hz envelope; plus noise); written once as a directory (1,000 files per subdirectory) and as 1 GB "
        "shards of the same bytes (`continue-pt shards write --format original`).",
        f"- One process, one torch thread = one data-loader worker; each utterance read as training reads it "
        f"(`AudioDataset[i]`: decode, mono, resample to 16 kHz), shuffled order, {args.cell_seconds:g} s per layout "
        f"and round, {args.rounds} rounds alternating the layouts; page cache warm (files just written): this "
        "measures decoding and file access, not a cold disk or a network.",
        f"- Workers for one H100 = ceil({TARGET:,.0f} / per-worker rate): {TARGET:,.0f} audio-s/s is the HuBERT "
        "BASE throughput target on one H100 (issue 12).", "",
        C.table(["audio", "GB", "directory", "local shards", "http shards", "shards/dir, http/dir",
                 "workers for 3000 audio-s/s: dir / shards / http", "scan dir / read index (s)"], rows), "",
        "- directory, local shards, http shards: decoded audio-seconds per second per loader worker; http = the same "
        "shards served from 127.0.0.1 by a Range-answering server in another process (one kept-alive connection per "
        "worker, one Range request per utterance; no network latency, but on a machine with few cores the server "
        "takes CPU from the reader).",
    ]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--cell-seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes generating the audio")
    parser.add_argument("--smoke", action="store_true", help="16 files, tiny cells, nothing published")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--no-publish", dest="publish", action="store_false")
    args = parser.parse_args(argv)
    if args.smoke:
        args.files, args.cell_seconds, args.rounds, args.jobs, args.publish = 16, 0.05, 2, 1, False
    torch.set_num_threads(1)  # one data-loader worker's view
    command = shlex.join([".venv/bin/python", "bench/bench_loader.py", *(sys.argv[1:] if argv is None else argv)])
    info = C.machine_info() if args.publish else {}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        for rate, fmt in CELLS:
            results.append(bench_cell(Path(tmp), args.files, rate, fmt, args.cell_seconds, args.rounds, args.jobs))
            r = results[-1]
            print(f"{rate} Hz {fmt}: directory {r['directory']['rate']:,.0f}, shards {r['shards']['rate']:,.0f}, "
                  f"http {r['http']['rate']:,.0f} audio-s/s per worker (generated in {r['generate_s']:.0f} s)",
                  flush=True)
            for path in Path(tmp).iterdir():  # keep the disk use to one cell's corpus
                _remove(path)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.publish:
        C.publish(SECTION, section(results, command, info, args))
    return results


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path) if path.is_dir() else path.unlink()


if __name__ == "__main__":
    main()
