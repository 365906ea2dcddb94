# Two commands for a fresh machine:  `make demo` (run the pipeline on the bundled data, offline)
# and `make test` (the test suite). Both create .venv and install the project if needed.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# pip on this kind of machine warns about every configured local index it cannot read; keep the log useful.
PIP := $(BIN)/pip install --disable-pip-version-check -q
QUIET_PIP := 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }

# Quiet, offline-safe defaults (the CLI sets the same ones for direct use).
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export DO_NOT_TRACK ?= true
export MLFLOW_DISABLE_TELEMETRY ?= true
export GX_ANALYTICS_ENABLED ?= false

.PHONY: demo test install install-dev lint bench clean ui ui-prefect deploy cluster-up cluster-down docs docs-serve

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: 2.13.0 is the CPU build on local disk; letting a resolver pick torch pulls CUDA wheels.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) torch==2.13.0 $(QUIET_PIP)
	$(PIP) -e . $(QUIET_PIP)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]' $(QUIET_PIP)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The whole DAG on the bundled data, demo-sized (conf/quick.yaml), then the promotion flow.
demo: install
	$(BIN)/pricelevel train --quick
	$(BIN)/pricelevel promote
	$(BIN)/pricelevel models
	@echo "Look at: the backtest report printed above · \`make ui\` (Prefect http://127.0.0.1:4200, MLflow http://127.0.0.1:5000)"

# The lint (ruff and the import contract) runs first: a layering violation fails CI like a failing test.
# --durations=25: every CI log names the slowest tests (CI has 2 cores and a 20-minute budget). Two workers: the
# cluster and PostgreSQL modules one at a time on one of them (tests/xdist_serial.py), the rest beside them.
test: lint
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadgroup --durations=25

lint: install-dev
	$(BIN)/ruff check lib flows tasks tests bench
	$(BIN)/lint-imports --no-cache

bench: install-dev
	$(BIN)/python bench/ingest.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/backtest.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/levels.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/train.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/trade.py

ui: install
	$(BIN)/pricelevel ui

ui-prefect: install
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Register prefect.yaml's deployments with the server at PREFECT_API_URL (runs execute in this checkout).
deploy: install
	$(BIN)/pricelevel cluster prefect-setup
	PRICELEVEL_HOME=$(CURDIR) $(BIN)/prefect --no-prompt deploy --all

# docs/how-to/scale-out.md "Scaling out": PostgreSQL (system packages), Prefect and MLflow servers on it, a Dask scheduler with
# 2 workers, a Prefect worker per pool (the trader's in paper mode), and the automation that marks a flow run
# Crashed when its heartbeats stop, all in .cluster/ without Docker; then `source .cluster/env`.
# CLUSTER_ARGS="--workers 3 --port-offset 10000" changes the size or the ports. A second cluster-up while one
# runs, or a port in use, is refused in one line (and a hint) before anything starts.
cluster-up: install-dev
	$(BIN)/pricelevel cluster up $(CLUSTER_ARGS)

cluster-down:
	$(BIN)/python -m flows.commands.cluster down

# The documentation site (mkdocs.yml, docs/): built strictly (a broken link, anchor or nav entry fails it) into
# site/; the reference pages are generated from the config models and the CLI by docs/hooks/reference.py.
docs: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: install-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict --dev-addr 127.0.0.1:8000

clean:
	rm -rf data/raw data/validated data/quarantine data/reports data/derived data/optuna .prefect mlruns
