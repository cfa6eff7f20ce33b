"""Benchmark: ``continue-pt export BUNDLE --to fairseq`` and ``--to hf`` of a full-size HuBERT LARGE bundle against
copying the bundle.

    .venv/bin/python bench/bench_export.py [--repeats 3] [--keep]

The random-weight fairseq HuBERT LARGE checkpoint of bench_convert (real ``hubert_large_ll60k`` config, 24 layers,
about 1.27 GB; cached in ``bench/_work``) is converted once into a bundle. Then, each in a fresh process, page cache
warm, ``sync`` before each run, rounds interleaved, median of ``--repeats``:

* (a) baseline: ``cp -r BUNDLE copy`` wall + ``python -c "import torch"`` wall;
* (b) ``continue-pt export BUNDLE --to fairseq -o OUT.pt``;
* (c) ``continue-pt export BUNDLE --to hf -o OUT_DIR``;
* (d) for reference, not a target: ``python -c "import continue_pt.cli, ..."``, what ``continue-pt export`` of a
  bundle imports before it reads anything, so that (b) and (c) can be read as start-up plus the export's own work;
* (e) for reference: the library call ``converters.fairseq_export.export_fairseq(BUNDLE, OUT.pt)`` in a fresh
  ``python``, i.e. (b) without the command line's start-up.

Targets (the conversion's, issue 9): wall / (a) <= 1.5; (peak RSS - peak RSS of ``import torch``) / bundle size
<= 0.25. Writes its section of ``bench/RESULTS.md``; removes ``bench/_work`` at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SECTION = "bench_export"
_CLI_IMPORTS = "import continue_pt.cli, converters.fairseq_export, converters.hf_export"
_LIBRARY_EXPORT = "import sys; from converters.fairseq_export import export_fairseq; export_fairseq(*sys.argv[1:])"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep bench/_work (the cached 1.27 GB checkpoint)")
    args = ap.parse_args()
    C.run_and_clean_up(run, args, "bench_export.py")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def run(args: argparse.Namespace, command: str) -> None:
    info = C.machine_info()
    work = C.WORK
    bundle = work / "bundle"
    source = C.convertible_large_checkpoint(bundle)
    size = _size(bundle)
    C.log(f"bundle from {source.path.name}: {size / 1e9:.3f} GB")
    outputs = {"cp": work / "copy", "fairseq": work / "export.pt", "hf": work / "export_hf",
               "fairseq_library": work / "export_library.pt"}
    commands = {
        "cp": ["cp", "-r", str(bundle), str(outputs["cp"])],
        "import_torch": [C.PY, "-c", "import torch"],
        "fairseq": [C.CLI, "export", str(bundle), "--to", "fairseq", "-o", str(outputs["fairseq"])],
        "hf": [C.CLI, "export", str(bundle), "--to", "hf", "-o", str(outputs["hf"])],
        "cli_imports": [C.PY, "-c", _CLI_IMPORTS],
        "fairseq_library": [C.PY, "-c", _LIBRARY_EXPORT, str(bundle), str(outputs["fairseq_library"])],
    }
    series = {key: C.Series(key) for key in commands}
    written = {}
    for rep in range(args.repeats):
        C.warm(*sorted(p for p in bundle.iterdir() if p.is_file()))
        for key, cmd in commands.items():
            C.sync()
            r = C.measure(cmd)  # raises on a non-zero exit, with the command's output
            series[key].runs.append(r)
            target = outputs.get(key)
            if target is not None:
                if not target.exists():
                    raise RuntimeError(f"{shlex.join(cmd)} wrote nothing")
                written[key] = _size(target)
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            C.log(f"  round {rep + 1}: {key:<12} {r.wall_s:6.2f} s"
                  + (f"  peak RSS {r.peak_rss_kb / 1024:7.0f} MB" if r.peak_rss_kb else ""))

    cp, imp = series["cp"], series["import_torch"]
    baseline = cp.wall + imp.wall
    size_mb = size / 2**20

    def rss_ratio(s: C.Series) -> float:
        return (s.rss_mb - imp.rss_mb) / size_mb

    def verdict(value: float, target: float) -> str:
        return "meets" if value <= target else "**misses**"

    def cpu(s: C.Series) -> str:
        return f"{s.cpu:.2f}" if s.cpu is not None else ""

    rows = [["(a1) `cp -r BUNDLE copy`", f"{cp.wall:.2f}", cp.walls(), cpu(cp), "", ""],
            ["(a2) `python -c \"import torch\"`", f"{imp.wall:.2f}", imp.walls(), cpu(imp), f"{imp.rss_mb:.0f}", ""],
            ["(a) baseline = a1 + a2", f"{baseline:.2f}", "", "", "", ""]]
    ratio_rows = []
    for key, label in (("fairseq", "(b) `export --to fairseq`"), ("hf", "(c) `export --to hf`")):
        s = series[key]
        rows.append([label, f"{s.wall:.2f}", s.walls(), cpu(s), f"{s.rss_mb:.0f}", f"{rss_ratio(s):.3f}"])
        ratio_rows += [[f"{label}: wall / (a)", f"{s.wall / baseline:.2f}×", "≤ 1.5×", verdict(s.wall / baseline, 1.5)],
                       [f"{label}: (RSS − RSS import torch) / bundle size", f"{rss_ratio(s):.3f}×", "≤ 0.25×",
                        verdict(rss_ratio(s), 0.25)]]
    imports, library = series["cli_imports"], series["fairseq_library"]
    rows.append(["(d) what `export` imports first (reference)", f"{imports.wall:.2f}", imports.walls(), cpu(imports),
                 f"{imports.rss_mb:.0f}", f"{rss_ratio(imports):.3f}"])
    rows.append(["(e) `export_fairseq(...)`, no CLI (reference)", f"{library.wall:.2f}", library.walls(),
                 cpu(library), f"{library.rss_mb:.0f}", f"{rss_ratio(library):.3f}"])
    ratio_rows += [["(e) library `export_fairseq` (reference): wall / (a)", f"{library.wall / baseline:.2f}×",
                    "(≤ 1.5×)", verdict(library.wall / baseline, 1.5)],
                   ["(e) library `export_fairseq` (reference): (RSS − RSS import torch) / bundle size",
                    f"{rss_ratio(library):.3f}×", "(≤ 0.25×)", verdict(rss_ratio(library), 0.25)]]
    body = [
        "## bench_export: `continue-pt export` of a full-size HuBERT LARGE bundle to fairseq and to transformers",
        "",
        *C.machine_lines(info, command),
        f"- Bundle: `continue-pt convert` of bench_convert's random-weight `{C.LARGE_NAME}` checkpoint (24 layers), "
        f"{size:,} bytes; written: fairseq `.pt` {written.get('fairseq', 0):,} bytes, transformers directory "
        f"{written.get('hf', 0):,} bytes",
        f"- Method: each measurement a fresh process; page cache warm; `sync` before every run; rounds interleaved "
        f"(cp, import torch, fairseq, hf, CLI imports, library export); median of {args.repeats}; outputs removed "
        f"between runs.",
        "- (d) is `python -c \"" + _CLI_IMPORTS + "\"`: the modules `continue-pt export` imports before it reads the "
        "bundle (a training `.ckpt` would also import Lightning through `continue_pt.export`; a bundle does not). "
        "It is not a target; (b) − (d) and (c) − (d) are "
        "about the exports' own work, in time and in memory. (e) is the same fairseq export called from Python "
        "without the command line (`export_fairseq(BUNDLE, OUT)`): the targets are the CLI's, (e) says how much of "
        "(b) is the export itself.",
        "",
    ]
    if source.note:
        body += [source.note, ""]
    body += [C.table(["measurement", "wall s (median)", "runs (s)", "CPU s (median)", "peak RSS MB",
                      "(RSS − import torch) / bundle"], rows), "",
             C.table(["ratio", "value", "target", "verdict"], ratio_rows)]
    C.publish(SECTION, body)


if __name__ == "__main__":
    main()
