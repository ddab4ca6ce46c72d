# Two commands from a fresh clone, on a machine with only python3 and make:
#   make demo   - create .venv, install actorflow into it, run the demo
#   make test   - the same set-up, then ruff, mypy --strict and the whole pytest suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS ?= dev
ARGS   ?=

.PHONY: demo test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python run_demo.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check actors services core api

typecheck: $(STAMP)
	$(BIN)/mypy --strict actors services core api

pytest: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build
