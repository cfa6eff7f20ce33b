"""The repository stands alone: nothing in it reads a path outside the clone.

A user's clone has no ``shared`` folder beside it and none of this machine's absolute paths, so code, tests,
benchmarks and the Makefile may only name paths inside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("bundles", "converters", "continue_pt", "tests", "bench", "Makefile", ".ci", "pyproject.toml")
# Built from parts so that this file does not match itself.
FORBIDDEN = re.compile("|".join([
    re.escape(".." + "/shared"),                 # the folder beside the clone on the development machines
    r"(?<![\w.])/" + "work/",                    # this machine's checkout root
    r"(?<![\w.])/" + r"root/",                   # its home directory
    r"(?<![\w.])/" + r"opt/pypi",                # its package mirror
]))


def _scanned_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and p.suffix in {".py", ".json", ".md", ".yaml", ""}
                      and "__pycache__" not in p.parts]
    return files


def test_no_file_names_a_path_outside_the_repository():
    offenders = []
    for path in _scanned_files():
        text = path.read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_the_scan_sees_the_project():
    """Guard against a scan that passes because it looks at nothing."""
    names = {p.relative_to(REPO).as_posix() for p in _scanned_files()}
    assert {"tests/fairseq_reference.py", "continue_pt/cli/__init__.py", "Makefile", "tests/fairseq_configs/SOURCE.md"} <= names


def test_the_forbidden_patterns_catch_what_they_should():
    assert FORBIDDEN.search("CONFIG = Path('..' '/x') / '.." + "/shared/fairseq_configs'")
    assert FORBIDDEN.search('open("/' + 'work/shared/x.json")')
    assert not FORBIDDEN.search("tests/fairseq_configs/hubert_base_ls960.json")


def test_a_missing_reference_package_fails_the_suite(monkeypatch):
    """``make test`` without fairseq must not pass by skipping every parity test."""
    import pytest

    from tests.reference import ALLOW_MISSING_ENV, require

    monkeypatch.delenv(ALLOW_MISSING_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match="no_such_reference_pkg.*is missing.*parity tests need it"):
        require("no_such_reference_pkg")
    monkeypatch.setenv(ALLOW_MISSING_ENV, "1")
    with pytest.raises(pytest.skip.Exception):
        require("no_such_reference_pkg")


def test_dependencies_point_one_way():
    """converters -> bundles <- continue_pt: neither converters nor bundles imports the training package, and
    bundles imports neither of the others."""
    imports = re.compile(r"^\s*(?:from|import)\s+(continue_pt|converters)\b", re.M)
    offenders = []
    for package, forbidden in (("converters", {"continue_pt"}), ("bundles", {"continue_pt", "converters"})):
        for path in (REPO / package).rglob("*.py"):
            found = {m.group(1) for m in imports.finditer(path.read_text(encoding="utf-8"))} & forbidden
            offenders += [f"{path.relative_to(REPO)} imports {name}" for name in sorted(found)]
    assert not offenders, offenders
