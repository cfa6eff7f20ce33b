"""Errors that name the file, what is wrong and what to do.

:class:`FileProblem` is the base of every error the kit reports to a user (converters and training raise
subclasses of it), so the CLI has one place that turns them into one clean message.
"""

from __future__ import annotations

from pathlib import Path


class FileProblem(Exception):
    """Something is wrong with ``path``. ``problems`` lists everything found, not just the first."""

    def __init__(self, path: str | Path, problems: str | list[str], hint: str = ""):
        self.path = Path(path)
        # A URL (a remote shard set, a download) is named as given: Path() would fold its "//" into "/".
        self.where = str(path) if "://" in str(path) else str(self.path)
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        body = self.problems[0] if len(self.problems) == 1 else "\n  - " + "\n  - ".join(self.problems)
        message = f"{self.where}: {body}"
        if hint:
            message += f"\n  {hint}" if len(self.problems) > 1 else f". {hint}"
        super().__init__(message)


class BundleError(FileProblem):
    """A bundle (or a k-means file) could not be read, or a bundle could not be written."""


class DiskFull(BundleError):
    """A file (of a bundle, a k-means, a training run) could not be written for lack of space (ENOSPC, or a quota);
    what was there before is intact."""
