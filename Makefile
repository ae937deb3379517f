# Two commands do all the set-up: `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install kafka clean

$(BIN)/stream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/stream

demo: $(BIN)/stream
	$(BIN)/stream demo

test: $(BIN)/stream
	$(BIN)/stream kafka --resolve-only
	$(BIN)/python -m pytest

lint: $(BIN)/stream
	$(BIN)/ruff check .

kafka: $(BIN)/stream
	$(BIN)/stream kafka --port 9092

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
