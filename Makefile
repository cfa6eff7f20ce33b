# `make demo` and `make test` both create the virtual environment when it is missing and install everything.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# PIP_CONSTRAINT overrides any machine-wide constraint file (this machine's caps torch at a version that breaks torchaudio).
PIPENV := PIP_CONSTRAINT=$(CURDIR)/constraints.txt PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test test-fast install install-test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIPENV) $(PIP) install -q --upgrade pip setuptools wheel
	$(PIPENV) $(PIP) install -q -e .
	touch $@

# fairseq-fixed is only the tests' reference implementation. It is built against the pinned torch
# (--no-build-isolation), so its build needs cython/numpy/setuptools/wheel installed first.
# torchvision and timm (data2vec 2.0's reference code needs them) go in --no-deps, so they never pull another torch.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIPENV) $(PIP) install -q --no-deps torchvision==0.26.0 timm==1.0.31
	$(PIPENV) $(PIP) install -q -e '.[test]'
	$(PIPENV) $(PIP) install -q --no-build-isolation fairseq-fixed==0.12.3.1
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(VENV)/bin/continue-pt demo --output-dir demo_out

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

# The fast lane: everything but the tests marked slow (parity sweeps, DDP, subprocess runs); same set-up.
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo_out
