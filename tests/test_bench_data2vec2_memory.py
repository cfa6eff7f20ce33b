"""``bench/bench_data2vec2_memory.py`` cannot rot: its ``--smoke`` mode (the tiny demo data2vec 2.0 through the same
measurement) runs here, and the measurement sees what it should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_data2vec2_memory.py"


def test_smoke_run_prints_its_table_and_publishes_nothing():
    before = (ROOT / "bench" / "RESULTS.md").read_bytes()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("| tiny demo |") == 2
    assert (ROOT / "bench" / "RESULTS.md").read_bytes() == before


def test_saved_bytes_grow_with_the_crop_and_states_count_every_parameter_once(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_data2vec2_memory as bench

    module = bench.smoke_module(tmp_path)
    short, long = bench.saved_bytes(module, 1.0), bench.saved_bytes(module, 3.0)
    assert 0 < short < long and long > 2.5 * short  # at least linear in the audio
    trained, teacher, states = bench.state_bytes(module)
    assert states == 16 * trained + 4 * teacher and trained + teacher == sum(p.numel() for p in module.parameters())
