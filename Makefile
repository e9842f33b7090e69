# Two commands do all set-up on a fresh machine (README.md):
#   make demo   trains baseline and ECLoss models on the embedded synthetic faces, writes a report
#   make test   runs the test suite (CI's .ci/run calls it in a new virtual environment)
#   make lint   runs ruff over the tree (pyproject.toml's [tool.ruff]; CI runs it too)
#
# Everything runs in the active virtual environment (or conda environment) if there is one,
# else in .venv, created here. .venv sees the system's packages when the system Python has a
# compatible torch (a GPU machine's CUDA build of torch is kept, not replaced), else none.
# torch is installed only when no compatible one is importable; TORCH_PIP_ARGS passes pip
# options for it, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# for the CPU-only build of torch.
TORCH_MIN := 2.11
TORCH_BELOW := 2.15
TORCH_PIP_ARGS ?=
DEMO_OUT ?= runs/demo
VENV := .venv
ACTIVE_ENV := $(or $(VIRTUAL_ENV),$(CONDA_PREFIX))

ifeq ($(ACTIVE_ENV),)
PYTHON ?= $(VENV)/bin/python
else
PYTHON ?= $(ACTIVE_ENV)/bin/python
endif

# Exit status 0 when the Python running it imports a torch with TORCH_MIN <= version < TORCH_BELOW.
COMPATIBLE_TORCH = import sys, torch; \
	minor = lambda version: tuple(int(part) for part in version.split("+")[0].split(".")[:2]); \
	sys.exit(not minor("$(TORCH_MIN)") <= minor(torch.__version__) < minor("$(TORCH_BELOW)"))

.PHONY: install test lint demo
.DEFAULT_GOAL := install

$(VENV)/bin/python:
	python3 -m venv $(if $(shell python3 -c '$(COMPATIBLE_TORCH)' 2>/dev/null && echo yes),--system-site-packages) $(VENV)

# torch first (setup.py builds the C++/CUDA extension against it); pyproject.toml's build
# requirements, which --no-build-isolation does not install, and ninja; the package in place.
install: | $(if $(ACTIVE_ENV),,$(VENV)/bin/python)
	$(PYTHON) -c '$(COMPATIBLE_TORCH)' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet $(TORCH_PIP_ARGS) "torch>=$(TORCH_MIN),<$(TORCH_BELOW)"
	$(PYTHON) -m pip install --quiet "setuptools>=77" ninja
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[all]"
	$(PYTHON) setup.py build_ext --inplace

test: install
	$(PYTHON) -m pytest

lint: install
	$(PYTHON) -m ruff check .

demo: install
	$(PYTHON) -m train.demo --out $(DEMO_OUT)
