# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/gateway.yaml
# `make run PORT=8081 HOST=0.0.0.0` overrides the config's server.port / server.host.
PORT   ?=
HOST   ?=

.PHONY: run test lint bench venv test-deps system-deps clean lock

$(BIN)/variations-gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	@touch $@

venv: $(BIN)/variations-gateway

run: venv
	$(BIN)/variations-gateway serve --config $(CONFIG)$(if $(PORT), --port $(PORT))$(if $(HOST), --host $(HOST))

$(VENV)/.test-deps: pyproject.toml $(BIN)/variations-gateway
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $@

# System packages the tests use for real (Redis, Prometheus, nginx, wrk, debootstrap).
system-deps:
	bash scripts/install-system-deps.sh

test-deps: $(VENV)/.test-deps system-deps

lint: $(VENV)/.test-deps
	$(BIN)/ruff check gateway tests plugins scripts
	$(BIN)/mypy

test: test-deps lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: test-deps
	$(BIN)/python -m tests.perf.bench

# The container's runtime dependencies, pinned with hashes (deploy/requirements.lock),
# made by pip-tools in a throwaway venv; tests/test_lock.py fails while it disagrees
# with pyproject.toml.
lock:
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet pip-tools
	.lock-venv/bin/pip-compile --quiet --generate-hashes --strip-extras --extra redis --extra postgres \
	  --no-emit-index-url --no-emit-find-links --output-file deploy/requirements.lock \
	  pyproject.toml
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) var build *.egg-info
