# guardstream: the two commands a user needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev,hf

.PHONY: install run test up down status schemas clean helm-tools deploy-check

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	@touch $(STAMP)

## run: start local Kafka and Redis, then the guardstream worker (replay engine over the shared
## GuardReasoner outputs unless GUARDSTREAM_ENGINE says otherwise). Ctrl-C stops the worker.
run: install
	deploy/local/install-prereqs
	deploy/local/up
	GUARDSTREAM_ENGINE=$${GUARDSTREAM_ENGINE:-replay} \
	GUARDSTREAM_REPLAY_PATH=$${GUARDSTREAM_REPLAY_PATH:-../shared/guardreasoner/predictions/1B} \
	GUARDSTREAM_MAX_NEW_TOKENS=$${GUARDSTREAM_MAX_NEW_TOKENS:-4096} \
	GUARDSTREAM_LOG_FORMAT=$${GUARDSTREAM_LOG_FORMAT:-text} \
	$(BIN)/guardstream serve

## test: lint, type-check and the whole test suite against a real local Kafka and Redis; stops
## what it started.
test: install
	deploy/local/install-prereqs
	$(BIN)/ruff check schemas engine service bench tests deploy/docker helm/guardstream/files
	$(BIN)/mypy
	deploy/local/with-services $(BIN)/python -m pytest $(PYTEST_ARGS)

up:
	deploy/local/install-prereqs
	deploy/local/up
down:
	deploy/local/down
status:
	deploy/local/status

schemas: install
	$(BIN)/guardstream schemas export schemas/json

clean:
	deploy/local/down --clean
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## helm-tools: build the pinned helm into .tools/bin/ (Go + Go module proxy; ~1.5 min once)
helm-tools:
	deploy/helm-tools

## deploy-check: hadolint, the Helm chart (lint, render, Kubernetes schemas) and compose.yaml
deploy-check: install
	$(BIN)/python -m pytest tests/deploy -q
