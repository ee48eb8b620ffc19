# Two commands on a fresh machine (README): `make demo` runs the embedded digits pipeline on
# the CPU, `make test` runs the fast test tier. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
# The embedded default is the digits study (studies/digits: its own params.yaml and DVC
# pipeline, so the paper's params.yaml is never edited). demo: run 0, DWF and its benign
# expert, the full evaluation on all 360 test digits; study: every system, five runs, tables.
STUDY := studies/digits
DEMO_TARGETS := evaluate@digits-0-dwf evaluate@digits-0-experts/benign
DEMO_METRICS := metrics/runs/digits/run0/eval/dwf.json metrics/runs/digits/run0/eval/experts/benign.json

.PHONY: install demo study ablations test test-all lint lock

# The environment is requirements.lock and nothing else: every file checked against its sha256,
# no dependency resolved beyond the lock (the Dockerfile installs the same way), then dwf itself,
# editable, built by the lock's setuptools. The lock's two sdists (antlr4-python3-runtime,
# connection-pool) build in pip's isolated environment here; the image builds them with its own.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

demo: install
	cd $(STUDY) && dvc repro $(DEMO_TARGETS) && dwf table $(DEMO_METRICS)

# The study runs through the Snakefile (the same commands as dvc.yaml), then records its outputs
# in dvc.lock: `dvc repro` runs one stage after another, Snakemake two one-process jobs side by
# side (a job's second thread buys 15-63%, a second job 100%: cpu_threads: 1), evaluations too
# (--set-threads evaluate=1: one worker each, so no core waits on an evaluation's last part;
# DWF's start first, as soon as its training is done; docs/performance.md). `dvc repro` there
# gives the same files (tests/test_pipeline.py).
# DVC (dvc.lock's hashes of code, params and data) says what is stale; Snakemake judges by file
# times, which a clone, `dvc pull` or `dvc repro` leave in no particular order. So Snakemake first
# writes its params files (-n), scripts/dvc-stale.py marks what DVC calls current as just made
# and names what it calls stale, and Snakemake reruns those, what reads them and what is missing,
# by file times alone (its records of earlier runs' inputs and code would overrule DVC).
# SNAKE(target): bring `target` up to date as DVC judges it, then record it in dvc.lock
SNAKE = snakemake -s ../../Snakefile -n --quiet all > /dev/null \
	&& stale=$$(python ../../scripts/dvc-stale.py dvc.yaml) \
	&& snakemake -s ../../Snakefile $(1) --cores 2 --set-threads evaluate=1 --quiet rules \
		--rerun-triggers mtime $${stale:+--forcerun $$stale} \
	&& dvc commit -f dvc.yaml

study: install
	cd $(STUDY) && if dvc status --quiet dvc.yaml; then echo "the study is up to date (dvc status)"; \
		else $(call SNAKE,all); fi && cat reports/table2.md reports/table3.md

# The ablations of issue 22 alone (the Snakefile's `ablations`: DWF rerouted, DWF trained another
# way, DWF's experts each evaluated), on the study's experts and mixtures, cached or pulled
# (`dvc pull`); `make study` then writes reports/ablations.md with everything else.
ablations: install
	cd $(STUDY) && $(call SNAKE,ablations)

test: install
	$(BIN)/python -m pytest -n auto -m "not slow and not gpu"

test-all: install
	$(BIN)/python -m pytest -n auto -m "not gpu"

lint: install
	hadolint Dockerfile

# requirements.lock: the dependencies of pyproject.toml with its test and pipeline extras, pinned,
# with the sha256 of every file PyPI has of each pinned version, resolved for Linux x86_64 and
# CPython 3.11 (the image's platform). `make lock` reruns the command the lock's header records;
# uv keeps the versions already in the lock unless pyproject.toml needs others (delete a line to
# let its package move). uv comes from a scratch venv, not from the project's environment.
UV_VERSION := 0.13.9
UV_VENV := $(or $(TMPDIR),/tmp)/dwf-uv-$(UV_VERSION)
lock:
	test -x $(UV_VENV)/bin/uv || { $(PYTHON) -m venv $(UV_VENV) && $(UV_VENV)/bin/pip install -q uv==$(UV_VERSION); }
	$(UV_VENV)/bin/uv pip compile pyproject.toml --extra test --extra pipeline --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 -o requirements.lock
