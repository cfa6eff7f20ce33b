"""Benchmark: loading a converted HuBERT LARGE bundle against torchaudio's usual ``torch.load`` path.

    .venv/bin/python bench/bench_load.py [--repeats 3] [--keep]

The full-size random HuBERT LARGE checkpoint (see bench_convert.py; cached in ``bench/_work``) is converted
with ``continue-pt convert``; the bundle's encoder weights are written once as a plain torchaudio-keyed
state dict (``torch.save``). Then, each in a fresh process, page cache warm, median of ``--repeats``:

* (a) ``bundles.load_bundle(d).get_model()`` (meta-device model + memory-mapped safetensors, assigned);
* (b) ``torchaudio.models.hubert_large()`` + ``torch.load(plain.pt, weights_only=True)`` + ``load_state_dict``;
* (c, context) plain torch done lazily: ``hubert_large()`` on the meta device +
  ``torch.load(plain.pt, mmap=True, weights_only=True)`` + ``load_state_dict(assign=True)``.

Times are taken inside the process, from after the imports (torch, torchaudio, bundles) until the model is
ready. Then ONE tensor (the last layer's FFN output weight, 16 MiB of the 1.27 GB) is summed as a checksum:
touching every weight would page in the whole memory map and defeat the lazy loading being measured. Then
one forward pass over 1 s of audio (16 kHz) gives the end-to-end first-inference time; (b) and (c) get the
waveform layer-normalised as the bundle's wrapper does, so all outputs must agree.

Target: (b) / (a) >= 5 (time to model ready). Writes its section of ``bench/RESULTS.md``; removes
``bench/_work`` at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "bench_load"
MODES = ("bundle", "plain", "plain_lazy")
LABELS = {
    "bundle": "(a) `load_bundle(d).get_model()`",
    "plain": "(b) `hubert_large()` + `torch.load` + `load_state_dict`",
    "plain_lazy": "(c) context: meta `hubert_large()` + `torch.load(mmap=True)` + `assign=True`",
}

_EXPORT_SCRIPT = r"""
import sys, torch
from bundles import load_bundle
model = load_bundle(sys.argv[1]).get_model()
encoder = getattr(model, "model", model)  # NormalizingWav2Vec2Model wraps the torchaudio Wav2Vec2Model
state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
torch.save(state, sys.argv[2])
print(len(state))
"""


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def parts_worker(path: str) -> None:
    """Where (a)'s time goes: the steps of ``Bundle.get_model`` one by one (prints one JSON line)."""
    import torch  # noqa: F401
    import torchaudio  # noqa: F401

    from bundles import load_bundle
    from bundles.factory import build_encoder

    t0 = time.perf_counter()
    bundle = load_bundle(path)
    t1 = time.perf_counter()
    build_encoder(bundle.config)
    t2 = time.perf_counter()
    build_encoder(bundle.config)
    t3 = time.perf_counter()
    bundle.state_dict()
    t4 = time.perf_counter()
    bundle.get_model()
    t5 = time.perf_counter()
    print(json.dumps({"load_bundle (config.json)": t1 - t0, "first build_encoder on meta": t2 - t1,
                      "second build_encoder on meta": t3 - t2, "state_dict (safetensors load_file, mmap)": t4 - t3,
                      "get_model again (build + assign, imports done)": t5 - t4}))


def worker(mode: str, path: str) -> None:
    """One measurement, in its own process: prints one JSON line."""
    if mode == "parts":
        parts_worker(path)
        return
    t_start = time.perf_counter()
    import torch
    import torchaudio
    from torch.nn import functional as F

    from bundles import load_bundle

    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "bundle":
        model = load_bundle(path).get_model()
        encoder = getattr(model, "model", model)
    elif mode == "plain":
        model = torchaudio.models.hubert_large()
        model.load_state_dict(torch.load(path, weights_only=True))
        encoder = model.eval()
    elif mode == "plain_lazy":
        with torch.device("meta"):
            model = torchaudio.models.hubert_large()
        model.load_state_dict(torch.load(path, weights_only=True, mmap=True), assign=True)
        encoder = model.eval()
    else:
        raise ValueError(mode)
    t_ready, c_ready = time.perf_counter(), time.process_time()
    rss_ready = _rss_now_mb()

    weight = encoder.encoder.transformer.layers[-1].feed_forward.output_dense.weight  # one tensor only
    checksum = float(weight.double().sum())
    t_checksum, c_checksum = time.perf_counter(), time.process_time()

    wav = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        if mode == "bundle":
            out, _ = model(wav)  # the bundle's wrapper layer-normalises the waveform (task.normalize)
        else:
            out, _ = model(F.layer_norm(wav, wav.shape[-1:], eps=1e-5))
    t_forward, c_forward = time.perf_counter(), time.process_time()
    print(json.dumps({
        "imports_s": t0 - t_start,
        "ready_s": t_ready - t0,
        "ready_cpu_s": c_ready - c0,
        "forward_cpu_s": c_forward - c_checksum,
        "checksum_s": t_checksum - t_ready,
        "forward_s": t_forward - t_checksum,
        "end_to_end_s": t_forward - t0,
        "rss_ready_mb": rss_ready,
        "rss_after_forward_mb": _rss_now_mb(),
        "checksum": checksum,
        "out_shape": list(out.shape),
        "out_sum": float(out.double().sum()),
        "out_head": [float(x) for x in out[0, 0, :4]],
        "type": type(model).__name__,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep bench/_work (the cached 1.27 GB checkpoint)")
    ap.add_argument("--worker", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    C.run_and_clean_up(run, args, "bench_load.py")


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)


def run(args: argparse.Namespace, command: str) -> None:
    info = C.machine_info()
    bundle = C.WORK / "large_bundle"
    plain = C.WORK / "large_plain_state_dict.pt"
    source = C.convertible_large_checkpoint(bundle)  # continue-pt convert SRC -o bundle
    C.log(f"bundle {bundle.relative_to(C.REPO)} from {source.path.name}")
    if not plain.is_file():
        n = subprocess.run([C.PY, "-c", _EXPORT_SCRIPT, str(bundle), str(plain)], cwd=C.REPO, check=True,
                           capture_output=True, text=True).stdout.strip()
        C.log(f"wrote {plain.relative_to(C.REPO)}: {n} tensors, {plain.stat().st_size / 1e9:.3f} GB")
    model_file = bundle / "model.safetensors"
    path_of = {"bundle": bundle, "plain": plain, "plain_lazy": plain}

    results: dict[str, list[dict]] = {m: [] for m in MODES}
    walls: dict[str, list[C.Run]] = {m: [] for m in MODES}
    for rep in range(args.repeats):
        C.warm(model_file, plain)
        for mode in MODES:
            C.sync()
            r = C.measure([C.PY, str(Path(__file__).resolve()), "--worker", mode, str(path_of[mode])])
            data = json.loads(r.stdout.strip().splitlines()[-1])
            results[mode].append(data)
            walls[mode].append(r)
            C.log(f"  round {rep + 1}: {mode:<10} ready {data['ready_s']:6.2f} s, forward {data['forward_s']:5.2f} s, "
                  f"end-to-end {data['end_to_end_s']:6.2f} s, process {r.wall_s:6.2f} s, "
                  f"peak RSS {r.peak_rss_kb / 1024:6.0f} MB")

    C.log("one extra run: get_model step by step ...")
    parts = json.loads(C.measure([C.PY, str(Path(__file__).resolve()), "--worker", "parts", str(bundle)],
                                 rss=False).stdout.strip().splitlines()[-1])
    parts_tbl = C.table(["step of (a), one extra run", "s"], [[k, f"{v:.3f}"]
                                                            for k, v in parts.items()])

    def med(mode: str, key: str) -> float:
        return median([d[key] for d in results[mode]])

    def runs(mode: str, key: str) -> str:
        return ", ".join(f"{d[key]:.2f}" for d in results[mode])

    rows = []
    for mode in MODES:
        rows.append([
            LABELS[mode],
            f"{med(mode, 'ready_s'):.2f}", runs(mode, "ready_s"), f"{med(mode, 'ready_cpu_s'):.2f}",
            f"{med(mode, 'checksum_s') * 1000:.0f}",
            f"{med(mode, 'forward_s'):.2f}",
            f"{med(mode, 'end_to_end_s'):.2f}", runs(mode, "end_to_end_s"),
            f"{med(mode, 'imports_s'):.2f}",
            f"{median([r.wall_s for r in walls[mode]]):.2f}",
            f"{med(mode, 'rss_ready_mb'):.0f}",
            f"{median([r.peak_rss_kb for r in walls[mode]]) / 1024:.0f}",
        ])
    tbl = C.table(["load path", "ready s (median)", "ready runs", "ready CPU s", "1-tensor checksum ms", "forward 1 s audio s",
                   "ready + forward s", "ready + forward runs", "imports s", "whole process s",
                   "RSS at ready MB", "peak RSS MB"], rows)

    ready_ratio = med("plain", "ready_s") / med("bundle", "ready_s")
    e2e_ratio = med("plain", "end_to_end_s") / med("bundle", "end_to_end_s")
    lazy_ratio = med("plain_lazy", "ready_s") / med("bundle", "ready_s")
    ratios = C.table(["ratio", "value", "target", "verdict"], [
        ["ready: (b) / (a)", f"{ready_ratio:.1f}×", "≥ 5×", "meets" if ready_ratio >= 5 else "**misses**"],
        ["ready + first forward: (b) / (a)", f"{e2e_ratio:.1f}×", "(context)", ""],
        ["ready: (c) / (a)", f"{lazy_ratio:.2f}×", "(context)", ""],
    ])

    # Same weights, same outputs? (all runs of all modes)
    sums = {m: {d["out_sum"] for d in results[m]} for m in MODES}
    checks = {m: {d["checksum"] for d in results[m]} for m in MODES}
    ref_sum = results["plain"][0]["out_sum"]
    max_rel = max(abs(s - ref_sum) / max(abs(ref_sum), 1e-12) for m in MODES for s in sums[m])
    same_checksum = len(set().union(*checks.values())) == 1
    shape = results["bundle"][0]["out_shape"]

    body = [
        "## bench_load: loading the converted HuBERT LARGE bundle vs torchaudio's `torch.load` path",
        "",
        *C.machine_lines(info, command),
        f"- Bundle: `continue-pt convert` of the random HuBERT LARGE checkpoint `{source.path.name}` (real "
        f"`{C.LARGE_NAME}` config, 24 layers); `model.safetensors` {model_file.stat().st_size:,} bytes. Plain "
        f"state dict for (b)/(c): the bundle's encoder weights under torchaudio's keys, `torch.save`d once "
        f"({plain.stat().st_size:,} bytes).",
        f"- Method: each run a fresh process; page cache warm (both files read before each round); `sync` before "
        f"every run; rounds interleaved (a, b, c); median of {args.repeats}. Times are measured inside the process "
        "from after `import torch, torchaudio, bundles` to the model being ready (eval mode); 'imports' and "
        "'whole process' are given for context.",
        "- Checksum: ONE tensor only (`encoder.transformer.layers[-1].feed_forward.output_dense.weight`, "
        "16 MiB) is summed after 'ready' and before the forward, so that the memory-mapped weights of (a)/(c) "
        "are not all paged in before the forward pass is timed; the forward pass then touches every weight.",
        "- Forward: one `model(wav)` under `torch.inference_mode()` on 1 s of 16 kHz noise (seeded); (a)'s "
        "wrapper layer-normalises the waveform itself, (b)/(c) get `F.layer_norm(wav)`.",
    ]
    if source.note:
        body += ["", source.note]
    body += [
        "",
        tbl,
        "",
        ratios,
        "",
        f"- Same weights: checksum of the touched tensor equal in every run of every path: "
        f"{'yes' if same_checksum else '**NO**'}; output {shape}, largest relative difference of the output sums "
        f"between runs/paths: {max_rel:.1e}.",
        "",
        parts_tbl,
        "",
        "- 'RSS at ready' is the resident set right when the model is ready: (a)/(c) have not read the weights "
        "yet (the safetensors / torch files are memory-mapped), (b) holds them all (and freed the random init).",
    ]
    C.publish(SECTION, body)


if __name__ == "__main__":
    main()
