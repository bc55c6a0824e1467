# The two quick-start commands: `make demo` and `make test`. Each creates .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A working torch/torchvision pair, installed before the package (see README "Install").
# On these machines pip takes it from local disk; GPU users may set TORCH_SPEC to their own build.
TORCH_SPEC ?= $(if $(filter aarch64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint readme test-slow clean-venv

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

## demo: the whole flow on the embedded synthetic CT volume (train, predict out-of-core, evaluate)
demo: $(BIN)/.installed
	$(BIN)/volseg demo --out demo-output

## test: lint, type-check and the default test suite (slow cases excluded)
test: $(BIN)/.installed lint
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check volseg_dask tests benchmarks examples
	$(BIN)/mypy

readme: $(BIN)/.installed
	UPDATE_README=1 $(BIN)/python -m pytest -q tests/test_docs.py

test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m slow

clean-venv:
	rm -rf $(VENV)
