# The two commands of the README: `make demo` (a real fine-tuning job through the whole service) and
# `make test` (lint + the whole suite). Both create .venv and install the project into it on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import sys; assert sys.version_info[:2] == (3, 11), "PEL Tune needs Python 3.11"'
	# torch==2.13.0 is pinned in pyproject.toml; see README "Installing torch" for choosing its CPU or CUDA build.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pel-tune demo

test: lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python -m pytest tests/benchmarks -p no:cacheprovider -s -o addopts=""

clean:
	rm -rf $(VENV) .peltune .pytest_cache .ruff_cache
