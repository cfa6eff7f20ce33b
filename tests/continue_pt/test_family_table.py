"""Family dispatch comes from one table (``continue_pt.families.FAMILIES``): the shared modules ask a family's
entries, never compare its name (issue 11)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from continue_pt import families
from continue_pt.options import PretrainOptions

PACKAGE = Path(__file__).resolve().parents[2] / "continue_pt"
FAMILY_PACKAGES = ("hubert", "wav2vec2", "data2vec2")
"""A family's own package may name its family (a module refusing another family's bundle is not dispatch)."""
NOT_DISPATCH = {"kmeans_check.py": "`continue-pt check-kmeans` is a HuBERT-only verb: it refuses other bundles"}
BRANCH = re.compile(r"""[!=]=\s*["'](?:%s)["']""" % "|".join(map(re.escape, families.FAMILIES)))


def test_shared_modules_do_not_branch_on_a_family_name():
    branches = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in FAMILY_PACKAGES or relative.as_posix() in NOT_DISPATCH:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BRANCH.search(line):
                branches.append(f"continue_pt/{relative.as_posix()}:{number}: {line.strip()}")
    assert branches == [], "dispatch through continue_pt.families.FAMILIES instead:\n" + "\n".join(branches)


def test_every_family_fills_the_entries_the_shared_modules_call():
    for name, family in families.FAMILIES.items():
        assert family.name == name
        for entry in ("describe_targets", "bundle_problems", "option_problems", "new_head_possible",
                      "export_config", "checkpoint_facts"):
            assert callable(getattr(family, entry)), f"{name}.{entry}"


def _with_entry(monkeypatch, name: str, **entries) -> None:
    monkeypatch.setitem(families.FAMILIES, name, dataclasses.replace(families.FAMILIES[name], **entries))


def test_structural_checks_ask_every_family_for_its_option_rules(monkeypatch, tmp_path):
    _with_entry(monkeypatch, "wav2vec2", option_problems=lambda options: [f"wav2vec2 rule on {options.seed}"])
    options = PretrainOptions(train_data=str(tmp_path), output_dir=str(tmp_path / "out"), init_from=str(tmp_path),
                              labels=str(tmp_path), seed=7)
    problems = options.structural_problems()
    assert "wav2vec2 rule on 7" in problems
    assert "labels (a .km file) and label_dict (dict.km.txt) go together" in problems  # HuBERT's entry, unchanged


@pytest.mark.slow  # loads the bundle and Lightning's trainer checks
def test_the_loaded_bundle_is_checked_by_its_own_family_only(monkeypatch, tmp_path, w2v_bundle_dir):
    calls = []

    def record(family):
        def problems(options, bundle, kmeans=None, kmeans_name=None):
            calls.append((family, bundle.family))
            return [f"{family} checked {Path(options.init_from).name}"]
        return problems

    for name in families.FAMILIES:
        _with_entry(monkeypatch, name, bundle_problems=record(name))
    options = PretrainOptions(train_data=str(tmp_path), output_dir=str(tmp_path / "out"),
                              init_from=str(w2v_bundle_dir), accelerator="cpu", precision="32-true")
    assert f"wav2vec2 checked {w2v_bundle_dir.name}" in options.bundle_problems()
    assert calls == [("wav2vec2", "wav2vec2")]


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_a_headless_bundle_continues_only_where_its_family_says_so(monkeypatch, tmp_path, family):
    """``new_head_possible`` of the bundle's family decides whether an encoder-only bundle is refused."""
    bundle = tmp_path / "encoder"
    bundle.mkdir()
    from bundles.config import BundleConfig

    config = BundleConfig(family=family, kind="encoder", encoder_args={}, pretrain_args=None, sample_rate=16000,
                          normalize_waveform=False)
    monkeypatch.setattr(BundleConfig, "read", classmethod(lambda cls, path: config))
    options = PretrainOptions(train_data=str(tmp_path), output_dir=str(tmp_path / "out"), init_from=str(bundle))
    refused = [p for p in options.structural_problems() if "has no" in p]
    assert refused, "an encoder-only bundle without a new head is refused"
    _with_entry(monkeypatch, family, new_head_possible=lambda options, config: True)
    assert not [p for p in options.structural_problems() if "has no" in p]
