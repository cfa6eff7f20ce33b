"""The one error shape every user-facing problem takes: ``WHERE: what is wrong. what to do``."""

from __future__ import annotations

from pathlib import Path

from bundles.errors import FileProblem


def test_a_url_is_named_as_given_and_a_path_as_a_path():
    remote = FileProblem("https://example.org/corpus/", "holds no usable audio", hint="Check the URL")
    assert str(remote) == "https://example.org/corpus/: holds no usable audio. Check the URL"
    local = FileProblem(Path("corpus") / "x.wav", "is empty")
    assert str(local) == f"{Path('corpus/x.wav')}: is empty" and local.path == Path("corpus/x.wav")


def test_several_problems_are_listed_together_with_the_hint_last():
    problem = FileProblem("run.yaml", ["lr: not a number", "max_steps: must be > 0"], hint="Fix both")
    assert str(problem) == "run.yaml: \n  - lr: not a number\n  - max_steps: must be > 0\n  Fix both"
