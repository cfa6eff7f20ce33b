"""Issue 12, item 3: ``bench/bench_loader.py`` (audio-seconds per second per loader worker, a directory of short
files vs the same audio in shards) cannot rot: its smoke mode runs the whole benchmark on 16 files per cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_smoke_run_measures_every_cell(tmp_path):
    out = tmp_path / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_loader.py"), "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [(r["rate"], r["format"]) for r in results] == [(16000, "wav"), (16000, "flac"), (48000, "wav"),
                                                           (48000, "flac")]
    for r in results:
        assert r["files"] == 16 and r["hours"] > 16 * 2 / 3600
        for layout in ("directory", "shards", "http"):
            assert r[layout]["utterances"] > 0 and r[layout]["rate"] > 0
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_loader
    finally:
        sys.path.remove(str(ROOT / "bench"))
    args = bench_loader.argparse.Namespace(files=16, cell_seconds=0.05, rounds=2)
    text = "\n".join(bench_loader.section(results, "cmd", {k: "x" for k in (
        "date", "cpu", "cores", "ram", "python", "torch", "torchaudio", "safetensors", "torch_threads", "rss",
        "load_start")}, args))
    assert "| 48 kHz .flac |" in text and "workers for 3000 audio-s/s" in text
