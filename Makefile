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

.PHONY: venv demo test test-fast clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PIP_TORCH_FLAGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/vgen run pipelines/configs/demo.yaml --storage $(CURDIR)/.vgen-demo

# The end-to-end tests (one local Ray cluster, in order) and the unit tests run as two pytest
# processes side by side; the e2e log is printed when both are done.
test: venv
	@mkdir -p .cache
	$(BIN)/python -m pytest tests/e2e $(PYTEST_ARGS) > .cache/e2e-tests.log 2>&1 & e2e=$$!; \
	$(BIN)/python -m pytest --ignore=tests/e2e $(PYTEST_ARGS); unit=$$?; \
	wait $$e2e; rc=$$?; echo "==== tests/e2e ===="; cat .cache/e2e-tests.log; \
	echo "unit tests exit $$unit, e2e tests exit $$rc"; [ $$unit -eq 0 ] && [ $$rc -eq 0 ]

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .vgen-demo .cache
