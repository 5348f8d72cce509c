# make test   create .venv, install the pinned versions (CPU torch), run the test suite
# make lint   ruff check + format check (make test runs it too)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: install test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so that nothing later resolves a CUDA build
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

test: install
	$(VENV)/bin/ruff check lit_rlhf tests
	$(VENV)/bin/ruff format --check lit_rlhf tests
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check lit_rlhf tests
	$(VENV)/bin/ruff format --check lit_rlhf tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
