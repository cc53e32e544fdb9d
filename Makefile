# Two commands for a new user:  `make run` (set up + run the pipeline)  and  `make test`.
# Resolved before PATH is changed below, so a stale venv never recreates itself.
ifndef PYTHON
PYTHON := $(shell command -v python3)
endif
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# dvc.yaml's commands call `python`: put the venv first on PATH so they use it.
export PATH := $(BIN):$(PATH)

.PHONY: setup run test lint lock tracking-server
setup: $(VENV)/.installed

# Reinstall when the dependency list or its lock changes. The lock pins every package
# (`make lock` refreshes it); the editable install keeps conf/ next to the code.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

run: setup  ## the whole experiment: fetch -> preprocess -> train -> crossval -> report
	dvc repro

test: setup
	python -m pytest

lint: setup
	ruff check . && ruff format --check .

lock:
	uv pip compile pyproject.toml --all-extras --universal --python-version 3.10 -o requirements.lock

# A PostgreSQL cluster in .tracking/postgres and an MLflow tracking server on it, artifacts in
# .tracking/artifacts: http://127.0.0.1:5000, with a login (MLFLOW_AUTH_ADMIN_PASSWORD must be set:
# docs/SECURITY.md). Ctrl-C stops the server; `scripts/local-postgres stop` the database.
# Settings: scripts/tracking-server -h, scripts/local-postgres -h.
tracking-server: setup
	uri="$$(scripts/local-postgres start)" && MLFLOW_BACKEND_STORE_URI="$$uri" exec scripts/tracking-server
