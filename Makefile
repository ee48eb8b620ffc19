# Two commands on a fresh machine (README): `make demo` runs the embedded digits pipeline on
# the CPU, `make test` runs the fast test tier. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
# the embedded default: the same dvc.yaml on scikit-learn's digits, two runs
DEMO_SWITCH := -S 'datasets=[digits]' -S 'runs=[0,1]'

.PHONY: install demo test test-all lint

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements.lock -e '.[test,pipeline]'
	touch $@

install: $(VENV)/.installed

demo: install
	dvc exp run $(DEMO_SWITCH)
	cat reports/table2.md reports/table3.md

test: install
	$(BIN)/python -m pytest -n auto -m "not slow and not gpu"

test-all: install
	$(BIN)/python -m pytest -n auto -m "not gpu"

lint: install
	hadolint Dockerfile
