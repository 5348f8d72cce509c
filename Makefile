# make test   create .venv, install the pinned versions (CPU torch), run the test suite
# make lint   ruff check + format check (make test runs it too)
# make demo   build the tiny offline assets (once) and run PPO on them with configs/ppo_tiny.yaml
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline

.PHONY: install test lint demo assets clean

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

assets: install
	$(PY) -m lit_rlhf.tasks.assets --out assets/tiny

assets/tiny/policy/config.json: | install
	$(PY) -m lit_rlhf.tasks.assets --out assets/tiny

demo: install assets/tiny/policy/config.json
	$(PY) train.py fit --config configs/ppo_tiny.yaml
	@echo "Logs: runs/ppo_tiny (W&B offline run in runs/ppo_tiny/wandb, checkpoints in runs/ppo_tiny/checkpoints)"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
