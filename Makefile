# Two commands do all set-up on a fresh machine (README.md):
#   make demo   trains baseline and ECLoss models on the embedded synthetic faces, writes a report
#   make test   runs the test suite (CI's .ci/run calls it)
PYTHON ?= python3
DEMO_OUT ?= runs/demo

.PHONY: install test demo

# torch first (setup.py builds the C++/CUDA extension against it), then the package in place.
install:
	$(PYTHON) -m pip install --quiet "torch>=2.11,<2.15"
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[all]"
	$(PYTHON) setup.py build_ext --inplace

test: install
	$(PYTHON) -m pytest

demo: install
	$(PYTHON) -m train.demo --out $(DEMO_OUT)
