# Two commands from a fresh clone, on a machine with only python3 and make:
#   make demo   - create .venv, install actorflow into it, run the demo
#   make test   - the same set-up, then ruff, mypy --strict and the whole pytest suite
#   make test-fast - the inner loop: pytest without the slow tests (chaos, kill -9, Ray, benchmark smoke)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev
comma  := ,
# One stamp per set of extras: `make test EXTRAS=dev,ray` after a plain `make test` installs Ray.
STAMP  := $(VENV)/.installed-$(subst $(comma),+,$(EXTRAS))
ARGS   ?=

.PHONY: demo test test-fast lint typecheck pytest bench clean

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
	$(BIN)/ruff format --check actorflow tests benchmarks run_demo.py

typecheck: $(STAMP)
	$(BIN)/mypy --strict

pytest: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test: lint typecheck pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis dist build
