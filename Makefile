# Two commands do everything on a fresh machine:
#   make pipeline   create .venv, install, run the whole GRPO pipeline on the embedded default
#   make test       create .venv, install (system packages too, as root), run the test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Offline by design: no model hub, no telemetry.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup system-deps pipeline test test-fast test-stack stack lint mlflow-ui clean gpu-check

# What the browser and production-stack tests need from the distribution (Debian/Ubuntu names): headless
# Chromium and its driver, the PostgreSQL server. Installed when missing and run as root (CI); otherwise
# listed, and those tests skip saying why.
SYSTEM_PACKAGES := chromium chromium-driver fonts-dejavu-core postgresql
SYSTEM_PROBES := chromium chromedriver pg_ctlcluster

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

system-deps:
	@missing=0; for p in $(SYSTEM_PROBES); do command -v $$p >/dev/null || missing=1; done; \
	if [ $$missing = 0 ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing $(SYSTEM_PACKAGES) (apt-get)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "note: the UI and production-stack tests need $(SYSTEM_PACKAGES); they will skip"; fi

pipeline: setup
	$(BIN)/grpo run

test: setup system-deps
	$(BIN)/ruff check grpo_steps flows tests bench infra docs
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check grpo_steps flows tests bench infra docs

# The production stack on this machine (PostgreSQL, MLflow with basic auth, Prefect with an auth string), and
# the test that runs the pipeline through it.
stack: setup system-deps
	$(BIN)/python -m infra.local_stack up --dir $(or $(STACK_DIR),.stack)

test-stack: setup system-deps
	$(BIN)/python -m pytest -q -ra tests/flows/test_production_stack.py

# On one CUDA GPU, offline, under 10 minutes: the gpu-marked tests, a shortened pipeline on every GPU, the memory
# table at the 0.5B shape (ours and TRL's), as one table. Without CUDA it says so and exits 0. Installs nothing: it
# uses .venv when there is one, else the python3 on PATH (a GPU machine's own torch, no network needed).
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) bench/gpu_check.py --out reports/gpu_check.json

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000

clean:
	rm -rf data/prepared data/validated models reports mlartifacts mlflow.db
