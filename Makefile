# `make test` and `make bench` do all set-up from a fresh clone: the venv in .venv, the pinned
# torch (.ci/torch-newest.txt), the test dependencies, the extension build; then they run.
# `make test-oldest` does the same in .venv-oldest with the oldest supported torch (.ci/torch-oldest.txt).
# The venv's interpreter: PYTHON if given (make test PYTHON=python3.12), else the first Python
# 3.10-3.13 that .ci/find-python finds (python3.11 first; python3.12 first for test-oldest).
PYTHON ?=
VENV := .venv
PY := $(VENV)/bin/python
TORCH := .ci/torch-newest.txt
# nvcc here has no GPU to ask for its architecture: compile the CUDA sources for A100 and H100.
CUDA_HOME ?= $(wildcard /usr/local/cuda-13.0)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME TORCH_CUDA_ARCH_LIST
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS
SAY_PYTHON = @echo "make: using $(PY) ($$($(PY) --version 2>&1))"

SOURCES := setup.py $(shell grep -v '^\#' csrc/sources.txt) $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cuh)

.PHONY: test test-oldest bench build venv clean FORCE

test: build
	$(SAY_PYTHON)
	$(PY) -m pytest tests

test-oldest:
	$(MAKE) test VENV=.venv-oldest TORCH=.ci/torch-oldest.txt \
		PYTHON="$(or $(PYTHON),python3.12 python3.11 python3.13 python3.10 python3)"

# make bench BENCH_ARGS=--quick: a one-minute run; see python -m bench --help.
BENCH_ARGS ?=
bench: build
	$(SAY_PYTHON)
	$(PY) -m bench $(BENCH_ARGS)

build: $(VENV)/.built

venv: $(VENV)/.deps

$(VENV)/.deps: requirements-dev.txt $(TORCH)
	@test -x $(PY) || { python=$$(PYTHON='$(PYTHON)' .ci/find-python) && \
		echo "make: creating $(VENV) with $$python ($$($$python --version 2>&1))" && $$python -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(TORCH)
	$(PY) -m pip install --quiet -r requirements-dev.txt -c $(TORCH)
	touch $@

# Each venv builds the extension in place (stochdepth_kernels/*.so, named by the Python version): two
# venvs on one Python overwrite each other's, so a venv rebuilds when another built last.
BUILT_BY := build/extension-venv
ifneq ($(shell cat $(BUILT_BY) 2>/dev/null),$(VENV))
$(VENV)/.built: FORCE
endif
FORCE:

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	mkdir -p $(dir $(BUILT_BY)) && echo $(VENV) > $(BUILT_BY)
	touch $@

clean:
	rm -rf build .venv .venv-oldest *.egg-info stochdepth_kernels/*.so
