"""RELIABILITY.md names, for every promise, the test that proves it: each named test must exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_test_named_in_reliability_md_exists():
    text = (REPO / "RELIABILITY.md").read_text(encoding="utf-8")
    named: list[tuple[str, str]] = []
    current_file = None
    for cell in re.findall(r"`([^`]+)`", text):
        match = re.fullmatch(r"(?:(test_\w+\.py))?(?:::(test_\w+))?(?:\[\.\.\.\])?", cell)
        if not match or not (match.group(1) or match.group(2)):
            continue
        current_file = match.group(1) or current_file
        if match.group(2):
            named.append((current_file, match.group(2)))
    assert len(named) >= 40
    files = {path.name: path for path in (REPO / "tests").rglob("test_*.py")}  # tests/<package>/test_*.py
    missing = [f"{f}::{t}" for f, t in named
               if f not in files or not re.search(rf"^\s*def {t}\(", files[f].read_text(encoding="utf-8"), re.M)]
    assert not missing, f"RELIABILITY.md names tests that do not exist: {missing}"
