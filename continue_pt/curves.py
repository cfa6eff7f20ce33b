"""Training curves and a run summary from Lightning's ``metrics.csv`` (``continue-pt plot RUN_DIR``).

Columns are grouped into panels by what they measure (loss, accuracy, learning rate, throughput), so new metrics
show up without changes here.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path

from bundles.atomic import atomic_write
from bundles.errors import FileProblem

PANELS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda c: "loss" in c),
    ("accuracy", lambda c: "acc" in c),
    ("learning rate", lambda c: c == "lr" or c.endswith("/lr") or c.startswith("lr")),
    ("throughput (audio s / s)", lambda c: "per_second" in c or "throughput" in c),
    # wav2vec 2.0: a falling code perplexity / usage is the sign of codebook collapse
    ("codebook perplexity", lambda c: "perplexity" in c),
    ("codebook usage, Gumbel temperature", lambda c: "codebook_usage" in c or "temperature" in c),
)


def find_metrics_csv(run_dir: Path) -> Path:
    """The newest ``metrics.csv`` under ``run_dir`` (Lightning's CSVLogger nests it in version folders)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name.endswith(".csv"):
        return run_dir
    found = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime) if run_dir.is_dir() else []
    if not found:
        if (run_dir / "checkpoints").is_dir() or (run_dir / "bundle").is_dir():
            raise FileProblem(run_dir, "is a training run that logged no step (no metrics.csv): it stopped before its "
                              "first logged step, or was trained by a version that logged every 50 steps only",
                              hint="Resume it with --log-every 1, or plot a run that trained at least one step")
        raise FileProblem(run_dir, "holds no metrics.csv", hint="Pass the --output-dir of a `continue-pt pretrain` run")
    return found[-1]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` for every numeric column (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            if not step:
                continue
            for column, cell in row.items():
                if column in ("step", "epoch") or not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if math.isfinite(value):
                    series.setdefault(column, []).append((int(float(step)), value))
    return series


def summarize(series: dict[str, list[tuple[int, float]]]) -> dict[str, object]:
    """First, last, best (min for losses, max for accuracies) of each metric, and the number of steps."""
    summary: dict[str, object] = {"steps": max((s for points in series.values() for s, _ in points), default=0)}
    metrics = {}
    for column, points in sorted(series.items()):
        values = [v for _, v in points]
        entry = {"first": values[0], "last": values[-1], "points": len(values)}
        if "loss" in column:
            entry["min"] = min(values)
        if "acc" in column:
            entry["max"] = max(values)
        metrics[column] = entry
    summary["metrics"] = metrics
    return summary


def write_curves(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write ``curves.png`` and ``summary.json`` (atomically) next to the run; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = find_metrics_csv(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir)
    series = read_metrics(csv_path)
    if not series:
        raise FileProblem(csv_path, "holds no logged step yet (the run has not reached its first logged step)",
                          hint="Plot again after a few logged steps")
    panels = [(title, [c for c in sorted(series) if match(c)]) for title, match in PANELS]
    panels = [(title, columns) for title, columns in panels if columns]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False)
    for ax, (title, columns) in zip(axes[:, 0], panels):
        for column in columns:
            steps, values = zip(*series[column])
            ax.plot(steps, values, label=column, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    png, summary_json = out_dir / "curves.png", out_dir / "summary.json"
    _atomic_write(png, lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    summary = {"metrics_csv": str(csv_path), **summarize(series)}
    _atomic_write(summary_json, lambda p: Path(p).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8"))
    return png, summary_json


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    atomic_write(path, lambda tmp: write(str(tmp)))
