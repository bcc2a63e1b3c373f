# Set-up is idempotent: the first target that needs the environment creates it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: quickstart prune-demo test test-fast docs lint bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

## the main job on the offline default (digits, CPU)
quickstart: $(BIN)/.installed
	$(BIN)/entropy-search sweep tune_configs/quickstart.yaml

## the first-stage job: train the digits CNN, prune it 2x uniformly, fine-tune, print the table
prune-demo: $(BIN)/.installed
	$(BIN)/entropy-search train --out runs/demo/baseline.pt
	$(BIN)/entropy-search prune runs/demo/baseline.pt --flops-target 0.5 --epochs 5

## every test that can run on this machine (slow and cluster tests included; GPU tests skip without CUDA)
test: $(BIN)/.installed
	$(BIN)/python -m pytest

## the fast default suite, for development
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow and not cluster"

## the configuration reference, generated from the schemas (tests/test_config.py fails when it is stale)
docs: $(BIN)/.installed
	$(BIN)/python -m entropy_search.reference > docs/configuration.md

lint: $(BIN)/.installed
	$(BIN)/ruff check .

bench: $(BIN)/.installed
	$(BIN)/python bench/bench_candidates.py
	$(BIN)/python bench/bench_entropy.py
