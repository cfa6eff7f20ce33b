"""The README's fine-tuning snippets run as written (each in a fresh process, in a folder holding what they name)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from continue_pt.cli import cli
from continue_pt.demo import CHECKPOINT, KMEANS, KMEANS_LAYER

REPO = Path(__file__).resolve().parents[1]


def readme_snippet(name: str) -> str:
    """The ```python block that follows ``<!-- readme-snippet: NAME -->`` in README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"<!-- readme-snippet: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README.md has no snippet {name!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def continued_bundle(tmp_path_factory) -> Path:
    from converters.convert import convert_checkpoint

    return convert_checkpoint(CHECKPOINT, tmp_path_factory.mktemp("readme") / "bundle", kmeans=KMEANS,
                              kmeans_layer=KMEANS_LAYER)


def _run(snippet: str, cwd: Path, check: str) -> str:
    code = snippet + "\n" + check
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_the_fairseq_snippet_loads_the_export(continued_bundle, tmp_path):
    from tests.reference import require

    require("fairseq")
    result = CliRunner().invoke(cli, ["export", str(continued_bundle), "--to", "fairseq", "-o",
                                      str(tmp_path / "continued.pt")])
    assert result.exit_code == 0, result.output
    out = _run(readme_snippet("fairseq"), tmp_path,
               "print(type(model).__name__, tuple(model.label_embs_concat.shape), "
               "sum(p.numel() for p in model.parameters()))")
    name, *_ = out.split()
    assert name == "HubertModel" and "(24, 32)" in out  # 20 clusters + 4 specials, the head's width


@pytest.mark.slow
def test_the_transformers_snippet_loads_the_export(continued_bundle, tmp_path):
    from tests.reference import require

    require("transformers")
    result = CliRunner().invoke(cli, ["export", str(continued_bundle), "--to", "hf", "-o", str(tmp_path / "continued_hf")])
    assert result.exit_code == 0, result.output
    out = _run(readme_snippet("hf"), tmp_path, "print(len(hidden), tuple(hidden[-1].shape))")
    assert out.split("(")[0].strip() == "3" and "(1, 49, 64)" in out  # the CNN output + 2 layers; 49 frames of 64-d
