# Two commands for a new user:  `make run` (set up + run the pipeline)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup run test lint lock
setup: $(VENV)/.installed

# Reinstall when the dependency list or its lock changes. The lock pins every package
# (`make lock` refreshes it); the editable install keeps conf/ next to the code.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

run: setup  ## the whole experiment: fetch -> preprocess -> train -> crossval -> report
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

lock:
	uv pip compile pyproject.toml --extra dev --universal --python-version 3.10 -o requirements.lock
