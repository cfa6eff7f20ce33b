"""Reference packages (fairseq-fixed, joblib, scikit-learn) for the parity tests: present, or the suite fails.

``make test`` installs them, so a missing one means a broken set-up, and a suite that quietly skips the
reference is not a passing suite. :func:`require` therefore fails with a message that says what to install.
Set ``CONTINUE_PT_ALLOW_MISSING_REFERENCE=1`` to skip instead (a developer's partial environment).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

ALLOW_MISSING_ENV = "CONTINUE_PT_ALLOW_MISSING_REFERENCE"

_INSTALL_HINT = {
    "fairseq": "pip install --no-build-isolation fairseq-fixed==0.12.3.1 (after torch, cython, numpy; `make install-test` does it)",
    "joblib": "pip install -e '.[test]' (`make install-test` does it)",
    "sklearn": "pip install scikit-learn (a runtime dependency of continue-pt)",
    "transformers": "pip install -e '.[test]' (the pinned transformers; `make install-test` does it)",
}


def require(module: str) -> ModuleType:
    """``import module`` for a test module or test; fail (or skip, with the opt-out) when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        hint = _INSTALL_HINT.get(top, f"install the package that provides {top!r}")
        message = (f"the reference package {module!r} is missing ({error}); the parity tests need it: {hint}. "
                   f"Set {ALLOW_MISSING_ENV}=1 to skip these tests instead.")
        if os.environ.get(ALLOW_MISSING_ENV) == "1":
            pytest.skip(message, allow_module_level=True)
        pytest.fail(message, pytrace=False)
