# longtrain: `make demo` trains the tiny default recipe on 2 CPU processes;
# `make test` runs the suite. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.longtrain-installed
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: demo test test-recipes bench peer-setup gpu-check gpu-check-multi setup clean-runs

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
	@echo "TensorBoard (every run under runs/, by name): $(VENV)/bin/tensorboard --logdir runs"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=900 --durations=50 -m "not recipe" $(PYTEST_ARGS) tests

# What the shipped CPU recipes learn, trained as shipped (passkey-cpu and its extension: ~9 min on 2 cores)
test-recipes: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --timeout=1800 -s -m recipe $(PYTEST_ARGS) tests

bench: $(STAMP)
	$(VENV)/bin/longtrain bench step

# torchtitan for `longtrain bench peer` (docs/peer.md) in a folder of its own, every package --no-deps, so
# the venv's torch stays as it is; the bench puts the folder on the torchtitan run's PYTHONPATH only
PEER_SITE ?= .peer-site
PEER_PKGS := torchtitan==0.3.0 torchdata==0.11.0 torch_checkpointing==0.1.1 tyro==1.0.17 spmd_types==0.2.3 \
	docstring_parser==0.18.0 typeguard==4.6.1 requests==2.34.2 urllib3==2.8.0 charset_normalizer==3.5.3 \
	idna==3.21 certifi==2026.10.19.post1
peer-setup: $(STAMP)
	$(PIP) install -q --no-deps --upgrade --target $(PEER_SITE) $(PEER_PKGS)
	@echo "torchtitan ready in $(PEER_SITE): $(VENV)/bin/longtrain bench peer"

# One command on a CUDA box (docs/gpu.md): compiled Triton kernels, CUDA attention backends, simulated
# rings, NCCL, a bf16 training run, timings. Installs nothing: `PYTHON=python3 make gpu-check` runs the
# checkout with that interpreter (torch + triton + numpy + tensorboard are enough).
GPU_CHECK_PY := $(if $(filter command line environment,$(origin PYTHON)),$(PYTHON),$(if $(wildcard $(PY)),$(PY),$(PYTHON)))
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PY) -m longtrain.bench.gpu_check $(GPU_CHECK_ARGS)

# The same for a box with >= 2 GPUs (one process per GPU, NCCL): SP loss parity for every impl, FSDP2 vs DDP,
# DCP save at N ranks / resume at N/2, a hang drill with the NCCL flight recorder. `--cpu`: gloo dry run.
gpu-check-multi:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_CHECK_PY) -m longtrain.bench.gpu_check --multi $(GPU_CHECK_ARGS)

clean-runs:
	rm -rf runs bench-results
