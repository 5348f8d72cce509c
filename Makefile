# make test   create .venv, install the pinned versions (CPU torch), run the test suite
# make lint   ruff check + format check (make test runs it too)
# make demo   the embedded pipeline offline on CPU: data -> SFT -> reward model -> PPO -> report
# make assets rebuild the demo's data, SFT and reward-model checkpoints
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
	$(VENV)/bin/ruff check lit_rlhf tests benchmarks train.py
	$(VENV)/bin/ruff format --check lit_rlhf tests benchmarks train.py
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check lit_rlhf tests benchmarks train.py
	$(VENV)/bin/ruff format --check lit_rlhf tests benchmarks train.py

# The embedded pipeline. Each stage's output is a file target, so a second `make demo` goes
# straight to PPO; `make assets` rebuilds the data and the SFT and reward-model checkpoints.
DEMO := assets/demo
TIMED = start=$$(date +%s); $(1) && echo $$(( $$(date +%s) - start )) > $(2)

$(DEMO)/base/config.json: | install
	$(PY) -m lit_rlhf.tasks.demo prepare --out $(DEMO)

$(DEMO)/sft/config.json: $(DEMO)/base/config.json configs/sft_tiny.yaml
	$(call TIMED,$(PY) train.py fit --config configs/sft_tiny.yaml,$(DEMO)/sft_seconds.txt)

$(DEMO)/rm/config.json: $(DEMO)/sft/config.json configs/rm_tiny.yaml
	$(call TIMED,$(PY) train.py fit --config configs/rm_tiny.yaml,$(DEMO)/rm_seconds.txt)

assets: install
	rm -rf $(DEMO)
	$(MAKE) $(DEMO)/rm/config.json

demo: install $(DEMO)/rm/config.json
	$(call TIMED,$(PY) train.py fit --config configs/ppo_tiny.yaml,$(DEMO)/ppo_seconds.txt)
	$(PY) -m lit_rlhf.tasks.demo report --assets $(DEMO) --run runs/ppo_tiny
	@echo "The run: the newest runs/ppo_tiny/version_<N>/ (config.yaml, metrics.csv, metrics.png, demo.png, samples.jsonl, checkpoints/, export/, wandb/)"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
