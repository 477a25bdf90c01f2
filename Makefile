# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PIP_PINS := torch==2.14.1 torchvision==0.29.1 triton pytest pytest-benchmark ninja hypothesis tqdm matplotlib scikit-learn timm

.PHONY: demo test bench

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_PINS)
	$(VENV)/bin/pip install --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m densenet_fast

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/core_benchmark.py
