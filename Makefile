# Developer tasks for guillotina_amqp. Everything runs from the repo's own .venv.
SHELL := /bin/bash

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SRC    := guillotina_amqp tests bench

# Where the services are (same variables pytest-docker-fixtures reads).
RABBITMQ   ?= 127.0.0.1:5672
REDIS      ?= 127.0.0.1:6379
POSTGRESQL ?= 127.0.0.1:5432
export RABBITMQ REDIS POSTGRESQL

PYTEST_ARGS ?=
BENCH_ARGS  ?=

.PHONY: venv install services test test-upstream test-ha test-long test-tls run lint format typecheck bench clean

# Bytecode written even where PYTHONDONTWRITEBYTECODE is set (this VM, most containers): else
# every worker start compiles the package again (≈ 40 ms). Stale files are simply not used.
venv install: $(STAMP)
	@$(BIN)/python -m compileall -q guillotina_amqp
	@$(BIN)/python scripts/venv-paths.py

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# guillotina_amqp/__init__.py: an editable install made before the package existed maps
# nothing, so reinstall once it appears.
$(STAMP): setup.py $(wildcard pyproject.toml setup.cfg guillotina_amqp/__init__.py) | $(BIN)/python
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -e '.[test,metrics,otel]'
	touch $@

services:
	bash scripts/ensure-services.sh

# The whole suite (pyproject.toml's testpaths), or what PYTEST_ARGS names:
# `make test PYTEST_ARGS=tests/test_x.py` runs that file, `PYTEST_ARGS="-k retry"` filters the suite.
test: install services
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)

# The original plugin's own test suite, from ../shared/upstream-tests (scripts/test-upstream.sh)
test-upstream: install services
	bash scripts/test-upstream.sh $(PYTEST_ARGS)

# The production topology (docs/operations.md) on real engines: a 3-node RabbitMQ cluster and
# Redis with Sentinels, started on
# their own ports for the run and stopped after it (scripts/test-ha.sh; a few minutes).
test-ha: install
	bash scripts/test-ha.sh $(PYTEST_ARGS)

# A task past RabbitMQ's consumer_timeout (docs/operations.md), on a node of its own with a
# 5 s timeout (scripts/ct-engine.sh, ct@localhost on 5760; about 2 minutes).
test-long: install services
	bash scripts/test-long.sh $(PYTEST_ARGS)

# RabbitMQ over TLS (amqps): nodes of their own, tls@localhost (5750, amqps 5751) and
# mtls@localhost (amqps 5753, client certificates required), with certificates made for the
# run (scripts/test-tls.sh; about 40 s). CI runs it after `make test`.
test-tls: install services
	bash scripts/test-tls.sh $(PYTEST_ARGS)

run: install services
	$(BIN)/python scripts/demo.py

# Only the source folders that exist yet (tests/ and bench/ may come later).
lint: install
	$(BIN)/ruff check $(wildcard $(SRC))
	$(BIN)/ruff format --check $(wildcard $(SRC))

format: install
	$(BIN)/ruff format $(wildcard $(SRC))
	$(BIN)/ruff check --fix $(wildcard $(SRC))

typecheck: install
	$(BIN)/mypy guillotina_amqp

bench: install services
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
