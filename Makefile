# One entry point for every gate. `make run` and `make test` set everything up themselves.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed

.PHONY: all check run test test-fast lint typecheck proto proto-check proto-lint bench clean node-deps

all: check test

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required (python3.11, python3.12 or python3.13)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)

## run: start the service (gRPC server + arq worker; embedded Redis unless AGENTPOST_REDIS_URL is set)
## on 127.0.0.1 without TLS or tokens: for development only (see README, Security)
run: $(STAMP)
	$(BIN)/agentpost serve --plaintext

## test: every test, with a throwaway redis-server, grpcurl and a Node.js client
test: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy client/agentpost server/agentpost_server bench

proto: $(STAMP)
	$(BIN)/python scripts/genproto.py

proto-check: $(STAMP)
	@rm -rf build/proto-check && mkdir -p build/proto-check
	$(BIN)/python scripts/genproto.py build/proto-check
	diff -r -x __pycache__ build/proto-check/client/agentpost/v1 client/agentpost/v1
	diff -r -x __pycache__ build/proto-check/server/agentpost_server/bus/v1 server/agentpost_server/bus/v1
	@echo "generated code is up to date"

proto-lint: $(STAMP)
	cd protos && ../$(BIN)/buf format --diff --exit-code && ../$(BIN)/buf lint

check: lint typecheck proto-lint proto-check

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache tests/node/node_modules
