"""Curves and summary from a Lightning metrics.csv."""

from __future__ import annotations

import json

import pytest

from bundles.errors import FileProblem
from continue_pt.curves import read_metrics, summarize, write_curves


def _csv(path, rows):
    header = ["epoch", "step", "train/loss", "train/acc_masked", "lr", "train/audio_seconds_per_second", "val/loss"]
    lines = [",".join(header)] + [",".join(str(r.get(h, "")) for h in header) for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_curves_and_summary_are_written(tmp_path):
    rows = [{"epoch": 0, "step": s, "train/loss": 5 - s * 0.1, "train/acc_masked": 0.1 + s * 0.01, "lr": 1e-5 * s,
             "train/audio_seconds_per_second": 40.0} for s in range(1, 11)]
    rows.append({"epoch": 0, "step": 10, "val/loss": 4.2})
    _csv(tmp_path / "run" / "logs" / "version_0" / "metrics.csv", rows)
    png, summary_path = write_curves(tmp_path / "run")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    summary = json.loads(summary_path.read_text())
    assert summary["steps"] == 10
    assert summary["metrics"]["train/loss"]["min"] == pytest.approx(4.0)
    assert summary["metrics"]["train/acc_masked"]["max"] == pytest.approx(0.2)
    assert summary["metrics"]["val/loss"]["last"] == 4.2


def test_non_finite_and_empty_cells_are_skipped(tmp_path):
    _csv(tmp_path / "metrics.csv", [{"step": 1, "train/loss": "nan"}, {"step": 2, "train/loss": 3.0}])
    series = read_metrics(tmp_path / "metrics.csv")
    assert series == {"train/loss": [(2, 3.0)]}
    assert summarize(series)["steps"] == 2


def test_run_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileProblem, match="holds no metrics.csv"):
        write_curves(tmp_path)
