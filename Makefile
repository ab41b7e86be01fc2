# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_ROOT ?= .ccat/demo

.PHONY: demo ui prod-daemon prod-webserver topology-up topology-down test lint bench clean-demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

## Package the demo files end to end on the embedded default (SQLite, local files).
demo: $(BIN)/.installed
	$(BIN)/ccat-packaging demo --root $(DEMO_ROOT)

## The Dagster UI on the demo's data (run `make demo` first): dagster-daemon and
## dagster-webserver on the demo's own instance (DAGSTER_HOME=$(DEMO_ROOT)/dagster_home).
ui: $(BIN)/.installed
	$(BIN)/ccat-packaging ui --root $(DEMO_ROOT) --port $${PORT:-3000}

## Production processes on the PostgreSQL instance: DAGSTER_HOME, DAGSTER_PG_* and
## CCAT_OPS_DB_URL must be set (docs/operations.md). One daemon per instance.
prod-daemon: $(BIN)/.installed
	DAGSTER_BIN=$(abspath $(BIN)) scripts/run-dagster.sh daemon

prod-webserver: $(BIN)/.installed
	DAGSTER_BIN=$(abspath $(BIN)) scripts/run-dagster.sh webserver

## The observatory's topology on this machine (as root): instrument computers, buffer host and
## the site's Celery worker in network namespaces, daemon and webserver here, UI on
## http://127.0.0.1:$${PORT:-3000} (docs/operations.md, "Where runs execute").
topology-up: $(BIN)/.installed
	scripts/test-setup.sh
	$(BIN)/python -m ccat_packaging_tests.topology_up up

topology-down: $(BIN)/.installed
	$(BIN)/python -m ccat_packaging_tests.topology_up down

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Lint, type-check and run every test (starts PostgreSQL; installs sshd and chromium when
## missing). The end-to-end UI test leaves screenshots in test-artifacts/e2e_ui/.
test: lint
	scripts/test-setup.sh
	$(BIN)/pytest -n 2 --dist loadfile

## Benchmarks (as root, ~14 minutes): assembly throughput and memory, discovery at 1 M files,
## orchestration overhead, packages through the topology; prints the table and writes it into
## docs/performance.md.
bench: $(BIN)/.installed
	scripts/test-setup.sh
	$(BIN)/python -m benchmarks

clean-demo:
	rm -rf $(DEMO_ROOT)
