"""Benchmark: a full-size data2vec 2.0 checkpoint (random weights, the published BASE config; LARGE with --large)
converted and compared with fairseq block by block, and the encoder's forward time, fairseq vs ours.

    .venv/bin/python bench/bench_data2vec2.py [--large] [--repeats 3] [--keep]

fairseq's own data2vec 2.0 code (tests/data2vec2_reference.py) builds the model from
tests/fairseq_configs/data2vec2_base_libri.json (12 blocks, 768 wide; LARGE: 8 prenet + 16 blocks, 1024 wide) with its
EMA teacher and decoder, and saves it as fairseq's trainer does. Then, in this process: ``convert_checkpoint`` (time,
sizes), the largest difference of every main block's output on a padded batch (2.0 s and 1.3 s of audio), and the
forward time of ``extract_features`` over the same batch, fairseq's ``Data2VecMultiModel`` (eval) vs
``load_bundle(d).get_model()`` (median of --repeats, after one warm-up). Writes its section of bench/RESULTS.md
(one for BASE, one for LARGE).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="the LARGE config instead of BASE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep bench/_work/data2vec2")
    args = parser.parse_args()

    import torch

    from bundles.loading import load_bundle
    from converters.convert import convert_checkpoint
    from tests.data2vec2_reference import build_data2vec2_model, fairseq_block_outputs, save_data2vec2_checkpoint

    info = C.machine_info()
    name = "data2vec2_large_vox" if args.large else "data2vec2_base_libri"
    work = C.WORK / "data2vec2"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    ref = build_data2vec2_model(name, seed=0)
    built = time.perf_counter() - start
    src = work / f"{name}.pt"
    save_data2vec2_checkpoint(ref, src, num_updates=400000)
    start = time.perf_counter()
    bundle = load_bundle(convert_checkpoint(src, work / "bundle"))
    converted = time.perf_counter() - start
    bundle_bytes = sum(p.stat().st_size for p in (work / "bundle").iterdir())

    g = torch.Generator().manual_seed(0)
    wav = torch.randn(2, 32000, generator=g) * torch.tensor([[0.1], [3.0]])
    lengths = torch.tensor([32000, 20800])
    theirs, _, _ = fairseq_block_outputs(ref, wav, lengths)
    model = bundle.get_model()
    with torch.no_grad():
        ours, frames = model.extract_features(wav, lengths)
    worst = max(float((t[b, :n] - o[b, :n]).abs().max()) for t, o in zip(theirs, ours)
                for b, n in enumerate(frames.tolist()))
    fairseq_s = _median_time(lambda: fairseq_block_outputs(ref, wav, lengths), args.repeats)

    def ours_forward() -> None:
        with torch.no_grad():
            model.extract_features(wav, lengths)

    ours_s = _median_time(ours_forward, args.repeats)
    enc = bundle.config.encoder_args
    rows = [
        ["fairseq model built (random weights)", f"{built:.1f} s"],
        ["checkpoint", f"{src.stat().st_size / 2**20:.0f} MiB"],
        ["convert_checkpoint", f"{converted:.1f} s"],
        ["bundle (student + decoder + teacher)", f"{bundle_bytes / 2**20:.0f} MiB"],
        ["blocks compared", f"{len(ours)} (prenet {enc['prenet_depth']}), width {enc['encoder_embed_dim']}"],
        ["largest difference from fairseq, every block, valid frames", f"{worst:.2e}"],
        ["extract_features, fairseq (eval)", f"{fairseq_s:.3f} s"],
        ["extract_features, ours (load_bundle(d).get_model())", f"{ours_s:.3f} s"],
    ]
    body = [f"## bench_data2vec2: a full-size data2vec 2.0 {'LARGE' if args.large else 'BASE'} checkpoint, "
            "converted and compared with fairseq", "",
            *C.machine_lines(info, "bench/bench_data2vec2.py" + (" --large" if args.large else "")), "",
            "Batch: 2 utterances (2.0 s and 1.3 s, padded), CPU, float32, median of "
            f"{args.repeats} after one warm-up.", "", C.table(["what", "value"], rows)]
    C.publish("bench_data2vec2_large" if args.large else "bench_data2vec2", body)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
