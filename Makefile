# Two commands on a fresh machine (README): `make demo` runs the embedded digits pipeline on
# the CPU, `make test` runs the fast test tier. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
# the embedded default: the same dvc.yaml on scikit-learn's digits, one run, DWF and its
# benign expert; demo-all: two runs (mean ± std) and every baseline of Tables 2-3 (not timed; several times the demo)
DEMO_SWITCH := -S 'datasets=[digits]' -S 'runs=[0]'
DEMO_MODELS := -S 'baselines=[]' -S 'evaluate_models=[dwf,experts/benign]'

.PHONY: install demo demo-all test test-all lint

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements.lock -e '.[test,pipeline]'
	touch $@

install: $(VENV)/.installed

demo: install
	dvc exp run $(DEMO_SWITCH) $(DEMO_MODELS)
	cat reports/table2.md reports/table3.md

demo-all: install
	dvc exp run -S 'datasets=[digits]' -S 'runs=[0,1]'
	cat reports/table2.md reports/table3.md reports/audit.md

test: install
	$(BIN)/python -m pytest -n auto -m "not slow and not gpu"

test-all: install
	$(BIN)/python -m pytest -n auto -m "not gpu"

lint: install
	hadolint Dockerfile
