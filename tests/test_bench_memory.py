"""Issue 12, item 2: ``bench/bench_memory.py`` (memory per model size, the largest batch on an 80 GB GPU) cannot rot:
its parameter counts match the published sizes, its memory model is checked by hand, and its ``--smoke`` mode (the
tiny demo models through the same measurement) runs here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "bench_memory.py"


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_memory

    return bench_memory


@pytest.mark.parametrize("label, published_millions", [
    ("HuBERT BASE", 95), ("HuBERT LARGE", 317), ("HuBERT X-Large", 964),  # the HuBERT paper, table 1
    ("wav2vec 2.0 LARGE / XLS-R 300M", 317), ("XLS-R 1B", 965), ("XLS-R 2B", 2162),
])
def test_the_sizes_have_their_published_parameter_counts(label, published_millions):
    bench = _bench()
    size = next(s for s in bench.SIZES if s.label == label)
    counts = bench.count(bench.bundle_config(size))
    assert counts.params / 1e6 == pytest.approx(published_millions, rel=0.02)
    assert counts.layers * counts.layer_params < counts.params


def test_the_memory_model_by_hand():
    bench = _bench()
    counts = bench.Counts(params=1000, layer_params=100, layers=8, width=4)  # root: 200 parameters
    act = bench.Activations(layer_fixed=80.0, layer_rate=16.0, other_fixed=20.0, other_rate=4.0)
    row = bench.memory_row("x", counts, act, teacher_bytes=0.0)
    assert row.states_ddp == 16_000
    assert row.states_fsdp == 16_000 / bench.FSDP_GPUS + 8 * 200 + 12 * 100
    assert row.act_rate == 20.0
    # AC: the rest + each layer's fp32 input (4 bytes x width x 50 frames/s) + one layer's activations
    assert row.act_rate_ac == 4.0 + 8 * 4 * 4 * 50 + 2.0
    assert row.act_fixed == 100.0 and row.act_fixed_ac == 20.0 + 10.0
    usable = bench.USABLE_BYTES
    assert row.max_seconds["DDP"] == pytest.approx((usable - 16_000 - 100.0) / 20.0)
    assert row.max_seconds[f"FSDP x{bench.FSDP_GPUS} + AC"] == pytest.approx(
        (usable - row.states_fsdp - 30.0) / row.act_rate_ac)
    # wav2vec 2.0: the contrastive logits' [S, S] fp32 matrix of S masked frames comes on top
    act.masked_per_second = 25.0
    contrastive = bench.memory_row("x", counts, act, teacher_bytes=0.0, contrastive=True)
    seconds = contrastive.max_seconds["DDP"]
    assert seconds < row.max_seconds["DDP"]
    assert 20.0 * seconds + 4 * (25.0 * seconds) ** 2 == pytest.approx(usable - 16_000 - 100.0, rel=1e-9)


@pytest.mark.slow
def test_smoke_mode_runs_the_measurement_on_the_tiny_models(tmp_path):
    out = tmp_path / "memory.json"
    results = ROOT / "bench" / "RESULTS.md"
    before = results.read_text() if results.exists() else None
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## bench_memory" in proc.stdout
    assert (results.read_text() if results.exists() else None) == before  # a smoke run publishes nothing
    data = json.loads(out.read_text())
    rows = {row["label"]: row for row in data["rows"]}
    assert set(rows) == {s.label for s in _bench().SIZES}
    for row in rows.values():
        assert row["params"] > 0 and row["act_rate"] > 0
        assert row["states_fsdp"] < row["states_ddp"]
        seconds = row["max_seconds"]
        assert seconds["FSDP x8"] >= seconds["DDP"] and seconds["FSDP x8 + AC"] >= seconds["DDP + AC"]
    measured = data["details"]["measured"]
    for family in ("hubert", "wav2vec2"):  # more width, more activation per layer; something is kept outside them
        assert measured[f"{family}/large"]["layer_rate"] > measured[f"{family}/base"]["layer_rate"] > 0
        assert measured[f"{family}/base"]["other_rate"] > 0
    assert data["details"]["line_error_at_shortest_crop"] < 0.05  # what is kept grows linearly with the audio
    assert measured["wav2vec2/base"]["masked_per_second"] > 0
