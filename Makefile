# `make test` and `make bench` do all set-up from a fresh clone: the venv in .venv, the pinned
# torch, the test dependencies, the extension build; then they run.
# The venv's interpreter: PYTHON if given (make test PYTHON=python3.12), else the first Python
# 3.10-3.13 that .ci/find-python finds (python3.11 first).
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# nvcc here has no GPU to ask for its architecture: compile the CUDA sources for A100 and H100.
CUDA_HOME ?= $(wildcard /usr/local/cuda-13.0)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS
SAY_PYTHON = @echo "make: using $(PY) ($$($(PY) --version 2>&1))"

SOURCES := setup.py $(shell grep -v '^\#' csrc/sources.txt) $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cuh)

.PHONY: test bench build venv clean

test: build
	$(SAY_PYTHON)
	$(PY) -m pytest tests

# make bench BENCH_ARGS=--quick: a one-minute run; see python -m bench --help.
BENCH_ARGS ?=
bench: build
	$(SAY_PYTHON)
	$(PY) -m bench $(BENCH_ARGS)

build: $(VENV)/.built

venv: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt
	@test -x $(PY) || { python=$$(PYTHON='$(PYTHON)' .ci/find-python) && \
		echo "make: creating $(VENV) with $$python ($$($$python --version 2>&1))" && $$python -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build $(VENV) *.egg-info stochdepth_kernels/*.so
