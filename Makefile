# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# matplotlib and scikit-learn: the [cli] extra (train, --plot), which demo and the tests use;
# build, wheel and setuptools>=77: .ci/run builds the sdist and wheel with this venv's torch.
# onnx, onnxscript, onnxruntime: the ONNX export tests (classic and dynamo) run the exported model.
# ruff: `make lint` (its rules are in pyproject.toml; pinned, since a new release adds findings).
PIP_PINS := torch==2.14.1 torchvision==0.29.1 triton pytest pytest-benchmark ninja hypothesis tqdm matplotlib scikit-learn timm \
	build wheel 'setuptools>=77' onnx onnxscript onnxruntime ruff==0.17.6

.PHONY: demo test test-quick lint bench test-torch2.11

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_PINS)
	$(VENV)/bin/pip install --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m densenet_fast

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

# The suite without the tests marked slow (pyproject.toml's markers): a quick check while editing.
test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/core_benchmark.py

# The GPU machine's torch (2.11, with Triton 3.6) on CPU: the whole suite in a copy of the tracked
# files, with its own venv and extension build (an in-place build would replace .venv's). numpy
# 2.2: Triton 3.6's interpreter fails on numpy 2.4 (int() of a 1-element array).
COMPAT := .compat/torch-2.11
COMPAT_PINS := torch==2.11.0 torchvision==0.26.0 numpy==2.2.6 triton pytest pytest-benchmark ninja hypothesis tqdm matplotlib scikit-learn timm 'setuptools>=77' wheel

test-torch2.11:
	rm -rf $(COMPAT)/src && mkdir -p $(COMPAT)/src
	git ls-files -z | xargs -0 cp --parents -t $(COMPAT)/src
	test -x $(COMPAT)/venv/bin/python || $(PY) -m venv $(COMPAT)/venv
	$(COMPAT)/venv/bin/pip install $(COMPAT_PINS)
	cd $(COMPAT)/src && ../venv/bin/pip install --no-build-isolation -e . && ../venv/bin/python -m pytest -q
