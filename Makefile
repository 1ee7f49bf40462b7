# longtrain: `make demo` trains the tiny default recipe on 2 CPU processes;
# `make test` runs the suite. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.longtrain-installed
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: demo test bench setup clean-runs

setup: $(STAMP)

# torch first, pinned, so no dependency pulls a multi-GB CUDA build on CPU machines
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PIP) install -q -e '.[dev]'
	@touch $(STAMP)
	@echo "environment ready in $(VENV)"

demo: $(STAMP)
	$(VENV)/bin/longtrain train recipes/tiny-cpu.toml --nproc $(NPROC)
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir runs/tiny-cpu/tensorboard --host 127.0.0.1"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(VENV)/bin/longtrain bench step

clean-runs:
	rm -rf runs bench-results
