"""Shared helpers of the benchmarks in ``bench/`` (stdlib only, so that worker start-up stays cheap).

* :func:`ensure_large_checkpoint`: a full-size random-weight HuBERT LARGE fairseq checkpoint (the real
  ``hubert_large_ll60k`` config, 24 layers) built once by fairseq in a subprocess and cached in ``bench/_work``.
* :func:`measure`: run a command in a fresh process, wall time + peak RSS (``/usr/bin/time`` or a getrusage wrapper).
* :func:`machine_info`, :func:`write_section`: the header and the per-benchmark section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = BENCH / "_work"
RESULTS = BENCH / "RESULTS.md"
VENV_BIN = REPO / ".venv" / "bin"
PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
CLI = str(VENV_BIN / "continue-pt")

LARGE_NAME = "hubert_large_ll60k"
LARGE_SEED = 0
LARGE_CKPT = WORK / f"{LARGE_NAME}_random_seed{LARGE_SEED}.pt"


def large_checkpoint_path(feature_grad_mult: float | None = None) -> Path:
    if feature_grad_mult is None:
        return LARGE_CKPT
    return LARGE_CKPT.with_name(f"{LARGE_CKPT.stem}_fgm{feature_grad_mult:g}.pt")

_BUILD_SCRIPT = r"""
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
t0 = time.perf_counter()
from tests.fairseq_reference import build_fairseq_model, save_checkpoint
ref = build_fairseq_model({name!r}, num_layers=24, seed={seed})
if {fgm!r} is not None:
    ref.cfg.model.feature_grad_mult = {fgm!r}
t1 = time.perf_counter()
save_checkpoint(ref, Path({tmp!r}), era="dict")
print(f"built in {{t1 - t0:.1f}} s, saved in {{time.perf_counter() - t1:.1f}} s", flush=True)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_large_checkpoint(feature_grad_mult: float | None = None) -> Path:
    """The cached full-size random HuBERT LARGE checkpoint (built with fairseq the first time).

    ``feature_grad_mult`` (only as a workaround, see bench_convert.py) overrides that one config value; the
    tensors (same seed) are identical.
    """
    path = large_checkpoint_path(feature_grad_mult)
    WORK.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        log(f"using cached {path.relative_to(REPO)} ({path.stat().st_size / 1e9:.3f} GB)")
        return path
    tmp = path.with_suffix(".pt.partial")
    log(f"building {LARGE_NAME} (24 layers, random weights) with fairseq -> {path.relative_to(REPO)} ...")
    script = _BUILD_SCRIPT.format(repo=str(REPO), name=LARGE_NAME, seed=LARGE_SEED, tmp=str(tmp),
                                  fgm=feature_grad_mult)
    try:
        subprocess.run([PY, "-W", "ignore", "-c", script], cwd=REPO, check=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"  {path.stat().st_size / 1e9:.3f} GB")
    return path


def reference_and_bundle(name: str, work: Path, seed: int, **build_options: object) -> tuple[object, object]:
    """(random-weight fairseq model of config ``name`` with all its layers, its bundle): built every time (the
    same seed gives the same weights), saved as a fairseq checkpoint and converted once (cached in ``work``)."""
    from bundles.loading import load_bundle
    from converters.convert import convert_checkpoint
    from tests.fairseq_reference import build_fairseq_model, save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    layers = int(build_options.pop("num_layers", 12))
    ref = build_fairseq_model(name, num_layers=layers, seed=seed, **build_options)
    log(f"built fairseq {name} ({layers} layers, random weights) in {time.perf_counter() - t0:.1f} s")
    ckpt = work / f"{name}_random_seed{seed}.pt"
    bundle_dir = work / "bundle"
    if not ckpt.is_file():
        save_checkpoint(ref, ckpt.with_suffix(".partial"), "dict")
        ckpt.with_suffix(".partial").replace(ckpt)
        shutil.rmtree(bundle_dir, ignore_errors=True)
    if not (bundle_dir / "config.json").is_file():
        convert_checkpoint(ckpt, bundle_dir, overwrite=True)
    log(f"checkpoint {ckpt.stat().st_size / 1e6:.0f} MB, bundle ready ({time.perf_counter() - t0:.1f} s)")
    return ref, load_bundle(bundle_dir)


def interleaved_rounds(fns: dict[str, Callable[[int], dict[str, Any]]], rounds: int
                       ) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """One warm-up call of each of ``fns`` (``fn(0)``), then ``rounds`` rounds calling each in turn with the
    round number: the same conditions for every function within a round. Returns each function's results (dicts
    with ``"s"``, optionally ``"fwd"``/``"bwd"``/``"layers"``) and the 1-minute load average before each round."""
    for fn in fns.values():
        fn(0)
    log("warm-up done")
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in fns}
    loads: list[str] = []
    for i in range(1, rounds + 1):
        loads.append(f"{os.getloadavg()[0]:.2f}")
        for key, fn in fns.items():
            r = fn(i)
            runs[key].append(r)
            parts = [f"  round {i}: ({key}) {r['s']:.3f} s"]
            if "fwd" in r:
                parts.append(f"(fwd {r['fwd']:.3f}, bwd {r['bwd']:.3f})")
            if "layers" in r:
                parts.append(f" layers run {r['layers']}")
            log(" ".join(parts))
    return runs, loads


def step_bench_main(description: str, script: str, work_name: str,
                    run: Callable[[argparse.Namespace, str, Path], None], rounds_help: str) -> None:
    """Command line of the training-step benchmarks: ``--steps`` (timed rounds, >= 5), ``--keep`` (the cached
    checkpoint + bundle in ``bench/_work/WORK_NAME``), ``--no-profile``; ``run(args, command, work)``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=7, help=f"timed rounds ({rounds_help}) after the warm-up (>= 5)")
    ap.add_argument("--keep", action="store_true", help=f"keep bench/_work/{work_name} (checkpoint + bundle)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler tables")
    args = ap.parse_args()
    if args.steps < 5:
        ap.error("--steps must be >= 5")
    command = shlex.join([".venv/bin/python", f"bench/{script}", *sys.argv[1:]])
    work = WORK / work_name
    started = time.perf_counter()
    try:
        run(args, command, work)
    finally:
        remove_work(work, args.keep)
    log(f"total {time.perf_counter() - started:.0f} s")


def warm(*paths: Path) -> None:
    """Read every byte of ``paths`` once so that the page cache holds them."""
    for p in paths:
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                buf = bytearray(16 << 20)
                while fh.readinto(buf):
                    pass


def sync() -> None:
    """Flush dirty pages so that one run's write-back does not land in the next run's timing."""
    os.sync()


# ----------------------------------------------------------------------------------------------- measuring

_TIME_BIN = shutil.which("time", path="/usr/bin:/bin")
_RUSAGE_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.call(sys.argv[2:])\n"
    "ru = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(f'{ru.ru_maxrss} {ru.ru_utime} {ru.ru_stime}')\n"
    "sys.exit(rc)\n"
)


def rss_method() -> str:
    return ("`/usr/bin/time -f '%M %U %S'` (GNU time: peak RSS, user + system CPU)" if _TIME_BIN
            else "`getrusage(RUSAGE_CHILDREN)` wrapper (ru_maxrss, ru_utime + ru_stime)")


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


@dataclass
class Run:
    wall_s: float
    peak_rss_kb: int | None
    stdout: str
    cpu_s: float | None = None  # user + system CPU time of the process


def measure(cmd: list[str], *, rss: bool = True, env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` once in a fresh process; wall time measured here around the whole process, peak RSS of it.

    The RSS wrapper's own start-up (``/usr/bin/time`` is tiny) is inside the wall time; it is a few ms.
    """
    full_env = {**os.environ, **(env or {})}
    with tempfile.NamedTemporaryFile("r", suffix=".rss", dir=WORK, delete=False) as tf:
        rss_file = tf.name
    try:
        if rss and _TIME_BIN:
            wrapped = [_TIME_BIN, "-f", "%M %U %S", "-o", rss_file, *cmd]
        elif rss:
            wrapped = [sys.executable, "-c", _RUSAGE_WRAPPER, rss_file, *cmd]
        else:
            wrapped = cmd
        t0 = time.perf_counter()
        proc = subprocess.run(wrapped, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
        kb = cpu = None
        if rss:
            text = Path(rss_file).read_text().strip().splitlines()
            if text:
                fields = text[-1].split()
                kb, cpu = int(fields[0]), float(fields[1]) + float(fields[2])
        return Run(wall, kb, proc.stdout, cpu)
    finally:
        Path(rss_file).unlink(missing_ok=True)


@dataclass
class Series:
    """Repeated runs of one measurement: medians of wall time and peak RSS."""

    label: str
    runs: list[Run] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(r.wall_s for r in self.runs)

    @property
    def rss_mb(self) -> float | None:
        vals = [r.peak_rss_kb for r in self.runs if r.peak_rss_kb is not None]
        return statistics.median(vals) / 1024 if vals else None

    @property
    def cpu(self) -> float | None:
        vals = [r.cpu_s for r in self.runs if r.cpu_s is not None]
        return statistics.median(vals) if vals else None

    def walls(self) -> str:
        return ", ".join(f"{r.wall_s:.2f}" for r in self.runs)


# ----------------------------------------------------------------------------------------------- reporting


def _meminfo_gb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def _cpu_model() -> str:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # first processor only
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or "unknown"
    extra = [f"{k} {fields[k]}" for k in ("cpu family", "model", "cpu MHz") if k in fields]
    return f"{name} ({', '.join(extra)})" if extra else name


def machine_info() -> dict[str, str]:
    versions = subprocess.run(
        [PY, "-c", "import torch, torchaudio, safetensors; print(torch.__version__, torchaudio.__version__, "
                   "safetensors.__version__, torch.get_num_threads())"],
        capture_output=True, text=True, check=True).stdout.split()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "ram": f"{_meminfo_gb():.1f} GiB",
        "python": platform.python_version(),
        "torch": versions[0],
        "torchaudio": versions[1],
        "safetensors": versions[2],
        "torch_threads": versions[3],
        "rss": rss_method(),
        "load_start": load_average(),
    }


def machine_lines(info: dict[str, str], command: str, gpu: str | None = None) -> list[str]:
    """The header lines of a section; ``gpu``: the GPU the benchmark used (None: none was used)."""
    return [
        f"- Date: {info['date']}",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, "
        + (f"GPU: {gpu}" if gpu else "no GPU used"),
        f"- Software: Python {info['python']}, torch {info['torch']}, torchaudio {info['torchaudio']}, "
        f"safetensors {info['safetensors']} (torch threads: {info['torch_threads']})",
        f"- Command: `{command}` (from the repository root)",
        f"- Peak RSS and CPU time: {info['rss']}",
        f"- Load average (1/5/15 min) at start: {info['load_start']}; at end: {load_average()}. The machine is "
        "shared with other sessions' work (tests, installs), so single runs can be slowed; all runs are listed.",
    ]


_HEADER = """# Benchmarks

Each section below is (re)written by the script named in it; run from the repository root. Sections are
delimited by HTML comments so that the scripts do not overwrite each other.
"""


def write_section(name: str, body: str) -> None:
    """Replace (or append) the ``<!-- name -->`` ... ``<!-- /name -->`` section of ``bench/RESULTS.md``."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else _HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (also readable as plain text)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def publish(section: str, body: list[str]) -> None:
    """Write ``body`` as the ``section`` of bench/RESULTS.md and print it."""
    text = "\n".join(body)
    write_section(section, text)
    print(text)
    print(f"\n(wrote section '{section}' of {RESULTS.relative_to(REPO)})")


def publish_or_print(section: str, body: list[str], to_results: bool) -> None:
    """:func:`publish` ``body``, or only print it (a script's ``--no-publish``)."""
    if to_results:
        publish(section, body)
    else:
        print("\n".join(body))


def run_and_clean_up(run: Callable[[Any, str], None], args: Any, script: str) -> None:
    """``run(args, command)`` with the script's command line as a benchmark records it; ``bench/_work`` is removed
    afterwards (unless ``args.keep``), also when the run fails, and the total time is logged."""
    command = shlex.join([".venv/bin/python", f"bench/{script}", *sys.argv[1:]])
    started = time.perf_counter()
    try:
        run(args, command)
    finally:
        cleanup(args.keep)
    log(f"total {time.perf_counter() - started:.0f} s")


def script_main(run: Callable[[Any, str], None], script: str, doc: str,
                add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """A benchmark's command line: its own arguments (``add_arguments``), ``--keep`` and ``--no-publish``; then
    :func:`run_and_clean_up`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    if add_arguments is not None:
        add_arguments(parser)
    parser.add_argument("--keep", action="store_true", help="keep bench/_work")
    parser.add_argument("--no-publish", action="store_true", help="print the section, leave bench/RESULTS.md alone")
    run_and_clean_up(run, parser.parse_args(), Path(script).name)


def remove_work(work: Path, keep: bool) -> None:
    """Delete a benchmark's scratch folder unless ``--keep`` was given."""
    if keep:
        log(f"--keep: leaving {work.relative_to(REPO)} in place")
    else:
        shutil.rmtree(work, ignore_errors=True)
        log(f"removed {work.relative_to(REPO)}")


def cleanup(keep: bool) -> None:
    remove_work(WORK, keep)


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=1)


# ----------------------------------------------------------------------------------------------- the source


@dataclass
class Source:
    """The checkpoint a benchmark converts, and what happened when the real-config one was tried."""

    path: Path
    real_config: bool
    note: str  # empty when the real-config checkpoint converted


def cli_convert(src: Path, out: Path) -> subprocess.CompletedProcess:
    shutil.rmtree(out, ignore_errors=True)
    return subprocess.run([CLI, "convert", str(src), "-o", str(out)], cwd=REPO, capture_output=True, text=True)


def convertible_large_checkpoint(out: Path) -> Source:
    """The real-config LARGE checkpoint, converted once into ``out`` with the CLI (this run also warms caches).

    If the CLI rejects it because of the known ``feature_grad_mult == 1.0`` problem (torchaudio's
    ``HuBERTPretrainModel`` accepts only None or a value in (0, 1); fairseq's LARGE config has 1.0), the same
    checkpoint with ``cfg.model.feature_grad_mult = 0.1`` (identical tensors and size; one config float differs)
    is used instead, and the failure is reported. Any other failure aborts.
    """
    src = ensure_large_checkpoint()
    warm(src)
    proc = cli_convert(src, out)
    if proc.returncode == 0:
        return Source(src, True, "")
    message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1]
    if "feature_grad_mult" not in message:
        raise RuntimeError(f"continue-pt convert failed on {src}:\n{proc.stdout}\n{proc.stderr}")
    log(f"continue-pt convert REJECTS the real-config checkpoint: {message}")
    log("  -> benchmarking the same checkpoint with cfg.model.feature_grad_mult = 0.1 instead")
    variant = ensure_large_checkpoint(0.1)
    warm(variant)
    proc = cli_convert(variant, out)
    if proc.returncode != 0:
        raise RuntimeError(f"continue-pt convert failed on {variant}:\n{proc.stdout}\n{proc.stderr}")
    note = ("**The CLI rejected the real-config checkpoint** (`feature_grad_mult: 1.0`, as in fairseq's "
            f"`{LARGE_NAME}` config):\n\n    {message.replace(str(REPO) + '/', '')}\n\n"
            "so these numbers are for the same checkpoint with `cfg.model.feature_grad_mult = 0.1` (identical "
            "tensors and file size; one config float differs). Once the converter maps 1.0 to `None`, the script "
            "uses the real-config file automatically.")
    return Source(variant, False, note)
