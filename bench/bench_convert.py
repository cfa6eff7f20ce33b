"""Benchmark: ``continue-pt convert`` of a full-size HuBERT LARGE checkpoint against copying the file.

    .venv/bin/python bench/bench_convert.py [--repeats 3] [--keep]

A random-weight fairseq HuBERT LARGE checkpoint (real ``hubert_large_ll60k`` config, all 24 layers, about
1.27 GB) is built once with fairseq and cached in ``bench/_work``. Then, each in a fresh process, with the page
cache warm (every file read once beforehand), ``sync`` before each run, rounds interleaved, median of
``--repeats``:

* (a) baseline: ``cp SRC bench/_work/copy.pt`` wall + ``python -c "import torch"`` wall;
* (b) ``continue-pt convert SRC -o OUT`` (OUT removed between runs);
* naive converter (context): ``torch.load(mmap=False, weights_only=False)`` + the family key map + 
  ``safetensors.torch.save_file``;
* ``dd bs=16M`` (context): a user-space read+write copy (``cp`` uses the kernel's ``copy_file_range``).

Targets: wall (b)/(a) <= 1.5; (peak RSS (b) - peak RSS ``import torch``) / file size <= 0.25.
``continue-pt verify OUT --against SRC`` runs once. Writes its section of ``bench/RESULTS.md``; removes
``bench/_work`` at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "bench_convert"

# (label, predicate on pstats' (file, line, function) key) for the profile breakdown of one conversion
_PROFILE_ROWS = [
    ("whole `continue-pt convert` (cProfile'd, after interpreter start)", lambda f, fn: fn == "<module>" and f.endswith("continue-pt")),
    ("  `convert_checkpoint`", lambda f, fn: fn == "convert_checkpoint"),
    ("    `read_fairseq_checkpoint` (pickle, lazy tensors)", lambda f, fn: fn == "read_fairseq_checkpoint"),
    ("    `_target_mismatches` (builds the torchaudio model on meta)", lambda f, fn: fn == "_target_mismatches"),
    ("      of which `weight_norm` on meta (lazy import of torch._dynamo, sympy)",
     lambda f, fn: fn == "weight_norm" and f.endswith("parametrizations.py")),
    ("    `write_safetensors_streaming` (both files)", lambda f, fn: fn == "write_safetensors_streaming"),
    ("      `LazyTensor.load` (allocate + read each tensor)", lambda f, fn: fn == "load" and f.endswith("torch_file.py")),
    ("        `readinto`", lambda f, fn: fn == "<method 'readinto' of '_io.BufferedReader' objects>"),
    ("      `write` of the tensor bytes", lambda f, fn: fn == "<method 'write' of '_io.BufferedWriter' objects>"),
    ("    waiting for the background sha256 (`Thread.join`)", lambda f, fn: fn == "join" and f.endswith("threading.py")),
]


def profile_summary(prof: Path) -> str:
    import pstats

    stats = pstats.Stats(str(prof)).stats  # {(file, line, fn): (cc, nc, tottime, cumtime, callers)}
    rows = []
    for label, pred in _PROFILE_ROWS:
        hits = [(v[3], v[1]) for (f, _line, fn), v in stats.items() if pred(f, fn)]
        if hits:
            cum = max(h[0] for h in hits) if "whole" in label else sum(h[0] for h in hits)
            rows.append([label, f"{cum:.2f}", str(sum(h[1] for h in hits))])
    return C.table(["part (one extra run under cProfile; profiling adds overhead)", "cumulative s", "calls"], rows)


def naive_worker(src: str, out: str) -> None:
    """The naive converter: everything in memory at once."""
    import torch
    from safetensors.torch import save_file

    from converters.families.hubert import PRETRAIN_KEY_MAP

    t0 = time.perf_counter()
    ckpt = torch.load(src, mmap=False, weights_only=False)  # unpickling imports fairseq (Dictionary objects)
    state = ckpt["model"]
    mapped = PRETRAIN_KEY_MAP.classify(state.keys()).mapped
    t1 = time.perf_counter()
    save_file({mapped[k]: v.contiguous() for k, v in state.items() if k in mapped}, out)
    print(f"load {t1 - t0:.2f} s, save {time.perf_counter() - t1:.2f} s, {len(mapped)} tensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep bench/_work (the cached 1.27 GB checkpoint)")
    ap.add_argument("--naive-worker", nargs=2, metavar=("SRC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_worker:
        naive_worker(*args.naive_worker)
        return
    C.run_and_clean_up(run, args, "bench_convert.py")


def run(args: argparse.Namespace, command: str) -> None:
    info = C.machine_info()
    work = C.WORK
    out = work / "bundle_out"
    copy = work / "copy.pt"
    dd_copy = work / "dd_copy.pt"
    naive_out = work / "naive.safetensors"

    # Untimed first conversion: checks the CLI accepts the checkpoint, warms caches, and is what verify checks.
    source = C.convertible_large_checkpoint(out)
    src = source.path
    size = src.stat().st_size
    C.log(f"source {src.name}: {size / 1e9:.3f} GB")

    C.log("continue-pt verify (once) ...")
    C.sync()
    verify = C.measure([C.CLI, "verify", str(out), "--against", str(src)])
    verify_line = verify.stdout.strip().splitlines()[-1] if verify.stdout.strip() else "(no output)"
    shutil.rmtree(out, ignore_errors=True)

    C.log("one conversion under cProfile (breakdown) ...")
    prof = work / "convert.prof"
    C.warm(src)
    C.sync()
    C.measure([C.PY, "-m", "cProfile", "-o", str(prof), C.CLI, "convert", str(src), "-o", str(out)], rss=False)
    breakdown = profile_summary(prof)
    prof.unlink()
    shutil.rmtree(out, ignore_errors=True)

    series = {key: C.Series(key) for key in ("cp", "import_torch", "convert", "naive", "dd")}
    commands = {
        "cp": ["cp", str(src), str(copy)],
        "import_torch": [C.PY, "-c", "import torch"],
        "convert": [C.CLI, "convert", str(src), "-o", str(out)],
        "naive": [C.PY, str(Path(__file__).resolve()), "--naive-worker", str(src), str(naive_out)],
        "dd": ["dd", f"if={src}", f"of={dd_copy}", "bs=16M", "status=none"],
    }
    cleanup_after = {"cp": copy, "convert": out, "naive": naive_out, "dd": dd_copy}
    naive_detail = []
    for rep in range(args.repeats):
        C.warm(src)
        for key, cmd in commands.items():
            C.sync()
            r = C.measure(cmd)
            series[key].runs.append(r)
            if key == "naive":
                naive_detail.append(r.stdout.strip())
            target = cleanup_after.get(key)
            if target is not None:
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            C.log(f"  round {rep + 1}: {key:<12} {r.wall_s:6.2f} s"
                  + (f"  peak RSS {r.peak_rss_kb / 1024:7.0f} MB" if r.peak_rss_kb else ""))

    cp, imp, conv, naive, dd = (series[k] for k in ("cp", "import_torch", "convert", "naive", "dd"))
    baseline = cp.wall + imp.wall
    size_mb = size / 2**20

    def rss_ratio(s: C.Series) -> float:
        return (s.rss_mb - imp.rss_mb) / size_mb

    def ok(value: float, target: float, le: bool = True) -> str:
        return "meets" if (value <= target if le else value >= target) else "**misses**"

    wall_ratio = conv.wall / baseline
    def cpu(s: C.Series) -> str:
        return f"{s.cpu:.2f}" if s.cpu is not None else ""

    rows = [
        ["(a1) `cp SRC copy.pt`", f"{cp.wall:.2f}", cp.walls(), cpu(cp), "", ""],
        ["(a2) `python -c \"import torch\"`", f"{imp.wall:.2f}", imp.walls(), cpu(imp), f"{imp.rss_mb:.0f}", ""],
        ["(a) baseline = a1 + a2", f"{baseline:.2f}", "", "", "", ""],
        ["(b) `continue-pt convert SRC -o OUT`", f"{conv.wall:.2f}", conv.walls(), cpu(conv), f"{conv.rss_mb:.0f}",
         f"{rss_ratio(conv):.3f}"],
        ["naive: torch.load + key map + save_file", f"{naive.wall:.2f}", naive.walls(), cpu(naive),
         f"{naive.rss_mb:.0f}", f"{rss_ratio(naive):.3f}"],
        ["context: `dd bs=16M` (user-space copy)", f"{dd.wall:.2f}", dd.walls(), cpu(dd), "", ""],
    ]
    tbl = C.table(["measurement", "wall s (median)", "runs (s)", "CPU s (median)", "peak RSS MB",
                   "(RSS − import torch) / file"], rows)
    ratios = C.table(
        ["ratio", "value", "target", "verdict"],
        [["wall (b) / (a)", f"{wall_ratio:.2f}×", "≤ 1.5×", ok(wall_ratio, 1.5)],
         ["(RSS (b) − RSS import torch) / file size", f"{rss_ratio(conv):.3f}×", "≤ 0.25×",
          ok(rss_ratio(conv), 0.25)],
         ["naive: wall / (a)", f"{naive.wall / baseline:.2f}×", "(context)", ""],
         ["naive: (RSS − RSS import torch) / file size", f"{rss_ratio(naive):.3f}×", "(context)", ""],
         ["(b) wall / naive wall", f"{conv.wall / naive.wall:.2f}×", "(context)", ""]])
    verify_ok = "succeeded" if verify_line.startswith("ok") else "FAILED"

    body = [
        "## bench_convert: `continue-pt convert` of a full-size HuBERT LARGE checkpoint",
        "",
        *C.machine_lines(info, command),
        f"- Source: random-weight fairseq HuBERT LARGE from the real `{C.LARGE_NAME}` config (24 layers), built "
        f"with fairseq (`tests/fairseq_reference.py`, era \"dict\"), `{src.name}`, {size:,} bytes "
        f"({size / 1e9:.3f} GB)",
        f"- Method: each measurement a fresh process; page cache warm (source read before each round); `sync` "
        f"before every run; rounds interleaved (cp, import torch, convert, naive, dd); median of {args.repeats}; "
        "outputs removed between runs. Wall time measured around the whole process.",
        "",
    ]
    if source.note:
        body += [source.note, ""]
    body += [
        tbl,
        "",
        ratios,
        "",
        f"- `continue-pt verify OUT --against SRC`: {verify_ok} (`{verify_line}`), {verify.wall_s:.1f} s, "
        f"peak RSS {verify.peak_rss_kb / 1024:.0f} MB",
        f"- naive converter, in-process split (load / save) per run: {'; '.join(naive_detail)}",
        "",
        breakdown,
        "",
        "- `cp` (coreutils) copies with `copy_file_range`, in the kernel: no user-space read or write; "
        "`dd bs=16M` shows what a plain user-space read+write copy of the same bytes costs here.",
    ]
    C.publish(SECTION, body)


if __name__ == "__main__":
    main()
