# Set-up and entry points. `make demo` and `make test` each build the virtualenv first.
#
# PyTorch: on a machine without an NVIDIA GPU we pin the CPU build (torch==$(TORCH_CPU_VERSION));
# set TORCH_INDEX=https://download.pytorch.org/whl/cpu where that build is not on the default index.
# With a GPU, pip resolves the CUDA build from PyPI.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU_VERSION ?= 2.13.0
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch,torch==$(TORCH_CPU_VERSION))
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
# DeepSpeed JIT-builds small C++ ops (e.g. the CPU shm comm op) on first use; keep them here so a
# second run, and every test after the first, reuses them.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS ?= 0
export RAY_DEDUP_LOGS ?= 1
PYTEST_ARGS ?=
# pytest-xdist workers: the end-to-end tests run in order in one of them (one Ray cluster),
# unit tests in the others (tests/conftest.py)
TEST_WORKERS ?= 2

.PHONY: venv demo test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/vgen run pipelines/configs/demo.yaml --storage $(CURDIR)/.vgen-demo

test: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .vgen-demo .cache
