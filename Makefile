# Two commands do all the set-up: `make demo` and `make test`. Both build .venv/ first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint install kafka deploy-checks bench clean

$(BIN)/stream: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/stream

demo: $(BIN)/stream
	$(BIN)/stream demo

# Installs what the checks need when it is missing (helm, promtool and the Prometheus server, hadolint,
# kubernetes-validate), lints and validates the chart and deploy assets, then runs the whole test suite
# (unit, integration against a real Kafka broker it starts itself, deploy). Python, Java and Maven are
# enough: without CI=true, a check or test whose tool is missing and cannot be installed without root
# is skipped with one line saying how to get the tool. Under CI=true (.ci/run) every tool must be there.
test: $(BIN)/stream
	PYTHON=$(BIN)/python .ci/deploy-checks
	$(BIN)/stream kafka --resolve-only
	$(BIN)/python -m pytest

deploy-checks: $(BIN)/stream
	PYTHON=$(BIN)/python .ci/deploy-checks

bench: $(BIN)/stream
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench $(ARGS)

lint: $(BIN)/stream
	$(BIN)/ruff check .

kafka: $(BIN)/stream
	$(BIN)/stream kafka --port 9092

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
